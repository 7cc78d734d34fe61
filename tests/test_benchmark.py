"""The benchmark itself (benchmarks/bench_train.py): its code paths run end to end on toy widths
(--tiny), every figure the README quotes lands in its JSON, and --check fails when a target is missed.
The figures of a --tiny run mean nothing; the real-shape runs are quoted in the README."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

RECIPE_FIELDS = ("samples_per_s", "useful_tokens_per_s", "useful_flops_share_of_peak", "launches",
                 "cpu_enqueue_seconds", "wall_seconds", "compile_warmup_seconds", "graphs_compiled")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--tiny", "--check",
                          "--steps", "2", "--warmup", "1", "--images", "4", "--gen-images", "2", "--loop-images", "1",
                          "--max-new-tokens", "2", "--workdir", str(out / "work"), "--json", str(out / "bench.json")],
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                              "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"})
    return res, json.loads((out / "bench.json").read_text()) if (out / "bench.json").is_file() else None


def test_every_recipe_reports_speed_launches_and_memory(tiny_run):
    res, R = tiny_run
    assert R is not None, res.stderr[-3000:]
    recipes = R["train"]["recipes"]
    assert set(recipes) == {"plain", "eager"}  # CPU without --fast: no compiled recipe
    for name, r in recipes.items():
        assert all(field in r for field in RECIPE_FIELDS), (name, sorted(r))
        assert r["samples_per_s"] > 0 and r["launches"] > 0 and len(r["step_seconds"]) == 2
        assert 0 < r["cpu_enqueue_seconds"] <= r["wall_seconds"]
        assert R["memory"][name]["step_bytes"] > 0 and R["memory"][name]["total_bytes"] > R["memory"][name]["step_bytes"]
    assert R["train_speedup_vs_plain"] == pytest.approx(recipes["eager"]["samples_per_s"] / recipes["plain"]["samples_per_s"])
    assert R["features"]["images"] == 4 and R["generation"]["batched_captions"] == 2
    c = R["checkpoints"]  # the newest checkpoint keeps AdamW's two moments per trainable weight, older ones do not
    assert c["older_bytes"] > 4 * c["trainable_parameters"] and c["newest_bytes"] > 2.5 * c["older_bytes"]
    assert "| training step | plain | eager |" in res.stdout


def test_check_exits_non_zero_when_a_target_is_missed(tiny_run):
    res, R = tiny_run
    assert len(R["targets"]) == 5
    missed = [k for k, ok in R["targets"].items() if not ok]
    assert missed, "a toy model cannot meet the real-shape targets"  # so --check must fail
    assert res.returncode == 1 and "MISSED" in res.stdout


def test_variants_report_each_bridge_and_tuning_with_its_own_trainable_weights(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--tiny", "--variants",
                          "--steps", "1", "--warmup", "1", "--workdir", str(tmp_path / "work"),
                          "--json", str(tmp_path / "variants.json")],
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                              "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"})
    assert res.returncode == 0, res.stderr[-3000:]
    V = json.loads((tmp_path / "variants.json").read_text())["variants"]
    assert set(V) == {"mlp/top-3", "qformer/top-3", "mlp/LoRA-16"}
    mlp, qformer, lora = V["mlp/top-3"], V["qformer/top-3"], V["mlp/LoRA-16"]
    assert mlp["trainable_lm"] == qformer["trainable_lm"] > lora["trainable_lm"] > 0  # same blocks; LoRA's matrices
    assert mlp["trainable_adapter"] == lora["trainable_adapter"] != qformer["trainable_adapter"]
    for v in V.values():
        assert v["trainable"] == v["trainable_adapter"] + v["trainable_lm"] and v["step_seconds"] > 0
        assert v["checkpoint"]["newest_bytes"] > v["checkpoint"]["older_bytes"] > 4 * v["trainable"]
    assert "| mlp/LoRA-16 |" in res.stdout
