"""Issue 6 — reliability and security: refuse bad input clearly, survive crashes, resume exactly, leak nothing.

Most checks run the script as a user would (a subprocess on the tiny fixtures, W&B offline). To stay fast
on two shared cores, runs that do not depend on each other go two at a time, and one run serves several
checks: run A (2 epochs, fake secrets planted) feeds the secrets scan, the resume, the NaN guard and the
determinism comparison with run D (the same configuration, no secrets, another folder)."""
from __future__ import annotations

import ast
import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import ROOT, draw, make_env, run_script, write_images

import multimodal_transfer_learning as mtl

SCRIPT = ROOT / "multimodal_transfer_learning.py"
HF_FAKE = "hf_FAKEtokenDoNotLeak7Qx9Zr2Lm4Np6Vb8"
WANDB_FAKE = "FAKEwandbKeyDoNotLeak0123456789abcdef0123"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------



def path_without_java(folder: Path) -> str:
    """PATH as it is, but with no `java`: the caption metrics then skip their JVM start-ups (PTB tokenizer,
    METEOR), which cost more CPU than the tiny training itself. Metrics are tested elsewhere."""
    dirs = []
    for i, d in enumerate(os.environ.get("PATH", "").split(os.pathsep)):
        if os.path.exists(os.path.join(d, "java")):
            shadow = folder / f"bin{i}"
            shadow.mkdir(parents=True, exist_ok=True)
            for name in os.listdir(d):
                if name != "java" and not os.path.lexists(shadow / name):
                    os.symlink(os.path.join(d, name), shadow / name)
            d = str(shadow)
        dirs.append(d)
    return os.pathsep.join(dirs)


def parallel(jobs: dict, workers: int = 2) -> dict:
    """Run independent jobs (callables) two at a time; subprocesses do the work, threads only wait."""
    with ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(fn) for name, fn in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def text(res) -> str:
    return ANSI.sub("", res.stderr + res.stdout)


def explain(res) -> str:
    return f"exit {res.returncode}\n--- stderr (tail) ---\n{res.stderr[-4000:]}\n--- stdout (tail) ---\n{res.stdout[-1000:]}"


def error_lines(res) -> list[str]:
    return [line for line in ANSI.sub("", res.stderr).splitlines() if " ERROR " in line]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def wandb_records(path: Path):
    """The records of an offline `run-*.wandb` file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"unexpected W&B file header {data[:7]!r}"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7: pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL/FIRST start a record, MIDDLE/LAST extend it
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def wandb_runs(wandb_dir: Path) -> dict[str, dict]:
    """{run id: {"exit_code": int | None}} for every offline run under wandb_dir."""
    runs = {}
    for f in Path(wandb_dir).rglob("run-*.wandb"):
        info = {"exit_code": None, "run_id": None}
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                info["run_id"] = r.run.run_id
            elif kind == "exit":
                info["exit_code"] = r.exit.exit_code
        runs.setdefault(info["run_id"], []).append(info)
    return runs


def leftover_temp_files(folder: Path) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(".tmp")] if folder.is_dir() else []


# ---------------------------------------------------------------------------------------------
# shared runs
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_lm_dir, tiny_clip_dir):
    """A dataset folder and an env factory for module-scoped runs."""
    root = tmp_path_factory.mktemp("reliability")
    data = root / "images"
    rows = write_images(data, 40)
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = path_without_java(root / "path")

    def env(name: str, **overrides) -> dict[str, str]:
        return make_env(root / name, tiny_lm_dir, tiny_clip_dir, data, PATH=path, **overrides)
    return root, env


@pytest.fixture(scope="module")
def trained(shared):
    """Run A (2 epochs, fake HF_TOKEN/WANDB_API_KEY, DEBUG logging so the most text is written) and
    run D (same config and SEED, no secrets) side by side, then A's --test."""
    root, env = shared
    env_a = env("A", HF_TOKEN=HF_FAKE, WANDB_API_KEY=WANDB_FAKE, LOG_LEVEL="DEBUG")
    env_d = env("D")
    res = parallel({"A train": lambda: run_script(["--train"], env_a),
                    "D train": lambda: run_script(["--train"], env_d)})
    assert res["A train"].returncode == 0, explain(res["A train"])
    assert res["D train"].returncode == 0, explain(res["D train"])
    res["A test"] = run_script(["--test"], env_a)
    assert res["A test"].returncode == 0, explain(res["A test"])
    return {"env_a": env_a, "env_d": env_d, "A": root / "A", "D": root / "D", **res}


