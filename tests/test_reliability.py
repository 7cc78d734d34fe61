"""Faults a careful user meets, tried as the user meets them: a damaged feature cache (rebuilt, with one warning),
the temp files of killed writes (removed at the next start, only the run's own), two trainings of one run into
one folder (the second refused, naming the first), a real allocation failure in a training step (one line that
says what to set), and a typo among the keys of an env file (a warning; in a sweep's variant file, an error)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import multimodal_transfer_learning as mtl
import workflow_tools as tools
from conftest import SCRIPT, WORDS, error_lines, explain, parallel, run_script, text, weights
from test_evaluation import mtl_log  # noqa: F401 (a fixture: the records of the script's logger)


def warning_lines(res) -> list[str]:
    return [line for line in text(res).splitlines() if " WARNING " in line]


def plant(folder: Path, files: dict[str, int]) -> None:
    """Files of the given sizes; a name ending in / is a folder holding one such file."""
    for name, size in files.items():
        path = folder / name.rstrip("/")
        if name.endswith("/"):
            path.mkdir(parents=True)
            path = path / "part"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)


# ---------------------------------------------------------------------------------------------
# A damaged feature cache
# ---------------------------------------------------------------------------------------------

def truncate(cache: Path) -> None:
    """Cut the pooled file, or the patch-token table, to half its size (a disk that filled, a copy cut short)."""
    target = cache if cache.is_file() else cache / mtl.PATCH_TABLE
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])


def corrupt(cache: Path) -> None:
    """Overwrite the start of the pooled file, or of the patch cache's index, with garbage."""
    target = cache if cache.is_file() else cache / mtl.PATCH_INDEX
    target.write_bytes(b"\x00\xffnot a cache\x00" * 8 + target.read_bytes()[112:])


# Temps planted beside each damaged cache before --test: those of atomic writes of that cache go (pooled: a
# killed atomic_write, patch: a killed atomic_folder's temp and moved-aside folders), the rest stays.
OWN_TEMPS = {"pooled": {".{name}.abcd1234.tmp": 3000}, "patch": {".{name}.k2j3h4g5.tmp/": 1000, ".{name}.old4242.tmp/": 500}}
OWN_FREED = {"pooled": "3.0 kB", "patch": "1.5 kB"}
OTHER_TEMPS = {".vit-0123456789abcdef-0123456789abcdef.pt.abcd1234.tmp": 700, "notes.tmp": 10, ".{name}.tmp": 10}


@pytest.fixture(scope="module")
def damaged_caches(shared_env, trained, qformer_runs):
    """--test of a finished run's last checkpoint with a copy of its feature cache, truncated or corrupted, for
    each kind of cache: pooled (CLIP + MLP, run A of `trained`) and patch tokens (CLIP + Q-Former, run A of
    `qformer_runs`). Returns {(kind, damage): (result, the clean run's test metrics, cache path, its folder)}."""
    root, env = shared_env
    sources = {"pooled": (trained["A"], "2_clip_top1"), "patch": (qformer_runs["root"] / "clip" / "A", "2_clip_qformer_top1")}
    jobs, cases = {}, {}
    for kind, (run, stem) in sources.items():
        for damage in (truncate, corrupt):
            e = env(f"reliability/{kind}-{damage.__name__}", WANDB_MODE="disabled")
            models, features = Path(e["OUTPUT_DIR_MODELS"]), Path(e["CACHE_DIR"]) / "features"
            models.mkdir(parents=True)
            shutil.copy(run / "models" / f"{stem}.pt", models)
            shutil.copytree(run / "cache" / "features", features)
            (cache,) = features.iterdir()
            damage(cache)
            plant(features, {k.format(name=cache.name): v for k, v in {**OWN_TEMPS[kind], **OTHER_TEMPS}.items()})
            clean = json.loads((run / "models" / f"{stem}.test.json").read_text())["metrics"]
            cases[kind, damage.__name__] = (clean, cache, models / f"{stem}.test.json")
            jobs[kind, damage.__name__] = lambda e=e, stem=stem, models=models: run_script(
                ["--test", "--checkpoint", str(models / f"{stem}.pt")], e)
    results = parallel(jobs)
    return {key: (results[key], *case) for key, case in cases.items()}


