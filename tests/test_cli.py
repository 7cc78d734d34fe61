"""The commands as a user runs them (subprocesses on the tiny fixtures, W&B offline, stdin closed):
--train then --test end to end, what --test writes, --caption on every kind of image file, every
expected failure as one line that names the fix (a traceback only with --debug or LOG_LEVEL=DEBUG),
Ctrl-C and SIGTERM stopping cleanly with a resume hint, no secret in anything a run writes, the
zero-shot baseline (--test --untrained) and the options that go only with certain commands.

To stay fast on two shared cores, runs that do not depend on each other go two at a time, and one run
serves several checks (see `trained` in conftest.py)."""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

import multimodal_transfer_learning as mtl
from conftest import (ANSI, FIXTURE_PROJECTIONS, HF_FAKE, SCRIPT, WANDB_FAKE, WORDS, draw, error_lines, explain,
                      leftover_temp_files, lora_names_and_shapes, parallel, qformer_checkpoint, run_script, text,
                      wandb_records, wandb_runs)


# ---------------------------------------------------------------------------------------------
# --train, then --test
# ---------------------------------------------------------------------------------------------

def test_train_then_test_writes_checkpoints_and_results(base_env, tmp_path):
    res = run_script(["--train"], base_env)
    assert res.returncode == 0, res.stderr[-3000:]
    models = tmp_path / "models"
    assert sorted(p.name for p in models.glob("*.pt")) == ["1_clip_top1.pt", "2_clip_top1.pt"]
    ckpt = torch.load(models / "2_clip_top1.pt", weights_only=True)
    keys = set(ckpt["model"])
    assert keys and all(k.startswith(("adapter.", "lm.model.layers.1.")) for k in keys), sorted(keys)
    assert ckpt["epoch"] == 2 and ckpt["config"]["top_k"] == 1 and "loss" in ckpt["metrics"]
    assert "hf_token" not in ckpt["config"] and "wandb_api_key" not in ckpt["config"]

    res = run_script(["--test"], base_env)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((models / "2_clip_top1.test.json").read_text())
    for key in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "Recall@1", "Recall@5", "Precision@1",
                "Precision@5", "loss", "num_images"):
        assert key in result["metrics"], key
    lines = (models / "2_clip_top1.test_captions.jsonl").read_text().splitlines()
    assert len(lines) == result["metrics"]["num_images"] == result["num_test_images"]
    first = json.loads(lines[0])
    assert set(first) == {"image_id", "generated", "references", "CIDEr", "BLEU-4"} and first["references"]
    assert "Recall@1" in res.stdout and "CIDEr" in res.stdout
    assert (models / "results.csv").read_text().count("\n") == 2


# ---------------------------------------------------------------------------------------------
# --test: what it writes
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def checkpoint(tiny_model):
    """A checkpoint written by the script's own save_checkpoint, no training run needed. Its trainable
    weights (adapter, top block) are re-drawn large, so captions are not all empty."""
    cfg, _, model = tiny_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad and p.dim() == 2):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return mtl.save_checkpoint(model, mtl.make_optimizer(model, cfg), cfg, 1, 0, {"loss": 0.0}, None)


def coco_scores_without_java(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr from pycocoevalcap's scorers called directly, on the tokens of the
    Python tokenizer that replaces PTB when Java is missing (no METEOR without Java)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    gts = {k: [mtl._simple_tokenize(c) for c in references[k]] for k in predictions}
    res = {k: [mtl._simple_tokenize(predictions[k])] for k in predictions}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {**{f"BLEU-{n + 1}": b for n, b in enumerate(bleu)}, "ROUGE-L": Rouge().compute_score(gts, res)[0],
            "CIDEr": Cider().compute_score(gts, res)[0]}


METRIC_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "Recall@1", "Recall@5",
               "Precision@1", "Precision@5", "T2I-Recall@1", "T2I-Recall@5", "loss", "num_images")