@pytest.fixture(scope="module")
def resumed(trained, shared):
    """Runs that start from A's checkpoints: B = A's epoch 1 resumed to epoch 2; C = the same with absurd
    learning rates (the NaN guard); plus resumes that must refuse or find nothing to do."""
    root, env = shared
    ckpt1 = trained["A"] / "models" / "1_clip_top1.pt"
    for name in ("B", "C"):
        (root / name / "models").mkdir(parents=True)
        shutil.copy(ckpt1, root / name / "models" / ckpt1.name)
    env_b, env_c = env("B"), env("C", LR_ADAPTER="1e30", LR_QWEN="1e30")
    env_a = trained["env_a"]
    jobs = {
        "B run": lambda: run_script(["--train", "--resume"], env_b),
        "C run": lambda: run_script(["--train", "--resume"], env_c),
        "finished": lambda: run_script(["--train", "--resume"], env_a),
        "other TOP_K": lambda: run_script(["--train", "--resume", "--checkpoint", str(ckpt1)], {**env_a, "TOP_K": "2"}),
        "other NUM_VISUAL_TOKENS": lambda: run_script(["--train", "--resume"], {**env_a, "NUM_VISUAL_TOKENS": "3",
                                                                                 "EPOCHS": "3"}),
    }
    return {"B": root / "B", "C": root / "C", "ckpt1_sha": hashlib.sha256(ckpt1.read_bytes()).hexdigest(),
            **parallel(jobs)}


# ---------------------------------------------------------------------------------------------
# 1. validation before work
# ---------------------------------------------------------------------------------------------

BAD_VALUES = [
    ("TOP_K", "-1"), ("TOP_K", "two"), ("NUM_VISUAL_TOKENS", "0"), ("ADAPTER_HIDDEN", "-16"),
    ("MAX_CAPTION_TOKENS", "0"), ("BATCH_SIZE", "0"), ("BATCH_SIZE", "8.5"), ("GRAD_ACCUM", "0"), ("EPOCHS", "0"),
    ("EPOCHS", "three"), ("LR_ADAPTER", "0"), ("LR_ADAPTER", "-1e-3"), ("LR_QWEN", "nan"), ("LR_QWEN", "inf"),
    ("LR_QWEN", "fast"), ("WEIGHT_DECAY", "-0.1"), ("WARMUP_RATIO", "1"), ("GRAD_CLIP", "-1"), ("SEED", "-1"),
    ("SEED", str(2**63)), ("EVAL_BATCH_SIZE", "0"), ("VAL_CAPTION_IMAGES", "-1"), ("RETRIEVAL_POOL", "-3"),
    ("MAX_IMAGES", "-5"), ("MAX_BAD_FRACTION", "1.5"), ("MAX_BAD_FRACTION", "-0.1"), ("VISION_ENCODER", "resnet"),
    ("DECODING", "nucleus"), ("NUM_BEAMS", "0"), ("SAMPLE_TOP_K", "-1"), ("TEMPERATURE", "0"), ("TOP_P", "0"),
    ("TOP_P", "1.5"), ("NO_REPEAT_NGRAM", "-1"), ("MAX_NEW_TOKENS", "0"), ("DEVICE", "gpu"), ("DTYPE", "fp16"),
    ("NUM_WORKERS", "-2"), ("LOG_EVERY", "0"), ("LOG_LEVEL", "LOUD"), ("WANDB_MODE", "sometimes"),
    ("TRUST_REMOTE_CODE", "maybe"), ("COMPILE", "please"), ("DEMO_IMAGES", "0"), ("DATASET", ""),
    ("OUTPUT_DIR_MODELS", "{file}/models"), ("CACHE_DIR", "{file}/cache"),
]
EXPLAINS = re.compile(r"allowed|must be|is not (an integer|a number|a finite number|a boolean|writable)|is empty")


def _is_number(value: str) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return False


def minimal_env(tmp_path: Path, **values) -> dict[str, str]:
    return {"OUTPUT_DIR_MODELS": str(tmp_path / "models"), "CACHE_DIR": str(tmp_path / "cache"), **values}


