"""Per-rank memory of a model zoo entry fine-tuned under ZeRO-3 in bf16, estimated on the meta device (no
memory, no GPU): what each rank holds on the GPU and on the host before ("today": c2seg up to a082085) and
after the ZeRO-3 change of bfc6d10 (state gathered module by module, consolidation on rank 0 only,
validation in place; the EMA teacher is still a whole fp32 model on every rank).

    python benchmarks/bench_zero3_memory.py                       # giant, C2Seg-AB spec, 2 and 8 ranks
    python benchmarks/bench_zero3_memory.py --model configs/models/huge.yaml --ranks 4 16

The model is built under ``torch.device("meta")``; with P parameters and W ranks the rows are (bytes):

  GPU   bf16 weights partition     2 P / W   what the forward gathers from, layer by layer
  GPU   fp32 master partition      4 P / W   the optimizer's copy of the weights
  GPU   AdamW moments              8 P / W   exp_avg + exp_avg_sq, fp32
  GPU   gradient partition         4 P / W   fp32, for the optimizer step (bf16 reduce buckets are transient)
  GPU   largest layer gathered     4 L       L: the parameters of the largest module (DeepSpeed's allowance)
  GPU   EMA teacher                4 P on every rank, before and after (train/finetune.py keeps a full fp32
                                   FusionSegmenter: every rank's teacher labels its own target batch;
                                   partitioning it like the master weights, 4 P / W, is not done)
  host  model before partitioning  4 P       the fp32 module every rank builds before deepspeed.initialize
                                             (no zero.Init)
  host  checkpoint consolidation   today 8 P on every rank (full_state_dict + the EMA's CPU clone, which every
                                   rank makes for save_checkpoint); after: 8 P on rank 0, 0 elsewhere
  host  EMA update, each step      today 4 P on every rank (full_state_dict of the student under ZeRO-3);
                                   after: 0 (iter_full_state gathers one module at a time on the GPU: 4 L)
  both  validation copy            today 4 P on the GPU and 8 P on the host of every rank (a full fp32
                                   FusionSegmenter loaded from full_state_dict); after: 0 (the engine's module
                                   runs in place, its forward gathering layer by layer)

The GPU rows without the EMA are cross-checked against DeepSpeed's own estimate
(``estimate_zero3_model_states_mem_needs``, no offload: 4 L + 18 P / W per GPU) when deepspeed imports;
activations, the CUDA context and allocator slack come on top of every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from c2seg.spec import load_spec  # noqa: E402  (after the path insert)
from c2seg.train.config import load_model_config  # noqa: E402
from c2seg.train.models import FusionSegmenter  # noqa: E402

GIB = 2 ** 30


Term = tuple[float, str]  # (bytes, unit): bytes per parameter "P", per rank's share "P/W", per largest-layer
#                          parameter "L", or nothing "0"


@dataclass(frozen=True)
class Row:
    """One memory item: where it lives and what rank 0 (the largest) holds today and after the change."""

    where: str
    item: str
    today: Term
    after: Term


def term_bytes(term: Term, p: int, layer: int, w: int) -> float:
    coeff, unit = term
    return coeff * {"P": p, "P/W": p / w, "L": layer, "0": 0}[unit]


def term_text(term: Term) -> str:
    return "0" if term[1] == "0" else f"{term[0]:g} {term[1]}"


ROWS = (
    Row("GPU", "bf16 weights partition", (2, "P/W"), (2, "P/W")),
    Row("GPU", "fp32 master partition", (4, "P/W"), (4, "P/W")),
    Row("GPU", "AdamW moments (fp32)", (8, "P/W"), (8, "P/W")),
    Row("GPU", "gradient partition (fp32)", (4, "P/W"), (4, "P/W")),
    Row("GPU", "largest layer gathered", (4, "L"), (4, "L")),
    Row("GPU", "EMA teacher (fp32)", (4, "P"), (4, "P")),
    Row("GPU", "validation copy of the student", (4, "P"), (0, "0")),
    Row("host", "model before partitioning", (4, "P"), (4, "P")),
    Row("host", "checkpoint consolidation, rank 0", (8, "P"), (8, "P")),
    Row("host", "checkpoint consolidation, rank > 0", (8, "P"), (0, "0")),
    Row("host", "EMA update, each step", (4, "P"), (0, "0")),
    Row("host", "validation copy of the student", (8, "P"), (0, "0")),
)
STATE_ITEMS = {r.item for r in ROWS[:5]}  # what DeepSpeed's estimate covers


def model_size(model_yaml: str, spec_yaml: str) -> tuple[int, int]:
    """Parameters of the fusion segmenter and of its largest module (own parameters only), built on meta."""
    with torch.device("meta"):
        model = FusionSegmenter(load_spec(spec_yaml), load_model_config(model_yaml))
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def deepspeed_gpu_bytes(p: int, layer: int, w: int) -> int | None:
    """DeepSpeed's per-GPU estimate for ZeRO-3 without offload on one node of ``w`` GPUs, or None."""
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    except ImportError:
        return None
    _, gpu, _ = estimate_zero3_model_states_mem_needs(p, layer, num_gpus_per_node=w, cpu_offload=False,
                                                      cpu_offload_params=False, zero_init=False)
    return gpu