def test_test_command_writes_every_metric_and_one_results_row_per_run(base_env, tmp_path, checkpoint):
    models = tmp_path / "models"
    res = run_script(["--test"], base_env)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((models / "1_clip_top1.test.json").read_text())
    metrics = result["metrics"]
    assert set(METRIC_KEYS) <= set(metrics)
    java = mtl.shutil.which("java") is not None
    assert isinstance(metrics["METEOR"], float) if java else metrics["METEOR"] is None
    n_test = result["num_test_images"]
    assert n_test == 4 and metrics["num_images"] == n_test  # 40 images, 10% test; TEST_CAPTION_IMAGES=0: all
    assert metrics["retrieval_pool"] == min(int(base_env["RETRIEVAL_POOL"]), n_test) == 3
    assert result["decoding"] == {"max_new_tokens": 6, "no_repeat_ngram_size": 3, "do_sample": False, "num_beams": 1}
    assert result["epoch"] == 1 and result["checkpoint"].endswith("1_clip_top1.pt")
    assert "retrieval pool 3" in res.stdout and "T2I-Recall@1" in res.stdout

    rows = [json.loads(line) for line in (models / "1_clip_top1.test_captions.jsonl").read_text().splitlines()]
    assert len(rows) == n_test and len({r["image_id"] for r in rows}) == n_test
    assert all(len(r["references"]) == 3 and isinstance(r["generated"], str) for r in rows)

    # Second run without Java (and beam search): METEOR missing, not 0; the rest equal to the COCO
    # scorers' numbers on the captions file; the results table gains an aligned row.
    env = {**base_env, "PATH": str(Path(sys.executable).parent), "DECODING": "beam", "NUM_BEAMS": "2"}
    res = run_script(["--test"], env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("Java not found") == 1
    result = json.loads((models / "1_clip_top1.test.json").read_text())
    assert result["metrics"]["METEOR"] is None and result["decoding"]["num_beams"] == 2
    rows = [json.loads(line) for line in (models / "1_clip_top1.test_captions.jsonl").read_text().splitlines()]
    expected = coco_scores_without_java({r["image_id"]: r["generated"] for r in rows},
                                        {r["image_id"]: r["references"] for r in rows})
    for key, value in expected.items():
        assert result["metrics"][key] == pytest.approx(value, abs=1e-9), key

    with open(models / "results.csv", newline="") as fh:
        table = list(csv.reader(fh))
    assert len(table) == 3 and table[0] == list(mtl.RESULT_COLUMNS)
    assert all(len(row) == len(table[0]) for row in table)
    first, second = (dict(zip(table[0], row)) for row in table[1:])
    assert first["decoding"] == "greedy" and second["decoding"] == "beam"
    assert second["METEOR"] == "" and (first["METEOR"] != "") == java
    assert first["retrieval_pool"] == second["retrieval_pool"] == "3"
    assert float(second["CIDEr"]) == pytest.approx(result["metrics"]["CIDEr"])


# ---------------------------------------------------------------------------------------------
# --caption
# ---------------------------------------------------------------------------------------------

def write_every_kind_of_image(folder: Path) -> dict[str, Path]:
    """The same picture as RGB, grayscale, RGBA (transparent), palette, CMYK and a 5000x4000 JPEG."""
    folder.mkdir()
    base = draw("red", "circle", 64)
    paths = {name: folder / name for name in ("rgb.png", "gray.png", "rgba.png", "palette.png", "cmyk.jpg",
                                               "large.jpg")}
    base.save(paths["rgb.png"])
    base.convert("L").save(paths["gray.png"])
    rgba = base.convert("RGBA")
    rgba.putalpha(0)  # fully transparent but for one opaque square
    rgba.paste((0, 0, 255, 255), (0, 0, 32, 32))
    rgba.save(paths["rgba.png"])
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette.save(paths["palette.png"], transparency=0)
    base.convert("CMYK").save(paths["cmyk.jpg"])
    base.resize((5000, 4000)).save(paths["large.jpg"], quality=70)
    return paths


def test_caption_command_on_every_kind_of_image_and_bad_files(base_env, tmp_path, checkpoint):
    images = write_every_kind_of_image(tmp_path / "mine")
    assert {Image.open(p).mode for p in images.values()} == {"RGB", "L", "RGBA", "P", "CMYK"}
    missing = tmp_path / "mine" / "missing.jpg"
    not_an_image = tmp_path / "mine" / "notes.jpg"
    not_an_image.write_text("this is not a JPEG\n")
    good = [str(p) for p in images.values()]
    args = [good[0], str(missing), *good[1:3], str(not_an_image), *good[3:]]

    res = run_script(["--caption", *args], base_env)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    lines = res.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == good  # one line per good image, in order
    assert all(line.count("\t") == 1 for line in lines)
    errors = [line for line in res.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 2, res.stderr[-3000:]
    assert str(missing) in errors[0] and "no such file" in errors[0]
    assert str(not_an_image) in errors[1] and "cannot read image" in errors[1]

    res = run_script(["--caption", *good], base_env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout == "".join(lines[i] + "\n" for i in range(len(good)))  # same captions again
    assert "ERROR" not in res.stderr and "no_repeat_ngram_size" not in res.stderr  # no transformers noise


# ---------------------------------------------------------------------------------------------
# ADAPTER=qformer end to end, with each encoder (the runs of `qformer_runs` in conftest.py)
# ---------------------------------------------------------------------------------------------

VISION_WIDTH = {"clip": 32, "vit": 40}  # the tiny towers' hidden sizes; 32 x 32 images in 8 x 8 patches: 17 tokens


def wandb_config(run_file: Path) -> dict:
    """The config an offline W&B run recorded: {key: value}."""
    config = {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        items = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        config.update({item.key: json.loads(item.value_json) for item in items})
    return config


@pytest.mark.parametrize("kind", ["clip", "vit"])
def test_qformer_trains_and_every_output_carries_the_variant(qformer_runs, kind):
    res = qformer_runs[kind, "A"]
    banner = f"adapter: qformer, 2 queries x 2 layers cross-attending 17 patch tokens of width {VISION_WIDTH[kind]}"
    assert banner in text(res) and "patch tokens: encoded 40 images" in text(res)
    models = qformer_runs["root"] / kind / "A" / "models"
    assert sorted(p.name for p in models.glob("*.pt")) == [f"1_{kind}_qformer_top1.pt", f"2_{kind}_qformer_top1.pt"]
    first, last = (qformer_checkpoint(qformer_runs, kind, "A", epoch) for epoch in (1, 2))
    assert (last["config"]["adapter"], last["config"]["qformer_layers"]) == ("qformer", 2)
    keys = set(last["model"])
    assert {"adapter.queries", "adapter.blocks.1.cross_attention.in_proj_weight", "adapter.projection.weight"} <= keys
    assert all(k.startswith(("adapter.", "lm.model.layers.1.")) for k in keys), sorted(keys)
    assert not torch.equal(first["model"]["adapter.queries"], last["model"]["adapter.queries"])  # it trained
    configs = [wandb_config(f) for f in (qformer_runs["root"] / kind / "A" / "wandb").rglob("run-*.wandb")]
    assert len(configs) == 2  # --train and --test
    assert all((c["adapter"], c["qformer_layers"], c["vision_encoder"]) == ("qformer", 2, kind) for c in configs)


@pytest.mark.parametrize("kind", ["clip", "vit"])
def test_qformer_checkpoint_tests_and_records_its_variant(qformer_runs, kind):
    res = qformer_runs[kind, "test"]
    assert res.returncode == 0, explain(res)
    assert "patch tokens: read 40 images, from cache" in text(res)
    models = qformer_runs["root"] / kind / "A" / "models"
    result = json.loads((models / f"2_{kind}_qformer_top1.test.json").read_text())
    assert result["config"]["adapter"] == "qformer" and {"CIDEr", "Recall@1", "loss"} <= set(result["metrics"])
    with open(models / "results.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert (row["checkpoint"], row["vision_encoder"], row["adapter"], row["qformer_layers"]) == \
        (f"2_{kind}_qformer_top1.pt", kind, "qformer", "2")


@pytest.mark.parametrize("kind", ["clip", "vit"])
def test_qformer_captions_and_explains_where_its_queries_look(qformer_runs, kind):
    res = qformer_runs[kind, "explain"]
    assert res.returncode == 1, explain(res)  # one of the two images is missing
    (line,) = res.stdout.splitlines()
    path, caption = line.split("\t")
    assert path == str(qformer_runs["image"]) and caption
    picture = qformer_runs["root"] / kind / "A" / "models" / f"2_{kind}_qformer_top1.explain" / "photo.png"
    assert f"{path}: where the queries look -> {picture}" in text(res)
    with Image.open(picture) as png:
        assert png.format == "PNG" and png.size == (448, 20 + 224 + 112)  # 2 queries: one row of small panels
    (error,) = error_lines(res)
    assert "missing.png: no such file" in error


def test_explain_needs_a_qformer_checkpoint(base_env, checkpoint, tmp_path):
    image = tmp_path / "photo.png"
    draw("red", "circle").save(image)
    res = run_script(["--caption", "--explain", str(image)], base_env)
    assert res.returncode == 2, explain(res)
    (line,) = error_lines(res)
    assert "--explain" in line and f"{checkpoint} has ADAPTER=mlp" in line and "ADAPTER=qformer" in line
    assert res.stdout == "" and not checkpoint.with_suffix(".explain").exists()
    with pytest.raises(SystemExit) as e:
        mtl.parse_args(["--test", "--explain"])
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------
# Expected failures: refused before any work, or one line that names the fix
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_failures(shared_env):
    """Every expected failure of the command line, as subprocesses two at a time."""
    root, env = shared_env
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
        "QLORA=1 on CPU": (["--train"], {**e, "TUNING": "lora", "QLORA": "1", "LM_MODEL": "Qwen/Qwen3-0.6B-Base",
                                         "DATASET": "lmms-lab/flickr30k"}),
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


def test_qlora_on_cpu_exits_2_saying_why_before_any_download(cli_failures):
    res = cli_failures["QLORA=1 on CPU"]
    assert res.returncode == 2, explain(res)
    (line,) = error_lines(res)
    assert "QLORA=1 needs a CUDA GPU (bitsandbytes 4-bit kernels)" in line and "QLORA=0" in line, line
    assert "could not be fetched" not in text(res) and "Traceback" not in text(res)


def test_top_k_beyond_the_lm_exits_2(cli_failures):
    res = cli_failures["TOP_K=99"]
    assert res.returncode == 2, explain(res)
    assert "TOP_K=99" in text(res) and "0..2" in text(res) and "Traceback" not in text(res)


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
# Signals
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
def interrupted(shared_env):
    root, env = shared_env
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
# Secrets
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


# ---------------------------------------------------------------------------------------------
# --test --untrained: the zero-shot baseline
# ---------------------------------------------------------------------------------------------

def test_untrained_test_writes_a_baseline_row_without_any_checkpoint(shared_env, trained):
    root, env = shared_env
    e = env("untrained")
    res = run_script(["--test", "--untrained"], e)
    assert res.returncode == 0, explain(res)
    models = Path(e["OUTPUT_DIR_MODELS"])
    assert not list(models.glob("*.pt"))
    result = json.loads((models / "untrained_clip_top1.test.json").read_text())
    assert result["untrained"] is True and result["epoch"] == 0 and result["checkpoint"] is None
    assert result["num_test_images"] == 4 and result["metrics"]["retrieval_pool"] == 3
    assert len((models / "untrained_clip_top1.test_captions.jsonl").read_text().splitlines()) == 4
    trained_loss = json.loads((trained["A"] / "models" / "2_clip_top1.test.json").read_text())["metrics"]["loss"]
    assert result["metrics"]["loss"] > trained_loss  # the same test images, before and after 2 epochs
    with open(models / "results.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert (row["checkpoint"], row["untrained"], row["epochs"], row["top_k"]) == ("untrained_clip_top1", "yes", "0", "1")
    assert "test results for the untrained model" in res.stdout


def test_the_untrained_model_is_the_seeded_initialisation(config_from_env):
    adapters = {}
    for name, seed in (("a", 42), ("b", 42), ("c", 7)):
        t = mtl.build_untrained(config_from_env(seed=seed))
        adapters[name] = t.model.adapter.state_dict()
        assert t.untrained and t.checkpoint == {"epoch": 0} and not t.model.training
    assert all(torch.equal(adapters["a"][k], adapters["b"][k]) for k in adapters["a"])
    assert not all(torch.equal(adapters["a"][k], adapters["c"][k]) for k in adapters["a"])


@pytest.mark.parametrize("argv,needle", [
    (["--train", "--untrained"], "--untrained goes with --test"),
    (["--test", "--push-to-hub", "me/x"], "--push-to-hub goes with --export"),
    (["--export", "d", "--private"], "--private goes with --push-to-hub"),
    (["--sweep", "a.env", "--checkpoint", "x.pt"], "--checkpoint goes with"),
    (["--ask", "what?"], "need at least one image path"),
    (["--ask", " ", "img.png"], "--ask needs a question"),
    (["--compare", "--resume"], "--resume goes with --train"),
])
def test_options_that_do_not_go_together_are_usage_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        mtl.parse_args(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err


# TUNING=lora end to end, for both encoders
# ---------------------------------------------------------------------------------------------

LORA_ENCODERS = {"clip": 24, "vit": 40}  # the fixtures' feature sizes: CLIP's projection, ViT's hidden size


@pytest.fixture(scope="module")
def lora_runs(shared_env, tiny_vit_dir):
    """Per encoder, with LORA_RANK=2 and LoRA dropout on: A = 2 epochs uninterrupted; B = the same run
    failing to write its epoch-2 checkpoint (a folder stands in the way), then --resume'd from epoch 1 once
    the way is clear; A's --test; --caption from A's checkpoint with TUNING and LORA_RANK unset, so the
    model is rebuilt from the checkpoint's config. CLIP's runs log to W&B offline; ViT's skip W&B."""
    root, env = shared_env
    extra = {"clip": {}, "vit": {"VISION_ENCODER": "vit", "VISION_MODEL": str(tiny_vit_dir), "WANDB_MODE": "disabled"}}
    envs = {f"{enc} {run}": env(f"lora-{enc}-{run}", TUNING="lora", LORA_RANK="2", **extra[enc])
            for enc in LORA_ENCODERS for run in ("A", "B")}
    jobs = {}
    for enc in LORA_ENCODERS:
        blocker = Path(envs[f"{enc} B"]["OUTPUT_DIR_MODELS"]) / f"2_{enc}_lora2.pt"
        blocker.mkdir(parents=True)
        jobs[f"{enc} A"] = lambda e=envs[f"{enc} A"]: run_script(["--train"], e)
        jobs[f"{enc} B failed"] = lambda e=envs[f"{enc} B"]: run_script(["--train"], e)
    res = parallel(jobs)
    images = [str(root / "images" / "img" / f"{i:03d}.png") for i in (0, 5)]
    jobs = {}
    for enc in LORA_ENCODERS:
        a = envs[f"{enc} A"]
        a_default = {k: v for k, v in a.items() if k not in ("TUNING", "LORA_RANK")}
        checkpoint = str(Path(a["OUTPUT_DIR_MODELS"]) / f"2_{enc}_lora2.pt")
        (Path(envs[f"{enc} B"]["OUTPUT_DIR_MODELS"]) / f"2_{enc}_lora2.pt").rmdir()
        jobs[f"{enc} B"] = lambda e=envs[f"{enc} B"]: run_script(["--train", "--resume"], e)
        jobs[f"{enc} test"] = lambda e=a: run_script(["--test"], e)
        jobs[f"{enc} caption"] = lambda e=a_default, c=checkpoint: run_script(["--caption", *images, "--checkpoint", c], e)
    res.update(parallel(jobs))
    return {"env": envs, "images": images, **res}


def lora_checkpoint(lora_runs, run: str, epoch: int) -> dict:
    enc = run.split()[0]
    return torch.load(Path(lora_runs["env"][run]["OUTPUT_DIR_MODELS"]) / f"{epoch}_{enc}_lora2.pt", weights_only=True)


@pytest.mark.parametrize("enc", LORA_ENCODERS)
def test_lora_trains_and_resumes_to_the_same_weights_as_an_uninterrupted_run(lora_runs, enc):
    """LoRA dropout draws from the RNG, so this also checks that its state comes back with the checkpoint."""
    assert lora_runs[f"{enc} A"].returncode == 0, explain(lora_runs[f"{enc} A"])
    failed = lora_runs[f"{enc} B failed"]
    assert failed.returncode == 1 and "could not write" in error_lines(failed)[0], explain(failed)
    res = lora_runs[f"{enc} B"]
    assert res.returncode == 0, explain(res)
    assert "resuming from" in text(res) and "epoch 2/2" in text(res) and "epoch 1/2" not in text(res)
    a1, a2, b2 = (lora_checkpoint(lora_runs, f"{enc} {run}", epoch) for run, epoch in (("A", 1), ("A", 2), ("B", 2)))
    adapter = {k for k in a2["model"] if k.startswith("adapter.")}
    assert set(a2["model"]) == set(b2["model"]) == adapter | set(lora_names_and_shapes(rank=2))
    assert a2["metrics"]["train_loss"] < a1["metrics"]["train_loss"]  # it learns
    lora_b = sorted(k for k in a1["model"] if ".lora_B." in k)
    assert all(a1["model"][k].abs().sum() > 0 for k in lora_b)  # B starts at zero: every one moved
    diff = max((a2["model"][k] - b2["model"][k]).abs().max().item() for k in a2["model"])
    assert diff <= 1e-6, f"max weight difference {diff}"
    assert not torch.equal(a1["model"][lora_b[0]], b2["model"][lora_b[0]])  # epoch 2 trained
    assert b2["step"] == a2["step"] and b2["epoch"] == 2
    for (ka, sa), (_, sb) in zip(sorted(a2["optimizer"]["state"].items()), sorted(b2["optimizer"]["state"].items())):
        for name in sa:
            assert torch.allclose(torch.as_tensor(sa[name]), torch.as_tensor(sb[name]), atol=1e-6), (ka, name)
    assert b2["metrics"]["loss"] == pytest.approx(a2["metrics"]["loss"], abs=1e-6)


@pytest.mark.parametrize("enc", LORA_ENCODERS)
def test_lora_start_banner_counts_the_parameters_of_each_part(lora_runs, enc):
    dim, hidden, tokens, lm_width = LORA_ENCODERS[enc], 16, 2, 32  # ADAPTER_HIDDEN, NUM_VISUAL_TOKENS, LM width
    adapter = dim * hidden + hidden + hidden * tokens * lm_width + tokens * lm_width
    lora = sum(a * b for a, b in lora_names_and_shapes(rank=2).values())
    block = sum(d_in * d_out for d_in, d_out in FIXTURE_PROJECTIONS.values()) + 2 * lm_width + 2 * 16  # + 4 norms
    frozen = (len(WORDS) + 2) * lm_width + 2 * block + lm_width  # tied embeddings, 2 blocks, final norm
    line = next(line for line in text(lora_runs[f"{enc} A"]).splitlines() if "parameters:" in line)
    assert f"adapter {adapter:,} trainable; LM {lora:,} trainable (LoRA rank 2" in line, line
    assert f"of all 2 blocks; TOP_K is ignored); {frozen:,} frozen" in line, line


@pytest.mark.parametrize("enc", LORA_ENCODERS)
def test_lora_test_and_caption_rebuild_the_model_and_carry_the_variant(lora_runs, enc):
    res = lora_runs[f"{enc} test"]
    assert res.returncode == 0, explain(res)
    models = Path(lora_runs["env"][f"{enc} A"]["OUTPUT_DIR_MODELS"])
    result = json.loads((models / f"2_{enc}_lora2.test.json").read_text())
    assert (result["config"]["tuning"], result["config"]["lora_rank"], result["config"]["vision_encoder"]) == \
        ("lora", 2, enc)
    assert result["checkpoint"].endswith(f"2_{enc}_lora2.pt") and "CIDEr" in result["metrics"]
    with open(models / "results.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert (row["checkpoint"], row["tuning"], row["lora_rank"], row["vision_encoder"]) == \
        (f"2_{enc}_lora2.pt", "lora", "2", enc)
    res = lora_runs[f"{enc} caption"]
    assert res.returncode == 0, explain(res)
    lines = [line.split("\t") for line in res.stdout.strip().splitlines()]
    assert [path for path, _ in lines] == lora_runs["images"]
    assert "using the checkpoint's values for: TUNING='topk' (checkpoint: 'lora')" in text(res)


def test_a_lora_run_logs_its_variant_to_wandb(lora_runs):
    env = lora_runs["env"]["clip A"]
    paths = list(Path(env["WANDB_DIR"]).rglob("run-*.wandb"))
    assert len(paths) == 2  # --train and --test
    for path in paths:
        config = next(r.run.config for r in wandb_records(path) if r.WhichOneof("record_type") == "run")
        values = {item.key: json.loads(item.value_json) for item in config.update}
        assert (values["tuning"], values["lora_rank"], values["lora_alpha"], values["qlora"]) == ("lora", 2, 32, False)