CASES = [(kind, damage) for kind in ("pooled", "patch") for damage in ("truncate", "corrupt")]


@pytest.mark.parametrize("kind,damage", CASES)
def test_a_damaged_feature_cache_is_said_in_one_warning_rebuilt_and_gives_the_clean_metrics(damaged_caches, kind,
                                                                                           damage):
    res, clean, cache, written = damaged_caches[kind, damage]
    assert res.returncode == 0, explain(res)
    assert "Traceback" not in res.stderr
    (line,) = [w for w in warning_lines(res) if "feature cache" in w]
    assert str(cache) in line and "damaged" in line and "computing it again" in line, line
    assert "encoded 40 images" in text(res), text(res)[-2000:]
    assert json.loads(written.read_text())["metrics"] == clean
    if kind == "pooled":  # the cache on disk is whole again
        assert torch.load(cache, weights_only=True)["features"].shape == (40, 24)
    else:
        import numpy as np
        index = json.loads((cache / mtl.PATCH_INDEX).read_text())
        assert len(index["ids"]) == 40 and np.load(cache / mtl.PATCH_TABLE, mmap_mode="r").shape == (40, 17, 32)


@pytest.mark.parametrize("kind", ["pooled", "patch"])
def test_the_temps_a_killed_cache_write_left_are_removed_and_no_others(damaged_caches, kind):
    res, _, cache, _ = damaged_caches[kind, "truncate"]
    assert res.returncode == 0, explain(res)
    left = sorted(os.listdir(cache.parent))
    assert left == sorted([cache.name, *(k.format(name=cache.name) for k in OTHER_TEMPS)]), left
    (line,) = [x for x in text(res).splitlines() if "temp file(s)" in x]
    assert f"removed {len(OWN_TEMPS[kind])} temp file(s)" in line and f"{OWN_FREED[kind]} freed" in line, line


def test_a_cache_whose_rows_do_not_match_its_records_is_rebuilt(tiny_model, mtl_log):
    """Readable, but inconsistent: one image's row is missing (a cache written by another version, say)."""
    cfg, encoder, _ = tiny_model()
    records, store, _ = mtl.load_records(cfg)
    path = mtl.feature_cache_path(cfg, encoder, records, store)
    features, _ = mtl.cached_features(cfg, encoder, records, store)
    blob = torch.load(path, weights_only=True)
    torch.save({"ids": blob["ids"][1:], "features": blob["features"][1:], "bad": {}}, path)
    again, _ = mtl.cached_features(cfg, encoder, records, store)
    (line,) = [r.getMessage() for r in mtl_log if "damaged" in r.getMessage()]
    assert "rows (39, 24) for 39 ids, not 40 of (24,)" in line, line
    assert set(again) == set(features) and all(torch.equal(again[k], features[k]) for k in features)
    assert len(torch.load(path, weights_only=True)["ids"]) == 40


def test_a_run_waits_while_another_process_writes_the_same_cache(tiny_model, mtl_log):
    """The lock of a cache being written is held elsewhere (here: by this test); the run waits for it, then reads."""
    cfg, encoder, _ = tiny_model()
    records, store, _ = mtl.load_records(cfg)
    path = mtl.feature_cache_path(cfg, encoder, records, store)
    lock = mtl.output_path(path.parent, f".{path.name}", "lock")
    held = mtl.take_lock(lock, wait=False)
    assert isinstance(held, int)
    out = {}
    reader = threading.Thread(target=lambda: out.update(features=mtl.cached_features(cfg, encoder, records, store)[0]))
    reader.start()
    time.sleep(2)
    assert reader.is_alive() and not path.exists(), "the run did not wait for the lock"
    assert any(f"waiting for process {os.getpid()} on " in r.getMessage() for r in mtl_log), mtl_log
    lock.unlink()
    os.close(held)
    reader.join(timeout=120)
    assert len(out["features"]) == 40 and path.is_file()
    assert sorted(os.listdir(path.parent)) == [path.name]  # the lock file is gone with its last holder


