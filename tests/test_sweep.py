"""Sweeps (--sweep ENV_FILE ...): each variant's settings over the base configuration, trained then
tested in a child process with its outputs in OUTPUT_DIR_MODELS/<file stem>/; a bad variant reported at
the end while the others run; a finished variant skipped, an interrupted one resumed; Ctrl-C stopping
the whole sweep; the comparison printed at the end."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import multimodal_transfer_learning as mtl
import workflow_tools as tools
from conftest import SCRIPT, error_lines, explain, leftover_temp_files, parallel, run_script, text


def write(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


def checkpoint_stamps(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*.pt")}


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def sweep_three_times(env: dict, files: Path) -> dict:
    """The sweep of top0 (TOP_K=0, 1 epoch), bad (TOP_K=x) and top1 (1 epoch); the same sweep again;
    then once more after top1 asks for 2 epochs (so its run counts as interrupted: resumed) and bad
    gets a valid configuration whose dataset does not exist (a failure only the child finds)."""
    top0 = write(files / "top0.env", "TOP_K=0\nEPOCHS=1\n")
    bad = write(files / "bad.env", "TOP_K=x\n")
    top1 = write(files / "top1.env", "# the top block\nTOP_K=1\nEPOCHS=1\n")
    args = ["--sweep", str(top0), str(bad), str(top1)]
    models = Path(env["OUTPUT_DIR_MODELS"])
    out = {"first": run_script(args, env, timeout=600)}
    out["stamps"], out["files"] = checkpoint_stamps(models), files_in(models)
    out["comparison"] = (models / "comparison.md").read_text()
    out["again"] = run_script(args, env)
    out["stamps again"] = checkpoint_stamps(models)
    out["history before"] = (models / "top1" / "clip_top1.history.jsonl").read_text()
    write(top1, "TOP_K=1\nEPOCHS=2\n")
    write(bad, f"DATASET={files / 'no-such-images'}\n")
    out["third"] = run_script(args, env, timeout=600)
    return out


def interrupt_sweep(env: dict, files: Path, timeout: int = 300) -> tuple[int, str]:
    """A sweep of a long variant and one more; Ctrl-C (SIGINT to the process group, as a terminal
    sends it) once the first variant trains. Returns (exit code, stderr)."""
    slow, never = write(files / "slow.env", "EPOCHS=50\n"), write(files / "never.env", "TOP_K=0\n")
    err_path = files / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "--sweep", str(slow), str(never)], env=env,
                                cwd=files, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while "epoch 1/50" not in err_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert proc.poll() is None and "epoch 1/50" in err_path.read_text(), err_path.read_text()[-3000:]
            os.killpg(proc.pid, signal.SIGINT)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return code, err_path.read_text()


@pytest.fixture(scope="module")
def sweeps(shared_env):
    root, env = shared_env
    e, stop = env("sweep"), env("sweep-stop")
    runs = parallel({"sweeps": lambda: sweep_three_times(e, root / "sweep" / "variants"),
                     "stopped": lambda: interrupt_sweep(stop, root / "sweep-stop")})
    return {"models": Path(e["OUTPUT_DIR_MODELS"]), "stop_models": Path(stop["OUTPUT_DIR_MODELS"]),
            **runs["sweeps"], "stopped": runs["stopped"]}


def test_valid_variants_finish_and_the_bad_one_is_reported_at_the_end_with_exit_1(sweeps):
    res = sweeps["first"]
    assert res.returncode == 1, explain(res)
    log = text(res)
    # each file's value beats the environment's (TOP_K=1 there); outputs in a folder per file stem
    assert sorted(sweeps["stamps"]) == ["top0/1_clip_top0.pt", "top1/1_clip_top1.pt"]
    files = sweeps["files"]
    assert {"top0/1_clip_top0.test.json", "top1/1_clip_top1.test.json", "top1/clip_top1.history.jsonl"} <= set(files)
    assert not [f for f in files if f.startswith("bad")]
    progress = [log.index(f"sweep: variant {i} of 3") for i in (1, 2, 3)]
    assert progress == sorted(progress)
    (line,) = error_lines(res)
    assert "bad.env failed" in line and "TOP_K='x' is not an integer" in line, line
    assert log.index(line) > log.index("top1: new")  # reported at the end, after the others ran
    assert "2 of 3 variants done, 1 failed" in log and "Traceback" not in log
    # the comparison: printed and written, one row per tested variant, TOP_K the setting that differs
    assert "| run | top_k |" in res.stdout
    assert "| top0/1_clip_top0 | 0 |" in res.stdout and "| top1/1_clip_top1 | 1 |" in res.stdout
    assert "| top0/1_clip_top0 | 0 |" in sweeps["comparison"]
    assert {"comparison.md", "comparison_val_loss.png", "comparison_test_metrics.png"} <= set(files)


def test_rerunning_the_sweep_trains_nothing_new(sweeps):
    res = sweeps["again"]
    assert res.returncode == 1, explain(res)  # the bad variant is still bad
    log = text(res)
    assert "top0: finished" in log and "top1: finished" in log and log.count(": skipped") == 2
    assert "epoch 1/" not in log and "image features" not in log  # no child was started
    assert sweeps["stamps again"] == sweeps["stamps"]
    assert "| top1/1_clip_top1 | 1 |" in res.stdout


def test_an_interrupted_variant_resumes_keeps_its_history_and_a_childs_failure_is_named(sweeps):
    res, models = sweeps["third"], sweeps["models"]
    assert res.returncode == 1, explain(res)
    log = text(res)
    assert "top0: finished" in log and "top1: interrupted" in log and "resuming from" in log
    assert "epoch 1/2" not in log  # only epoch 2 was trained
    stamps = checkpoint_stamps(models)
    assert sorted(stamps) == ["top0/1_clip_top0.pt", "top1/1_clip_top1.pt", "top1/2_clip_top1.pt"]
    assert stamps["top0/1_clip_top0.pt"] == sweeps["stamps"]["top0/1_clip_top0.pt"]
    assert (models / "top1" / "2_clip_top1.test.json").is_file()
    history = (models / "top1" / "clip_top1.history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in history] == [1, 2]
    assert history[0] + "\n" == sweeps["history before"]  # epoch 1's line kept across the resume
    (line,) = error_lines(res)[-1:]
    assert "bad.env failed" in line and "no such image folder" in line, line
    assert "| top0/1_clip_top0 | 0 | 1 |" in res.stdout and "| top1/2_clip_top1 | 1 | 2 |" in res.stdout


def test_ctrl_c_stops_the_running_variant_cleanly_and_starts_no_other(sweeps):
    code, stderr = sweeps["stopped"]
    assert code == 130, stderr[-3000:]
    assert "same command" in stderr and "Traceback" not in stderr
    models = sweeps["stop_models"]
    assert not (models / "never").exists()
    assert leftover_temp_files(models / "slow") == []


# ---------------------------------------------------------------------------------------------
# In-process: what each variant's configuration is, and a child's reason line
# ---------------------------------------------------------------------------------------------

def test_a_variant_file_wins_over_the_environment_which_wins_over_the_base_file(base_env, tmp_path, monkeypatch):
    for k, v in base_env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("TOP_K")
    monkeypatch.setenv("EPOCHS", "7")
    base = write(tmp_path / "base.env", "TOP_K=2\nEPOCHS=5\nSEED=9\n")
    cfg = mtl.load_config(mtl.read_environment(str(base), False))
    variant = write(tmp_path / "v" / "small.env", "TOP_K=0\n")
    own = write(tmp_path / "own.env", f"OUTPUT_DIR_MODELS={tmp_path / 'elsewhere'}\n")
    small, mine = tools.sweep_variants([str(variant), str(own)], cfg)
    got = tools.variant_config(small, str(base), False)
    assert (got.top_k, got.epochs, got.seed) == (0, 7, 9)
    assert small.folder == Path(base_env["OUTPUT_DIR_MODELS"]) / "small" == Path(got.output_dir_models)
    assert mine.folder == tmp_path / "elsewhere" == Path(tools.variant_config(mine, str(base), False).output_dir_models)
    assert tools.variant_config(mine, str(base), False).top_k == 2


def test_missing_or_clashing_variant_files_are_usage_errors(config_from_env, tmp_path):
    cfg = config_from_env()
    a, b = write(tmp_path / "a" / "x.env", "TOP_K=0\n"), write(tmp_path / "b" / "x.env", "TOP_K=1\n")
    with pytest.raises(mtl.UserError, match="several files named x") as e:
        tools.sweep_variants([str(a), str(b)], cfg)
    assert e.value.exit_code == 2
    with pytest.raises(mtl.UserError, match="no such env file: .*nope.env") as e:
        tools.sweep_variants([str(a), str(tmp_path / "nope.env")], cfg)
    assert e.value.exit_code == 2


def test_a_childs_reason_is_its_last_error_on_one_line():
    stderr = ("\x1b[32m12:00:01 INFO   \x1b[0m config: ...\n"
              "epoch 1/3:  10%|#         | 3/30 [00:01<00:09]\repoch 1/3:  20%|##        | 6/30\r"
              "\x1b[31m12:00:02 ERROR  \x1b[0m invalid configuration:\n  - TOP_K=-1 must be >= 0\n"
              "  - EPOCHS='x' is not an integer\n12:00:03 INFO    W&B: offline\n")
    assert tools.error_reason(stderr) == "invalid configuration: - TOP_K=-1 must be >= 0 - EPOCHS='x' is not an integer"
    crash = "Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: CUDA error: out of memory\n"
    assert tools.error_reason(crash) == "RuntimeError: CUDA error: out of memory"
