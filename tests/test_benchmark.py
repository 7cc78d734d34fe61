"""The benchmark and the GPU check (benchmarks/): `gpu_check.sh --tiny` runs every phase of the check on
CPU at toy widths, as it runs them on a GPU, and each phase's JSON holds the figures the README quotes;
--check fails when a target is missed; a benchmark stopped halfway keeps the sections it measured. The
figures of a --tiny run mean nothing (torch.compile even runs the light aot_eager backend there); the
real-shape runs are quoted in the README. demo_seeds.py's table of the demo studies over seeds."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, path_without_java

BENCH = ROOT / "benchmarks" / "bench_train.py"
RECIPE_FIELDS = ("samples_per_s", "useful_tokens_per_s", "useful_flops_share_of_peak", "launches",
                 "cpu_enqueue_seconds", "wall_seconds", "compile_warmup_seconds", "graphs_compiled")


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    """`bash benchmarks/gpu_check.sh --tiny OUT`, without Java on PATH (pycocoevalcap's JVM start-ups would
    cost more than the toy runs): (the finished process, OUT)."""
    root = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": path_without_java(root / "path")}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny", str(root / "out")], env=env,
                         capture_output=True, text=True, timeout=1800)
    return res, root / "out"


def read(out, phase: str) -> dict:
    return json.loads((out / f"{phase}.json").read_text())


def test_every_phase_of_the_check_runs_and_writes_its_json(check):
    res, out = check
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    phases = read(out, "phases")
    assert list(phases) == ["bench", "e2e", "compile", "variants", "compile_dynamic"]  # liger, max batch: CUDA
    assert phases["bench"] == {"status": "targets missed", "exit": 3, "seconds": phases["bench"]["seconds"]}
    assert all(p["status"] == "ok" and p["exit"] == 0 for name, p in phases.items() if name != "bench"), phases
    for name in phases:
        assert read(out, name)["wall_seconds"] > 0, name  # written at the very end too: the phase finished
        assert (out / f"{name}.log").stat().st_size > 0


def test_the_bench_phase_reports_every_recipe_its_equality_and_the_caption_latency(check):
    _, out = check
    R = read(out, "bench")
    recipes = R["train"]["recipes"]
    assert set(recipes) == {"plain", "eager", "fast"}  # CUDA graphs (fast+graphs) only on a GPU
    for name, r in recipes.items():
        assert all(field in r for field in RECIPE_FIELDS), (name, sorted(r))
        assert r["samples_per_s"] > 0 and r["launches"] > 0 and len(r["step_seconds"]) == 2
        assert 0 < r["cpu_enqueue_seconds"] <= r["wall_seconds"]
    for name in ("plain", "eager"):
        assert 0 < R["memory"][name]["step_bytes"] < R["memory"][name]["total_bytes"]
    assert R["train_speedup_vs_plain"] == pytest.approx(recipes["eager"]["samples_per_s"] / recipes["plain"]["samples_per_s"])
    # every training and evaluation shape compiled in the warm-up: 2 length buckets (MAX_CAPTION_TOKENS=8), all 3
    # blocks trained (TOP_K=3), each in training and evaluation
    assert recipes["fast"]["graphs_compiled"] == R["compiled"]["fast"]["graphs"] == 4
    assert R["equality"]["fast"]["equal"] and R["equality"]["fast"]["grad_rel_diff"] < 1e-4  # fp32 on CPU
    latency = R["latency"]
    assert [latency[b]["batch"] for b in ("1", "32")] == [1, 4]  # 4 JPEGs in the toy folder
    assert all(x["ms_per_image"] > 0 and x["new_tokens"] == 20 for x in latency.values())
    c = R["checkpoints"]  # the newest checkpoint keeps AdamW's two moments per trainable weight, older ones do not
    assert c["older_bytes"] > 4 * c["trainable_parameters"] and c["newest_bytes"] > 2.5 * c["older_bytes"]
    assert R["torch"] and R["transformers"] and R["features"]["images"] == 4
    missed = [k for k, ok in R["targets"].items() if not ok]
    assert missed and "fast equals eager (loss within 2%, gradients 5%)" not in missed  # toys miss real-shape targets
    log = (out / "bench.log").read_text()
    assert "| training step | plain | eager | fast |" in log and "MISSED" in log and "latency" in log


def test_the_compile_phase_compares_the_whole_stack_with_regional_compilation(check):
    _, out = check
    S = read(out, "compile")["compile"]["strategies"] | read(out, "compile_dynamic")["compile"]["strategies"]
    assert list(S) == ["whole-stack", "regional", "whole-stack-dynamic"]
    for name, s in S.items():
        assert s["first_shape_seconds"] > 0 and s["step_seconds"] > 0 and s["graphs"] >= 1, name
        if name == "whole-stack":  # measured in the same run as regional
            assert s["warmup_ratio_to_regional"] == pytest.approx(s["first_shape_seconds"] /
                                                                  S["regional"]["first_shape_seconds"])
    assert S["whole-stack"]["graphs"] == S["whole-stack-dynamic"]["graphs"] == 1  # one shape, one stack
    assert S["regional"]["graphs"] == 4 and S["regional"]["all_shapes_seconds"] > S["regional"]["first_shape_seconds"]


def test_the_e2e_phase_runs_the_script_and_reads_what_it_wrote(check):
    _, out = check
    e = read(out, "e2e")["e2e"]["eager"]
    assert e["train_exit"] == e["test_exit"] == 0 and e["compile"] == "0"
    assert len(e["epoch_train_seconds"]) == 1 and e["epoch_train_seconds"][0] > 0
    assert "CIDEr" in e["test_metrics"] and e["graphs_after_epoch_1"] is None  # eager: no fast path line
    assert (out / "e2e" / "eager_train.log").is_file() and (out / "e2e" / "eager_test.log").is_file()


def test_the_variants_phase_reports_each_bridge_and_tuning_with_its_own_trainable_weights(check):
    _, out = check
    V = read(out, "variants")["variants"]
    assert set(V) == {"mlp/top-3", "qformer/top-3", "mlp/LoRA-16"}
    mlp, qformer, lora = V["mlp/top-3"], V["qformer/top-3"], V["mlp/LoRA-16"]
    assert mlp["trainable_lm"] == qformer["trainable_lm"] > lora["trainable_lm"] > 0  # same blocks; LoRA's matrices
    assert mlp["trainable_adapter"] == lora["trainable_adapter"] != qformer["trainable_adapter"]
    for v in V.values():
        assert v["trainable"] == v["trainable_adapter"] + v["trainable_lm"] and v["step_seconds"] > 0
        assert v["checkpoint"]["newest_bytes"] > v["checkpoint"]["older_bytes"] > 4 * v["trainable"]
    assert "| mlp/LoRA-16 |" in (out / "variants.log").read_text()


def test_a_benchmark_stopped_halfway_keeps_the_sections_it_measured(tmp_path):
    """SIGTERM (what the check's time limit sends) once training starts: the JSON holds what came before."""
    proc = subprocess.Popen([sys.executable, str(BENCH), "--tiny", "--images", "2", "--gen-images", "1",
                             "--loop-images", "1", "--max-new-tokens", "1", "--workdir", str(tmp_path / "work"),
                             "--json", str(tmp_path / "bench.json")], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in proc.stderr:
            if "training:" in line:
                proc.send_signal(signal.SIGTERM)
                break
        assert proc.wait(timeout=300) == 143
    finally:
        proc.kill()
    R = json.loads((tmp_path / "bench.json").read_text())
    assert {"features", "generation", "latency"} <= set(R) and "train" not in R and R["features"]["images"] == 2


def test_the_seed_table_reads_each_seeds_results_and_counts_the_places_named(tmp_path):
    """benchmarks/demo_seeds.py's table from two hand-made seed folders of the position study: each variant's
    metric as mean (min–max), and the share of test captions whose place phrase is their reference's."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import demo_seeds
    header = ["checkpoint", "untrained", "CIDEr", "loss", "METEOR"]
    captions = {1: [("a red circle on the left", "a red circle on the left"), ("a red circle", "a red circle at the top")],
                2: [("a blue square on the left", "a red circle on the left"), ("at the top", "a red circle at the top")]}
    for seed, cider, meteor in ((1, "4.0", "0.5"), (2, "6.0", "")):
        folder = tmp_path / f"seed{seed}" / "qformer"
        folder.mkdir(parents=True)
        (folder / "results.csv").write_text(",".join(header) + f"\n12_clip_qformer_top3.pt,no,{cider},1.5,{meteor}\n")
        (folder / "12_clip_qformer_top3.test_captions.jsonl").write_text("".join(
            json.dumps({"generated": g, "references": [r, "another"]}) + "\n" for g, r in captions[seed]))
    per_seed = {s: demo_seeds.seed_results(tmp_path / f"seed{s}", "position") for s in (1, 2)}
    assert per_seed[1]["qformer"]["right places"] == 0.5 and per_seed[2]["qformer"]["right places"] == 1.0
    head, _, row = demo_seeds.table(per_seed).splitlines()
    assert head.split(" | ")[1:] == ["CIDEr", "METEOR", "loss", "right places |"]
    assert row == "| qformer | 5.000 (4.000–6.000) | missing | 1.500 (1.500–1.500) | 0.750 (0.500–1.000) |"