# ---------------------------------------------------------------------------------------------
# Two trainings of one run; the temps of killed writes in OUTPUT_DIR_MODELS
# ---------------------------------------------------------------------------------------------

MODEL_TEMPS_OWN = {".2_clip_top1.pt.abcd1234.tmp": 3000, ".clip_top1.history.jsonl.k2j3h4g5.tmp": 2000}
MODEL_TEMPS_OTHER = {".2_clip_top3.pt.abcd1234.tmp": 700,         # another run's checkpoint (maybe being written)
                     ".1_clip_top1.test.json.abcd1234.tmp": 700,  # --test writes without the run's lock
                     ".results.csv.abcd1234.tmp": 700, "notes.tmp": 10}


@pytest.fixture(scope="module")
def two_trainings(shared_env):
    """--train of A's configuration into a folder holding planted temp files; once its epoch 1 is checkpointed it
    is paused (SIGSTOP: it holds its lock, as a slow run does), and meanwhile a second --train of the same run and
    a --test of epoch 1 run in that folder; then the first goes on to its end."""
    root, env = shared_env
    e = env("reliability/concurrent", WANDB_MODE="disabled")
    models = Path(e["OUTPUT_DIR_MODELS"])
    plant(models, {**MODEL_TEMPS_OWN, **MODEL_TEMPS_OTHER})
    stderr = models.parent / "first.stderr"
    with open(stderr, "w") as err:
        first = subprocess.Popen([sys.executable, str(SCRIPT), "--train"], env=e, cwd=models.parent,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 300
            while not re.search(r"epoch 1 \(\d+ s\)", stderr.read_text()) and first.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            assert first.poll() is None, f"ended before epoch 1 was done:\n{stderr.read_text()[-3000:]}"
            first.send_signal(signal.SIGSTOP)
            out = parallel({"second": lambda: run_script(["--train"], e),
                            "test": lambda: run_script(["--test", "--checkpoint", str(models / "1_clip_top1.pt")], e)})
            out["lock while paused"] = (models / ".clip_top1.lock").read_text()
        finally:
            first.send_signal(signal.SIGCONT)
            code = first.wait(timeout=300)
    return {"first code": code, "first": stderr.read_text(), "pid": first.pid, "models": models, **out}


def test_a_second_training_of_the_same_run_is_refused_naming_the_first(two_trainings):
    res = two_trainings["second"]
    assert res.returncode == 2, explain(res)
    (line,) = error_lines(res)
    assert f"process {two_trainings['pid']} on " in line and "--train" in line, line
    assert "is training clip_top1 into OUTPUT_DIR_MODELS=" in line, line
    assert "Traceback" not in res.stderr and "temp file" not in text(res)
    assert f"process {two_trainings['pid']} on " in two_trainings["lock while paused"]


def test_testing_a_checkpoint_while_its_run_trains_is_allowed(two_trainings):
    res = two_trainings["test"]
    assert res.returncode == 0, explain(res)
    assert json.loads((two_trainings["models"] / "1_clip_top1.test.json").read_text())["epoch"] == 1


def test_the_first_training_ends_as_an_undisturbed_run_does(two_trainings, trained):
    assert two_trainings["first code"] == 0, two_trainings["first"][-3000:]
    models, undisturbed = two_trainings["models"], trained["A"] / "models"
    for name in ("1_clip_top1.pt", "2_clip_top1.pt"):
        mine, theirs = weights(models / name), weights(undisturbed / name)
        assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine), name

    def history(folder):
        return [{k: v for k, v in row.items() if k != "train_seconds"}
                for row in mtl.read_history(folder / "clip_top1.history.jsonl")]
    assert history(models) == history(undisturbed) and len(history(models)) == 2
    assert not (models / ".clip_top1.lock").exists()


