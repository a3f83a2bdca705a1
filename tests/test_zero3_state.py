"""ZeRO-3 state without whole-model copies: the module-by-module gather gives the same tensors as one
gather of the whole model, and the checkpoint consolidation holds a host copy on rank 0 only (2 real
gloo ranks, a tiny fusion model, DeepSpeed ZeRO-3)."""

from __future__ import annotations

import textwrap

from tests.fixtures_train import run_script_ranks

WORKER = textwrap.dedent("""
    import json, sys
    import deepspeed, torch
    from c2seg.spec import load_spec
    from c2seg.train.config import TrainConfig, DataConfig, DeepSpeedConfig, load_model_config
    from c2seg.train.engine import create_engine, full_state_dict, init_distributed, iter_full_state
    from c2seg.train.models import FusionSegmenter

    env = init_distributed()
    spec = load_spec("configs/datasets/demo_tiny.yaml")
    torch.manual_seed(0)
    model = FusionSegmenter(spec, load_model_config("configs/models/tiny.yaml"))
    cfg = TrainConfig(model="configs/models/tiny.yaml", output_dir="unused", steps=10,
                      data=DataConfig(prep_dir="unused", batch_size=2), deepspeed=DeepSpeedConfig(zero_stage=3))
    engine = create_engine(model, cfg, env.world_size)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        whole = {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    by_module = {k: v.detach().float().cpu().clone() for k, v in iter_full_state(engine)}
    partition = max(p.ds_tensor.numel() for p in engine.module.parameters())
    largest = max(p.ds_numel for p in engine.module.parameters())
    held = full_state_dict(engine, rank0_only=True)
    print("RESULT " + json.dumps({
        "same_keys": list(whole) == list(by_module),
        "equal": all(torch.equal(whole[k], by_module[k]) for k in whole),
        "entries": len(whole), "held": len(held),
        "partitioned": partition < largest}), flush=True)
""")


def test_module_by_module_gather_and_rank0_only_consolidation():
    results = run_script_ranks(WORKER, 2)
    for r in results:
        assert (r["same_keys"], r["equal"], r["partitioned"]) == (True, True, True)
    assert results[0]["held"] == results[0]["entries"]
    assert results[1]["held"] == 0  # no host copy of the model on the other ranks