@pytest.mark.parametrize("var,value", BAD_VALUES, ids=[f"{k}={v}" for k, v in BAD_VALUES])
def test_bad_value_is_refused_naming_variable_value_and_what_is_allowed(tmp_path, var, value):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    value = value.format(file=a_file)
    with pytest.raises(mtl.UserError) as err:
        mtl.load_config(minimal_env(tmp_path, **{var: value}))
    message = str(err.value)
    assert err.value.exit_code == 2
    assert var in message, message
    assert value in message or (_is_number(value) and repr(float(value)) in message), message  # as typed or parsed
    line = next(line for line in message.splitlines() if var in line)
    assert EXPLAINS.search(line), f"the message does not say what is allowed: {line}"


@pytest.mark.parametrize("var,value", [("TOP_K", "0"), ("MAX_BAD_FRACTION", "0"), ("WARMUP_RATIO", "0"),
                                       ("SEED", "0"), ("SEED", str(2**32 - 1)), ("LOG_LEVEL", "debug"),
                                       ("WANDB_MODE", "disabled"), ("DEVICE", "cuda:1"), ("PROMPT", ""),
                                       ("TRUST_REMOTE_CODE", "1"), ("HF_TOKEN", HF_FAKE)])
def test_edge_values_that_are_allowed_pass(tmp_path, var, value):
    cfg = mtl.load_config(minimal_env(tmp_path, **{var: value}))
    parsed = getattr(cfg, var.lower())
    expected = mtl._parse_value(value, type(parsed))
    assert parsed == expected or parsed == expected.upper(), (parsed, expected)


@pytest.mark.parametrize("var,value", [("HF_TOKEN", HF_FAKE[:12] + " " + HF_FAKE[12:]),
                                       ("WANDB_API_KEY", f'"{WANDB_FAKE}"')])
def test_bad_secret_is_refused_without_echoing_it(tmp_path, var, value):
    with pytest.raises(mtl.UserError) as err:
        mtl.load_config(minimal_env(tmp_path, **{var: value}))
    assert err.value.exit_code == 2 and var in str(err.value)
    assert HF_FAKE[:12] not in str(err.value) and WANDB_FAKE[:12] not in str(err.value), str(err.value)


def test_several_bad_values_are_reported_together_in_process(tmp_path):
    with pytest.raises(mtl.UserError) as err:
        mtl.load_config(minimal_env(tmp_path, EPOCHS="0", DECODING="topk", LR_QWEN="x"))
    assert all(s in str(err.value) for s in ("EPOCHS=0", "DECODING='topk'", "LR_QWEN='x'")), str(err.value)


def test_top_k_is_checked_against_the_lm_once_its_config_is_known(config_from_env):
    mtl.load_lm_config(config_from_env(top_k=2))  # 2 of 2 blocks: allowed
    with pytest.raises(mtl.UserError) as err:
        mtl.load_lm_config(config_from_env(top_k=3))
    assert err.value.exit_code == 2 and "TOP_K=3" in str(err.value) and "0..2" in str(err.value)