def test_a_training_removes_the_temps_its_killed_writes_left_and_no_others(two_trainings):
    left = {n for n in os.listdir(two_trainings["models"]) if n.endswith(".tmp")}
    assert left == set(MODEL_TEMPS_OTHER), left
    (line,) = [x for x in two_trainings["first"].splitlines() if "temp file(s)" in x]
    assert "removed 2 temp file(s)" in line and "5.0 kB freed" in line, line


# ---------------------------------------------------------------------------------------------
# Out of memory
# ---------------------------------------------------------------------------------------------

def run_with_peak(args: list[str], env: dict, limit: int | None = None) -> tuple[subprocess.CompletedProcess, int]:
    """Run the script; returns the result and the peak of its virtual memory (VmPeak), read from /proc while it
    runs. limit: its address space (RLIMIT_AS, as `ulimit -v` sets it), so that a large allocation fails."""
    def set_limit():
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    folder = Path(env["CACHE_DIR"]).parent
    with open(folder / "stderr.txt", "w+") as err, open(folder / "stdout.txt", "w+") as out:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env, cwd=folder, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, preexec_fn=set_limit)
        peak = 0
        while proc.poll() is None:
            status = Path(f"/proc/{proc.pid}/status")
            try:
                peak = max(peak, int(re.search(r"VmPeak:\s+(\d+) kB", status.read_text())[1]) * 1024)
            except (OSError, TypeError):  # it is exiting
                pass
            time.sleep(0.05)
        err.seek(0)
        out.seek(0)
        return subprocess.CompletedProcess(args, proc.returncode, out.read(), err.read()), peak


@pytest.fixture(scope="module")
def out_of_memory(shared_env, tmp_path_factory):
    """A 1-block Qwen3 with a 400,000-word vocabulary, so that the logits make a batch's memory: epoch 1 at
    BATCH_SIZE=8, then --resume to epoch 2 at BATCH_SIZE=96 in a process allowed 1 GiB more address space than
    epoch 1 ever used (BATCH_SIZE=96 needs about 2 GiB more: its logits alone are 0.8 GB a copy)."""
    lm = tools.save_tiny_lm(tmp_path_factory.mktemp("big-vocabulary") / "lm", WORDS, seed=0, vocab_size=400_000,
                            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    root, env = shared_env
    e = env("reliability/oom", LM_MODEL=str(lm), WANDB_MODE="disabled", EPOCHS="1", VAL_CAPTION_IMAGES="1")
    first, peak = run_with_peak(["--train"], e)
    assert first.returncode == 0, explain(first)
    checkpoint = Path(e["OUTPUT_DIR_MODELS"]) / "1_clip_top1.pt"
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    res, _ = run_with_peak(["--train", "--resume"], {**e, "EPOCHS": "2", "BATCH_SIZE": "96"}, limit=peak + 2**30)
    return {"res": res, "checkpoint": checkpoint, "sha": sha, "limit": peak + 2**30}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; RLIMIT_AS is enforced on Linux")
def test_out_of_memory_in_a_step_says_what_to_set_and_keeps_the_last_checkpoint(out_of_memory):
    res = out_of_memory["res"]
    assert res.returncode == 1, explain(res)
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    (line,) = error_lines(res)
    assert "out of memory while training at BATCH_SIZE=96" in line, line
    assert "set BATCH_SIZE=48 GRAD_ACCUM=2 (96 pairs per optimizer step, as now)" in line, line
    assert f"{mtl.readable_size(out_of_memory['limit'])} allowed (ulimit -v)" in line and "in use at the peak" in line
    assert "the last good checkpoint is kept" in line, line
    folder = out_of_memory["checkpoint"].parent
    assert sorted(p.name for p in folder.glob("*.pt")) == ["1_clip_top1.pt"]
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]
    assert hashlib.sha256(out_of_memory["checkpoint"].read_bytes()).hexdigest() == out_of_memory["sha"]
    ckpt = mtl.read_checkpoint(out_of_memory["checkpoint"])
    assert ckpt["epoch"] == 1 and "optimizer" in ckpt  # still the one to resume from