def estimate(p: int, layer: int, ranks: list[int]) -> list[dict]:
    """Every row at every world size in GiB, then the totals of rank 0: the sum of the GPU rows (resident
    together) and the largest host row (the host items are peaks at different moments)."""
    out = []
    for row in ROWS:
        rec = {"where": row.where, "item": row.item, "today": term_text(row.today), "after": term_text(row.after)}
        for w in ranks:
            rec[f"today_{w}"] = term_bytes(row.today, p, layer, w) / GIB
            rec[f"after_{w}"] = term_bytes(row.after, p, layer, w) / GIB
        out.append(rec)
    gpu = {"where": "GPU", "item": "total, rank 0 (sum)", "today": "", "after": ""}
    host = {"where": "host", "item": "peak, rank 0 (largest item)", "today": "", "after": ""}
    for key in (f"{when}_{w}" for w in ranks for when in ("today", "after")):
        gpu[key] = sum(r[key] for r in out if r["where"] == "GPU")
        host[key] = max(r[key] for r in out if r["where"] == "host" and "rank > 0" not in r["item"])
    return out + [gpu, host]


def print_table(rows: list[dict], ranks: list[int]) -> None:
    cols = [f"{when} W={w}" for w in ranks for when in ("today", "after")]
    print(f"{'where':<5} {'item':<36} {'today':<8} {'after':<8}" + "".join(f"{c:>14}" for c in cols))
    for r in rows:
        values = "".join(f"{r[f'{when}_{w}']:>10.2f} GiB" for w in ranks for when in ("today", "after"))
        print(f"{r['where']:<5} {r['item']:<36} {r['today']:<8} {r['after']:<8}{values}")


def report(rows: list[dict], ranks: list[int], model: str) -> None:
    """The rank-0 totals as figures (for run_all's table)."""
    from benchmarks.report import figure

    for r in rows[-2:]:
        for w in ranks:
            figure("zero3", f"{model} {r['where']} {r['item'].split(',')[0]}, W={w}", r[f"today_{w}"], "GiB",
                   f"after the change: {r[f'after_{w}']:.2f} GiB (estimate, rank 0)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "configs/models/giant.yaml"), help="model config YAML")
    parser.add_argument("--spec", default=str(ROOT / "configs/datasets/c2seg_ab.yaml"),
                        help="dataset spec (its band counts size the patch embeddings)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 8], help="world sizes (one GPU per rank)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--quick", action="store_true", help="(run_all) the same: the estimate takes seconds")
    args = parser.parse_args()
    p, layer = model_size(args.model, args.spec)
    print(f"{Path(args.model).stem}: {p:,} parameters (P), largest module {layer:,} (L); ZeRO-3, bf16, AdamW, "
          "finetune with EMA teacher; per rank, rank 0")
    rows = estimate(p, layer, args.ranks)
    print_table(rows, args.ranks)
    for w in args.ranks:
        ours = sum(r[f"today_{w}"] for r in rows if r["item"] in STATE_ITEMS)
        theirs = deepspeed_gpu_bytes(p, layer, w)
        check = "deepspeed does not import" if theirs is None else \
            f"DeepSpeed's estimate_zero3_model_states_mem_needs: {theirs / GIB:.2f} GiB"
        print(f"W={w}: weights, optimizer states and gradients {ours:.2f} GiB per GPU; {check}")
        first, other = (next(r for r in rows if r["item"] == f"checkpoint consolidation, {k}")
                        for k in ("rank 0", "rank > 0"))
        node = {when: first[f"{when}_{w}"] + (w - 1) * other[f"{when}_{w}"] for when in ("today", "after")}
        print(f"W={w}, all ranks on one node: host memory of a checkpoint's consolidation, all ranks together: "
              f"today {node['today']:.1f} GiB, after {node['after']:.1f} GiB")
    report(rows, args.ranks, Path(args.model).stem)
    if args.json:
        Path(args.json).write_text(json.dumps({"parameters": p, "largest_layer": layer, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