@pytest.fixture(scope="module")
def cli_failures(shared):
    """Every expected failure of the command line, as subprocesses two at a time."""
    root, env = shared
    base = root / "fail"
    a_file = base / "a_file"
    base.mkdir()
    a_file.write_text("not a folder")
    garbage = base / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 20)
    buf = io.BytesIO()
    torch.save({"format": 1, "model": {"w": torch.arange(5000.0)}}, buf)
    truncated = base / "truncated.pt"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    others = env("others")
    (Path(others["OUTPUT_DIR_MODELS"])).mkdir(parents=True)
    (Path(others["OUTPUT_DIR_MODELS"]) / "3_vit_top2.pt").write_bytes(b"")
    e = env("fail")
    cases = {
        "several bad values": (["--train"], {**e, "TOP_K": "-1", "EPOCHS": "zero", "LR_ADAPTER": "nan",
                                             "DECODING": "nucleus", "VISION_ENCODER": "resnet",
                                             "OUTPUT_DIR_MODELS": str(a_file / "models"),
                                             "HF_TOKEN": HF_FAKE + " x", "LM_MODEL": "Qwen/Qwen3-0.6B-Base"}),
        "TOP_K=99": (["--train"], {**e, "TOP_K": "99"}),
        "env file missing": (["--train", "--env-file", str(base / "ablation.env")], e),
        "dataset missing": (["--train"], {**e, "DATASET": str(base / "no-such-images")}),
        "hub offline, uncached": (["--train"], {**e, "LM_MODEL": "Qwen/Qwen3-0.6B-Base"}),
        "hub offline, misspelled": (["--train"], {**e, "VISION_MODEL": "openai/clip-vit-base-patch3"}),
        "local model dir missing": (["--train"], {**e, "LM_MODEL": str(base / "no-such-model")}),
        "--test without checkpoint": (["--test"], others),
        "--checkpoint missing": (["--test", "--checkpoint", str(base / "nope.pt")], e),
        "--checkpoint garbage": (["--test", "--checkpoint", str(garbage)], e),
        "--checkpoint truncated": (["--caption", str(garbage), "--checkpoint", str(truncated)], e),
        "--debug shows the traceback": (["--test", "--debug", "--checkpoint", str(garbage)], e),
        "LOG_LEVEL=DEBUG shows the traceback": (["--train"], {**e, "LM_MODEL": "Qwen/Qwen3-0.6B-Base",
                                                              "LOG_LEVEL": "DEBUG"}),
    }
    # A hub that cannot be reached (not offline mode): the client retries with back-off for ~25 s, mostly
    # asleep, so that run waits in a thread of its own while the others go two at a time.
    unreachable = {k: v for k, v in e.items() if k != "HF_HUB_OFFLINE"}
    unreachable.update(LM_MODEL="Qwen/Qwen3-0.6B-Base", HF_ENDPOINT="http://127.0.0.1:9")
    with ThreadPoolExecutor(1) as waiting:
        slow = waiting.submit(run_script, ["--train"], unreachable)
        results = parallel({name: (lambda a=args, v=env_: run_script(a, v)) for name, (args, env_) in cases.items()})
        results["hub unreachable"] = slow.result()
    return results


def test_several_bad_values_exit_2_all_named_before_any_download(cli_failures):
    res = cli_failures["several bad values"]
    out = text(res)
    assert res.returncode == 2, explain(res)
    for s in ("TOP_K=-1", "EPOCHS='zero'", "LR_ADAPTER='nan'", "DECODING='nucleus'", "VISION_ENCODER='resnet'",
              "OUTPUT_DIR_MODELS=", "HF_TOKEN"):
        assert s in out, f"{s} not reported:\n{out}"
    assert "Traceback" not in out and HF_FAKE[:12] not in out and HF_FAKE[12:] not in out
    assert "could not be fetched" not in out  # nothing was looked up on the hub before the config was judged


def test_top_k_beyond_the_lm_exits_2(cli_failures):
    res = cli_failures["TOP_K=99"]
    assert res.returncode == 2, explain(res)
    assert "TOP_K=99" in text(res) and "0..2" in text(res) and "Traceback" not in text(res)


# ---------------------------------------------------------------------------------------------
# 2. clear external failures
# ---------------------------------------------------------------------------------------------

EXTERNAL = {  # case: (exit code, what the one line must say)
    "env file missing": (2, ["--env-file", "ablation.env", "no such file"]),
    "dataset missing": (1, ["DATASET=", "no-such-images", "no such image folder"]),
    "hub unreachable": (1, ["LM_MODEL=Qwen/Qwen3-0.6B-Base", "could not be fetched", "no network",
                            "hf download Qwen/Qwen3-0.6B-Base --local-dir DIR", "set LM_MODEL=DIR"]),
    "hub offline, uncached": (1, ["LM_MODEL=Qwen/Qwen3-0.6B-Base", "HF_HUB_OFFLINE",
                                  "hf download Qwen/Qwen3-0.6B-Base --local-dir DIR", "set LM_MODEL=DIR"]),
    "hub offline, misspelled": (1, ["VISION_MODEL=openai/clip-vit-base-patch3", "misspelled",
                                    "set VISION_MODEL=DIR"]),
    "local model dir missing": (1, ["LM_MODEL=", "no-such-model", "no such local directory"]),
    "--test without checkpoint": (1, ["no checkpoint {epoch}_clip_top1.pt", "3_vit_top2.pt", "--checkpoint"]),
    "--checkpoint missing": (1, ["nope.pt", "no such file"]),
    "--checkpoint garbage": (1, ["garbage.pt", "not a readable checkpoint"]),
    "--checkpoint truncated": (1, ["truncated.pt", "not a readable checkpoint"]),
}