# ---------------------------------------------------------------------------------------------
# Unknown variables
# ---------------------------------------------------------------------------------------------

def test_every_setting_is_known_and_a_typo_gets_the_closest_setting():
    settings = [f.name.upper() for f in dataclasses.fields(mtl.Config)]
    assert mtl.unknown_variables(settings) == []
    library = ["HF_HOME", "HF_HUB_OFFLINE", "WANDB_DIR", "TORCH_HOME", "TORCHINDUCTOR_CACHE_DIR", "CUDA_VISIBLE_DEVICES",
               "PYTORCH_CUDA_ALLOC_CONF", "NCCL_DEBUG", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "MASTER_PORT"]
    assert mtl.unknown_variables(library) == []
    assert mtl.unknown_variables(["EPOCH", "TOP_k", "BATCHSIZE", "FREEZE_EVERYTHING"]) == [
        "EPOCH is not a setting (did you mean EPOCHS?)", "TOP_k is not a setting (did you mean TOP_K?)",
        "BATCHSIZE is not a setting (did you mean BATCH_SIZE?)", "FREEZE_EVERYTHING is not a setting"]


def test_a_typo_in_the_env_file_is_warned_about_and_the_real_environment_is_not_judged(base_env, tmp_path):
    lines = "EPOCH=10\nTOP_k=0\nEPOCHS=1\nHF_HOME=/somewhere\nCUDA_VISIBLE_DEVICES=0\nOMP_NUM_THREADS=1\n"
    (tmp_path / ".env").write_text(lines)
    (tmp_path / "ablation.env").write_text("EPOCH=10\n")
    env = {**base_env, "SOME_UNRELATED_VARIABLE": "1", "EPOCH_OF_SHELL": "x"}
    res = parallel({".env": lambda: run_script(["--test"], env),  # no checkpoint yet: stops after reading the config
                    "--env-file": lambda: run_script(["--test", "--env-file", "ablation.env"], env)})
    warned = warning_lines(res[".env"])
    assert len(warned) == 2, warned
    assert ".env: EPOCH is not a setting (did you mean EPOCHS?); it is ignored" in warned[0], warned
    assert ".env: TOP_k is not a setting (did you mean TOP_K?); it is ignored" in warned[1], warned
    (warned,) = warning_lines(res["--env-file"])
    assert "ablation.env: EPOCH is not a setting (did you mean EPOCHS?)" in warned
    for r in res.values():
        assert r.returncode == 1 and "no checkpoint" in error_lines(r)[0], explain(r)


def test_a_typo_in_a_sweep_variant_file_stops_the_sweep_before_anything_trains(base_env, tmp_path):
    good, bad = tmp_path / "top0.env", tmp_path / "top1.env"
    good.write_text("TOP_K=0\nEPOCHS=1\n")
    bad.write_text("TOP_K=1\nEPOCH=10\nCUDA_VISIBLE_DEVICES=0\n")
    res = run_script(["--sweep", str(good), str(bad)], base_env)
    assert res.returncode == 2, explain(res)
    (line,) = error_lines(res)
    assert f"--sweep: {bad}: EPOCH is not a setting (did you mean EPOCHS?)" in line, line
    assert "Traceback" not in res.stderr
    assert not Path(base_env["OUTPUT_DIR_MODELS"]).exists()
