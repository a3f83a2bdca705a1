"""benchmarks/bench_train.py table: the arms x pairs table is built from the runs' own score files."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

from benchmarks.bench_train import table


def _run(folder: Path, miou: float) -> None:
    (folder / "whole_city").mkdir(parents=True)
    (folder / "whole_city" / "metrics.json").write_text(json.dumps({"miou": miou, "oa": 0.9}))


def test_the_table_pairs_the_chain_with_the_best_peer_by_seed_and_later_folders_replace_runs(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    for seed, chain, unet, adv in ((0, 0.60, 0.50, 0.64), (1, 0.70, 0.55, 0.67)):
        _run(first / f"pretrained_adapted_seed{seed}", chain)
        _run(first / f"unet_seed{seed}", unet)
        _run(first / f"unet_adv_seed{seed}", adv)
    _run(first / "pair_haze" / "pretrained_adapted_seed0", 0.90)
    _run(first / "pair_haze" / "unet_seed0", 0.95)
    _run(second / "pair_haze" / "pretrained_adapted_seed0", 0.96)  # replaces a's run
    (first / "unet_adv_seed2").mkdir()  # no scores yet: left out
    result = table(Namespace(out=[str(first), str(second)]))
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "| arm | `default` | `haze` |",
        "|---|---|---|",
        "| **c2seg chain** | 65.0 (s0 60.0, s1 70.0) | 96.0 (s0 96.0) |",
        "| U-Net | 52.5 (s0 50.0, s1 55.0) | 95.0 (s0 95.0) |",
        "| adversarial U-Net | 65.5 (s0 64.0, s1 67.0) | not run |",
        "| chain minus the best peer | -0.5 (s0 -4.0, s1 +3.0) vs adversarial U-Net | +1.0 (s0 +1.0) vs U-Net |",
    ]
    assert result["chain_minus_best_peer"]["haze"][0] == "unet"