@pytest.mark.parametrize("case", list(EXTERNAL))
def test_external_failure_is_one_line_with_the_fix(cli_failures, case):
    res = cli_failures[case]
    code, needles = EXTERNAL[case]
    assert res.returncode == code, explain(res)
    errors = error_lines(res)
    assert len(errors) == 1, explain(res)
    for s in needles:
        assert s in errors[0], f"{s!r} missing from: {errors[0]}"
    assert "Traceback" not in res.stderr, explain(res)
    after = ANSI.sub("", res.stderr).split(errors[0].split(" ERROR ")[1], 1)[1].strip()
    assert not after, f"the error runs past one line: {after[:500]}"


@pytest.mark.parametrize("case", ["--debug shows the traceback", "LOG_LEVEL=DEBUG shows the traceback"])
def test_debug_shows_the_traceback(cli_failures, case):
    res = cli_failures[case]
    assert res.returncode == 1, explain(res)
    assert "Traceback (most recent call last)" in res.stderr and error_lines(res), explain(res)


# ---------------------------------------------------------------------------------------------
# 3. bad data
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_data(shared):
    """40 good images + a missing file, a truncated PNG, a text file named .png and a row whose captions
    are all blank: 4 of 44 bad (9%)."""
    root, env = shared
    folder = root / "bad_images"
    rows = write_images(folder, 40)
    png = io.BytesIO()
    draw("red", "square").save(png, format="PNG")
    (folder / "img" / "corrupt.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (folder / "img" / "text.png").write_text("this is not an image\n")
    draw("blue", "circle").save(folder / "img" / "blank.png")
    rows += [{"file_name": "img/missing.png", "captions": ["a red circle"]},
             {"file_name": "img/corrupt.png", "captions": ["a red square"]},
             {"file_name": "img/text.png", "captions": ["a green circle"]},
             {"file_name": "img/blank.png", "captions": ["", "  "]}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env_ok = env("bad_ok", DATASET=folder, MAX_BAD_FRACTION="0.2", EPOCHS="1")
    env_stop = env("bad_stop", DATASET=folder)
    return {"env ok": env_ok, "env stop": env_stop,
            **parallel({"ok": lambda: run_script(["--train"], env_ok), "stop": lambda: run_script(["--train"], env_stop)})}


BAD_IDS = ("img/missing.png", "img/corrupt.png", "img/text.png", "img/blank.png")


def test_bad_records_are_skipped_and_reported_and_training_proceeds(bad_data):
    res = bad_data["ok"]
    assert res.returncode == 0, explain(res)
    out = text(res)
    assert "skipped 4 of 44 images" in out, explain(res)
    for i in BAD_IDS:
        assert i in out, f"{i} not named in the report"
    sizes = re.search(r"data: train (\d+) images / \d+ captions, val (\d+) images / \d+ captions, test (\d+) images", out)
    assert sizes and sum(map(int, sizes.groups())) == 40, sizes  # all 40 good images, and only those, are used
    ckpt = torch.load(Path(bad_data["env ok"]["OUTPUT_DIR_MODELS"]) / "1_clip_top1.pt", weights_only=True)
    assert ckpt["epoch"] == 1


def test_too_much_bad_data_stops_with_a_clear_error(bad_data):
    res = bad_data["stop"]
    assert res.returncode == 1, explain(res)
    (line,) = error_lines(res)
    assert "9.1%" in line and "MAX_BAD_FRACTION=0.05" in line, line
    assert "Traceback" not in res.stderr
    assert not list(Path(bad_data["env stop"]["OUTPUT_DIR_MODELS"]).glob("*.pt"))


# ---------------------------------------------------------------------------------------------
# 4. atomic checkpoints
# ---------------------------------------------------------------------------------------------

class _DiskFullAfter:
    """A real file that accepts `limit` bytes and then fails as a full disk (or a Ctrl-C) would."""

    def __init__(self, fh, limit: int, exc: BaseException):
        self.fh, self.limit, self.exc, self.written = fh, limit, exc, 0

    def write(self, data):
        data = bytes(data)
        if self.written + len(data) > self.limit:
            part = data[: self.limit - self.written]
            self.fh.write(part)
            self.fh.flush()
            self.written += len(part)
            raise self.exc
        self.written += len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


@pytest.mark.parametrize("old", [False, True], ids=["new file", "overwrite"])
@pytest.mark.parametrize("failure", ["disk full mid-write", "Ctrl-C mid-write", "pickling error"])
def test_interrupted_save_never_leaves_a_truncated_file(tmp_path, monkeypatch, failure, old):
    path = tmp_path / "ckpts" / "1_clip_top1.pt"
    before = None
    if old:
        mtl.atomic_save({"format": 1, "model": {"w": torch.ones(3)}}, path)
        before = path.read_bytes()
    payload = {"format": 1, "model": {"w": torch.randn(20_000)}}
    opened = []
    if failure == "pickling error":
        payload["bad"] = _Unpicklable()
    else:
        exc = OSError(errno.ENOSPC, "No space left on device") if failure.startswith("disk") else KeyboardInterrupt()

        class OsWithFailingFiles:  # only the script's own `os` sees it
            def __getattr__(self, name):
                return getattr(os, name)

            def fdopen(self, fd, *args, **kwargs):
                opened.append(_DiskFullAfter(os.fdopen(fd, *args, **kwargs), 10_000, exc))
                return opened[-1]
        monkeypatch.setattr(mtl, "os", OsWithFailingFiles())
    with pytest.raises(BaseException) as raised:
        mtl.atomic_save(payload, path)
    if failure.startswith("disk"):  # one clear line for the user, not a traceback
        assert isinstance(raised.value, mtl.UserError) and "could not write" in str(raised.value)
    else:
        assert not isinstance(raised.value, mtl.UserError)
    if opened:
        assert opened[0].written == 10_000  # the failure really came mid-write
    if old:
        assert path.read_bytes() == before
        assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.ones(3))
    else:
        assert not path.exists()
    assert leftover_temp_files(path.parent) == [], os.listdir(path.parent)


def test_a_completed_save_is_complete(tmp_path):
    path = tmp_path / "2_clip_top1.pt"
    obj = {"format": 1, "model": {"w": torch.randn(1000)}, "epoch": 2}
    mtl.atomic_save(obj, path)
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], obj["model"]["w"])
    assert leftover_temp_files(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 5. exact resume
# ---------------------------------------------------------------------------------------------

def test_resume_gives_the_same_weights_as_an_uninterrupted_run(trained, resumed):
    res = resumed["B run"]
    assert res.returncode == 0, explain(res)
    assert "resuming from" in text(res) and "epoch 2/2" in text(res) and "epoch 1/2" not in text(res)
    a1 = torch.load(trained["A"] / "models" / "1_clip_top1.pt", weights_only=True)
    a2 = torch.load(trained["A"] / "models" / "2_clip_top1.pt", weights_only=True)
    b2 = torch.load(resumed["B"] / "models" / "2_clip_top1.pt", weights_only=True)
    assert set(a2["model"]) == set(b2["model"])
    diff = max((a2["model"][k] - b2["model"][k]).abs().max().item() for k in a2["model"])
    assert diff <= 1e-6, f"max weight difference {diff}"
    assert not torch.equal(a1["model"]["adapter.net.0.weight"], b2["model"]["adapter.net.0.weight"])  # it trained
    assert b2["step"] == a2["step"] and b2["epoch"] == 2
    for (ka, sa), (kb, sb) in zip(sorted(a2["optimizer"]["state"].items()), sorted(b2["optimizer"]["state"].items())):
        for name in sa:
            assert torch.allclose(torch.as_tensor(sa[name]), torch.as_tensor(sb[name]), atol=1e-6), (ka, name)
    assert b2["metrics"]["loss"] == pytest.approx(a2["metrics"]["loss"], abs=1e-6)
    # the same W&B run continues
    assert b2["wandb_run_id"] == a1["wandb_run_id"]
    runs = wandb_runs(resumed["B"] / "wandb")
    assert list(runs) == [a1["wandb_run_id"]], runs


def test_resuming_a_finished_run_says_so(resumed, trained):
    res = resumed["finished"]
    assert res.returncode == 0, explain(res)
    assert "nothing to resume" in text(res)
    assert sorted(p.name for p in (trained["A"] / "models").glob("*.pt")) == ["1_clip_top1.pt", "2_clip_top1.pt"]


@pytest.mark.parametrize("case,needle", [("other TOP_K", "TOP_K=2 (checkpoint: 1)"),
                                         ("other NUM_VISUAL_TOKENS", "NUM_VISUAL_TOKENS=3 (checkpoint: 2)")])
def test_resume_with_another_model_configuration_names_the_difference(resumed, case, needle):
    res = resumed[case]
    assert res.returncode == 2, explain(res)
    (line,) = error_lines(res)
    assert needle in line and "--resume" in line, line


# ---------------------------------------------------------------------------------------------
# 6. signals
# ---------------------------------------------------------------------------------------------

def _interrupt(env: dict, sig: int, wait_for: str, whole_group: bool, timeout=240):
    """Start --train, wait until `wait_for` is logged, send `sig`; return (exit code, stderr)."""
    folder = Path(env["CACHE_DIR"]).parent
    folder.mkdir(parents=True, exist_ok=True)
    err_path = folder / "stderr.txt"
    with open(err_path, "w") as err, open(folder / "stdout.txt", "w") as out:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "--train"], env=env, cwd=folder, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while wait_for not in err_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert proc.poll() is None, f"ended before {wait_for!r}:\n{err_path.read_text()[-3000:]}"
            assert wait_for in err_path.read_text(), f"never reached {wait_for!r}"
            # Ctrl-C in a terminal reaches the whole foreground group (W&B's helper too); `kill` one process
            os.killpg(proc.pid, sig) if whole_group else proc.send_signal(sig)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return code, err_path.read_text()


@pytest.fixture(scope="module")
def interrupted(shared):
    root, env = shared
    env_int, env_term = env("SIGINT", EPOCHS="50"), env("SIGTERM", EPOCHS="50")
    res = parallel({"SIGINT": lambda: _interrupt(env_int, signal.SIGINT, "epoch 1/50", whole_group=True),
                    "SIGTERM": lambda: _interrupt(env_term, signal.SIGTERM, "epoch 2/50", whole_group=False)})
    return {"SIGINT": (*res["SIGINT"], env_int), "SIGTERM": (*res["SIGTERM"], env_term)}


@pytest.mark.parametrize("sig,expected", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_stops_cleanly_with_a_resume_hint(interrupted, sig, expected):
    code, stderr, env = interrupted[sig]
    assert code == expected, stderr[-3000:]
    assert "--train --resume" in stderr and "Traceback" not in stderr, stderr[-3000:]
    models = Path(env["OUTPUT_DIR_MODELS"])
    assert leftover_temp_files(models) == []
    saved = sorted(models.glob("*.pt"))
    for p in saved:
        assert torch.load(p, weights_only=True)["format"] == 1
    if sig == "SIGTERM":  # it was stopped in epoch 2: epoch 1's checkpoint is there, whole
        assert [p.name for p in saved] == ["1_clip_top1.pt"]
    # the W&B run was finished and marked with the exit code
    runs = wandb_runs(Path(env["WANDB_DIR"]))
    assert [r["exit_code"] for rs in runs.values() for r in rs] == [expected], runs


# ---------------------------------------------------------------------------------------------
# 7. numerical guard
# ---------------------------------------------------------------------------------------------

def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(resumed):
    res = resumed["C run"]
    assert res.returncode == 1, explain(res)
    out = text(res)
    assert "LR_ADAPTER=1e+30 (checkpoint: 0.001)" in out  # the new learning rate applies, and it is said so
    (line,) = error_lines(res)
    assert re.search(r"loss became (nan|inf|-inf) at step \d+ \(epoch 2\)", line), line
    models = resumed["C"] / "models"
    assert sorted(p.name for p in models.glob("*.pt")) == ["1_clip_top1.pt"]
    assert hashlib.sha256((models / "1_clip_top1.pt").read_bytes()).hexdigest() == resumed["ckpt1_sha"]
    assert all(torch.isfinite(w).all() for w in weights(models / "1_clip_top1.pt").values())
    runs = wandb_runs(resumed["C"] / "wandb")
    assert [r["exit_code"] for rs in runs.values() for r in rs] == [1], runs


def test_non_finite_weights_after_a_finite_loss_are_never_checkpointed(tiny_model, tmp_path):
    """The last step of an epoch can have a finite loss but non-finite gradients (an overflow): the
    epoch must not end as if all were well, or its checkpoint would hold NaN weights."""
    import wandb
    cfg, encoder, model = tiny_model(batch_size=64)
    captions = ["a red circle", "a blue square", "the circle is green", "a photo of a yellow square"]
    pairs = list(zip(range(4), model.tokenize_captions(captions)))
    split = mtl.Split([f"i{n}" for n in range(4)], torch.randn(4, encoder.dim), [[c] for c in captions], pairs)
    opt = mtl.make_optimizer(model, cfg)
    for p in model.adapter.parameters():
        p.register_hook(lambda g: g * float("inf"))  # every gradient overflows, the loss stays finite
    run = wandb.init(mode="disabled")
    try:
        with pytest.raises(mtl.UserError) as err:
            mtl.train_epoch(model, opt, split, cfg, 1, {"step": 0}, run)
    finally:
        run.finish()
    assert "non-finite" in str(err.value) and "step 1" in str(err.value), str(err.value)


# ---------------------------------------------------------------------------------------------
# 8. secrets
# ---------------------------------------------------------------------------------------------

def test_secrets_never_reach_output_logs_wandb_checkpoints_or_results(trained):
    console = "".join(trained[k].stdout + trained[k].stderr for k in ("A train", "A test"))
    for token in (HF_FAKE, WANDB_FAKE):
        assert token not in console
    assert "W&B: offline run" in console and "test results" in console  # both runs really logged and wrote
    env = trained["env_a"]
    folders = [Path(env[k]) for k in ("OUTPUT_DIR_MODELS", "CACHE_DIR", "WANDB_DIR", "HF_HOME")]
    scanned, leaks = 0, []
    for folder in folders:
        for p in folder.rglob("*"):
            if p.is_file() and not p.is_symlink():
                data = p.read_bytes()
                scanned += 1
                for token in (HF_FAKE, WANDB_FAKE):
                    # also the halves, in case a token were split or partly masked
                    for piece in (token, token[: len(token) // 2], token[len(token) // 2:]):
                        if piece.encode() in data or piece.encode("utf-16-le") in data:
                            leaks.append((str(p), piece))
    assert not leaks, leaks
    names = {p.name for f in folders for p in f.rglob("*")}
    assert {"2_clip_top1.pt", "2_clip_top1.test.json", "2_clip_top1.test_captions.jsonl"} <= names
    assert any(n.endswith(".wandb") for n in names) and any(n.startswith("clip-") for n in names)
    assert scanned >= 10


def test_torch_load_is_always_weights_only_and_remote_code_is_never_hardwired():
    tree = ast.parse(SCRIPT.read_text())
    loads, remote = 0, []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if func == "torch.load":
            loads += 1
            assert kw.get("weights_only") == "True", f"line {node.lineno}: torch.load without weights_only=True"
        if "trust_remote_code" in kw:
            remote.append((node.lineno, kw["trust_remote_code"]))
    assert loads >= 2
    assert remote and all(v == "cfg.trust_remote_code" for _, v in remote), remote


@pytest.mark.parametrize("flag", [None, "1"])
def test_trust_remote_code_follows_the_variable(tiny_model, monkeypatch, flag):
    """Spy on every real from_pretrained call while the tiny model is built."""
    import transformers
    calls = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM,
                transformers.AutoImageProcessor, transformers.CLIPModel):
        original = cls.from_pretrained

        def spy(name, *args, _original=original, _cls=cls.__name__, **kwargs):
            calls.append((_cls, str(name), kwargs.get("trust_remote_code")))
            return _original(name, *args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", spy)
    cfg, _, _ = tiny_model(**({"trust_remote_code": flag} if flag else {}))
    assert {c for c, _, _ in calls} >= {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "CLIPModel"}
    if flag is None:
        assert cfg.trust_remote_code is False and not any(v for _, _, v in calls), calls
    else:  # only the LM's loaders get it (the encoders are transformers' own CLIP/ViT classes)
        lm_calls = [v for c, name, v in calls if name == cfg.lm_model]
        assert len(lm_calls) >= 3 and all(v is True for v in lm_calls), calls
        assert not any(v for c, name, v in calls if name != cfg.lm_model), calls


# ---------------------------------------------------------------------------------------------
# 9. determinism
# ---------------------------------------------------------------------------------------------

def test_same_seed_gives_bit_identical_checkpoints(trained):
    for name in ("1_clip_top1.pt", "2_clip_top1.pt"):
        a, d = weights(trained["A"] / "models" / name), weights(trained["D"] / "models" / name)
        assert set(a) == set(d) and a
        different = [k for k in a if not torch.equal(a[k], d[k])]
        assert not different, f"{name}: {different}"
