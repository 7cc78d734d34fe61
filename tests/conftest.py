"""Shared fixtures and helpers: tiny models of the real architectures saved to disk, small datasets
in every accepted format, running the script as a user would (a subprocess), reading what it wrote
(error lines, offline W&B records, checkpoints), and the training runs that several files check."""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "multimodal_transfer_learning.py"
sys.path.insert(0, str(ROOT))

import multimodal_transfer_learning as mtl  # noqa: E402
import workflow_tools as tools  # noqa: E402

# Fake secrets planted in runs and configs; they must never show up in anything the script writes.
HF_FAKE = "hf_FAKEtokenDoNotLeak7Qx9Zr2Lm4Np6Vb8"
WANDB_FAKE = "FAKEwandbKeyDoNotLeak0123456789abcdef0123"
ANSI = re.compile(r"\x1b\[[0-9;]*m")

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 60, 220), "yellow": (230, 210, 30)}
SHAPES = ("circle", "square")
WORDS = sorted({"a", "an", "the", "photo", "of", "picture", "small", "big", "caption", ":", "shape", "on", "gray",
                "background", *COLOURS, *SHAPES})


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A 2-block random Qwen3 with grouped-query heads and a word-level tokenizer that, like
    Qwen3-Base, has an EOS token but no BOS and no pad token."""
    return tools.save_tiny_lm(tmp_path_factory.mktemp("qwen3") / "lm", WORDS, seed=0, hidden_size=32,
                              intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=16, max_position_embeddings=128)


# tiny_lm_dir's projection shapes (d_in, d_out): hidden 32, MLP 64, 4 query heads and 2 key/value heads of 16.
FIXTURE_PROJECTIONS = {"self_attn.q_proj": (32, 64), "self_attn.k_proj": (32, 32), "self_attn.v_proj": (32, 32),
                       "self_attn.o_proj": (64, 32), "mlp.gate_proj": (32, 64), "mlp.up_proj": (32, 64),
                       "mlp.down_proj": (64, 32)}


def lora_names_and_shapes(rank: int, blocks: int = 2) -> dict[str, tuple[int, int]]:
    """What peft's LoRA on every projection of every block must add: A (rank, d_in) and B (d_out, rank)."""
    out = {}
    for block in range(blocks):
        for proj, (d_in, d_out) in FIXTURE_PROJECTIONS.items():
            prefix = f"lm.model.layers.{block}.{proj}"
            out[f"{prefix}.lora_A.default.weight"] = (rank, d_in)
            out[f"{prefix}.lora_B.default.weight"] = (d_out, rank)
    return out


TINY_VISION = dict(intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return tools.save_tiny_encoder(tmp_path_factory.mktemp("clip") / "clip", "clip", seed=0, projection_dim=24,
                                   hidden_size=32, **TINY_VISION)


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    return tools.save_tiny_encoder(tmp_path_factory.mktemp("vit") / "vit", "vit", seed=0, hidden_size=40, **TINY_VISION)


def draw(colour: str, shape: str, size=48) -> Image.Image:
    image = Image.new("RGB", (size, size), (128, 128, 128))
    d = ImageDraw.Draw(image)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[colour])
    return image


def write_images(folder: Path, n: int) -> list[dict]:
    """n small PNGs and their captions: [{"file_name", "captions"}]."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        name = f"img/{i:03d}.png"
        draw(colour, shape).save(folder / name)
        rows.append({"file_name": name, "captions": [f"a {colour} {shape}", f"a photo of a {colour} {shape}",
                                                     f"the {shape} is {colour}"]})
    return rows


def write_image_folder(folder: Path, n: int) -> Path:
    """A local image folder (a DATASET): n images and their metadata.jsonl."""
    rows = write_images(folder, n)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A local image folder of 40 images with metadata.jsonl."""
    return write_image_folder(tmp_path / "images", 40)


@pytest.fixture
def karpathy_json(tmp_path) -> Path:
    """A Karpathy-format JSON (with its own train/val/test field, which we ignore) + IMAGE_DIR."""
    rows = write_images(tmp_path / "kimages", 30)
    doc = {"images": [{"filename": r["file_name"], "split": "train", "imgid": i,
                       "sentences": [{"raw": c, "tokens": c.split()} for c in r["captions"]]}
                      for i, r in enumerate(rows)]}
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps(doc))
    return path


def make_env(root: Path, lm_dir: Path, clip_dir: Path, dataset: Path, **overrides) -> dict[str, str]:
    """Environment for a small, fast, offline run on tiny models under `root` (real env vars override .env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HF_"))}
    env.update({
        "LM_MODEL": str(lm_dir), "VISION_MODEL": str(clip_dir), "VISION_ENCODER": "clip",
        "DATASET": str(dataset), "TOP_K": "1", "NUM_VISUAL_TOKENS": "2", "ADAPTER_HIDDEN": "16",
        "BATCH_SIZE": "8", "EVAL_BATCH_SIZE": "16", "EPOCHS": "2", "LR_ADAPTER": "1e-3", "LR_QWEN": "1e-3",
        "PROMPT": "caption:", "MAX_NEW_TOKENS": "6", "VAL_CAPTION_IMAGES": "4", "RETRIEVAL_POOL": "3",
        "NUM_WORKERS": "0", "DEVICE": "cpu", "DTYPE": "auto", "LOG_EVERY": "1",
        "OUTPUT_DIR_MODELS": str(root / "models"), "CACHE_DIR": str(root / "cache"),
        "WANDB_MODE": "offline", "WANDB_DIR": str(root / "wandb"), "WANDB_SILENT": "true",
        "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"), "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    })
    env.update({k: str(v) for k, v in overrides.items()})
    for d in ("wandb", "hf"):
        (root / d).mkdir(parents=True, exist_ok=True)
    return env


@pytest.fixture
def base_env(tmp_path, tiny_lm_dir, tiny_clip_dir, image_folder) -> dict[str, str]:
    return make_env(tmp_path, tiny_lm_dir, tiny_clip_dir, image_folder)


def run_script(args: list[str], env: dict[str, str], cwd: Path | None = None, timeout: int = 300,
               stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    """Run the script as a user would; stdin closed so any interactive prompt would fail."""
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env,
                          cwd=cwd or Path(env["CACHE_DIR"]).parent, capture_output=True, text=True, timeout=timeout,
                          stdin=stdin)


@pytest.fixture
def config_from_env(base_env):
    """Build a validated Config in-process from base_env plus overrides (no .env file involved)."""
    def make(**overrides) -> mtl.Config:
        env = {**base_env, **{k.upper(): str(v) for k, v in overrides.items()}}
        return mtl.load_config(env)
    return make


@pytest.fixture
def tiny_model(config_from_env):
    """(cfg, encoder, captioner) built in-process on CPU from the tiny fixtures."""
    def make(**overrides):
        cfg = config_from_env(**overrides)
        device, dtype = mtl.resolve_device(cfg)
        encoder, model = mtl.build_model(cfg, device, dtype)
        return cfg, encoder, model
    return make


# ---------------------------------------------------------------------------------------------
# Reading what a subprocess run did
# ---------------------------------------------------------------------------------------------

def path_without_java(folder: Path) -> str:
    """PATH as it is, but with no `java`: the caption metrics then skip their JVM start-ups (PTB tokenizer,
    METEOR), which cost more CPU than the tiny training itself. Metrics are tested in test_evaluation.py."""
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
    """Everything a run printed, without colours."""
    return ANSI.sub("", res.stderr + res.stdout)


def explain(res) -> str:
    return f"exit {res.returncode}\n--- stderr (tail) ---\n{res.stderr[-4000:]}\n--- stdout (tail) ---\n{res.stdout[-1000:]}"


def error_lines(res) -> list[str]:
    return [line for line in ANSI.sub("", res.stderr).splitlines() if " ERROR " in line]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def leftover_temp_files(folder: Path) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(".tmp")] if folder.is_dir() else []


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


def wandb_runs(wandb_dir: Path) -> dict[str, list[dict]]:
    """{run id: [{"exit_code": int | None, "run_id": str}, ...]} for every offline run file under wandb_dir."""
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


# ---------------------------------------------------------------------------------------------
# Subprocess runs shared across files (each runs once per session)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def shared_env(tmp_path_factory, tiny_lm_dir, tiny_clip_dir):
    """(root, env factory) for session-wide runs: one 40-image dataset folder, and PATH without Java.
    env(name, **overrides) gives the environment of a run that writes under root/name."""
    root = tmp_path_factory.mktemp("runs")
    data = write_image_folder(root / "images", 40)
    path = path_without_java(root / "path")

    def env(name: str, **overrides) -> dict[str, str]:
        return make_env(root / name, tiny_lm_dir, tiny_clip_dir, data, PATH=path, **overrides)
    return root, env


@pytest.fixture(scope="session")
def trained(shared_env):
    """Run A (2 epochs, fake HF_TOKEN/WANDB_API_KEY, DEBUG logging so the most text is written) and
    run D (same config and SEED, no secrets, another folder) side by side, then A's --test.
    D cannot write its epoch-2 checkpoint (a folder stands in the way), so it stops there and its epoch-1
    checkpoint stays the newest, with the optimizer state a resume needs (older epochs drop it).
    A feeds the secrets scan (test_cli.py); A and D feed resume, the NaN guard and determinism (test_training.py)."""
    root, env = shared_env
    env_a = env("A", HF_TOKEN=HF_FAKE, WANDB_API_KEY=WANDB_FAKE, LOG_LEVEL="DEBUG")
    env_d = env("D")
    (root / "D" / "models" / "2_clip_top1.pt").mkdir(parents=True)
    res = parallel({"A train": lambda: run_script(["--train"], env_a),
                    "D train": lambda: run_script(["--train"], env_d)})
    assert res["A train"].returncode == 0, explain(res["A train"])
    assert res["D train"].returncode == 1 and "could not write" in res["D train"].stderr, explain(res["D train"])
    res["A test"] = run_script(["--test"], env_a)
    assert res["A test"].returncode == 0, explain(res["A test"])
    return {"env_a": env_a, "env_d": env_d, "A": root / "A", "D": root / "D", **res}


def prefix_embeds(model, features: torch.Tensor) -> torch.Tensor:
    """[visual tokens][prompt tokens] of each image, as the model feeds them to the LM: (B, V + P, H)."""
    ids, _, _, places = model.layout([[]] * len(features))
    return model.embed(features, ids, places)


@pytest.fixture(scope="session")
def qformer_runs(shared_env, tiny_vit_dir):
    """ADAPTER=qformer with each encoder: run A (2 epochs) beside run D, the same but with a folder where its
    epoch-2 checkpoint goes, so that it stops there with epoch 1 the newest checkpoint (keeping the resume
    state). Then side by side: D resumed to epoch 2 once the folder is gone, A's --test, A's --caption
    --explain of photo.png and of a missing file; with CLIP also C = D's epoch 1 resumed with absurd
    learning rates (the NaN guard), and A's epoch 1 resumed with ADAPTER=mlp. Returns {"root": folder,
    "image": photo.png, (encoder, job): the finished process}; run X of an encoder writes under
    root/qformer/{encoder}/X."""
    root, env = shared_env
    vision = {"clip": {}, "vit": {"VISION_ENCODER": "vit", "VISION_MODEL": str(tiny_vit_dir)}}
    envs = {(kind, name): env(f"qformer/{kind}/{name}", ADAPTER="qformer", **vision[kind], **extra)
            for kind in vision for name, extra in (("A", {}), ("D", {}), ("C", {"LR_ADAPTER": "1e30", "LR_QWEN": "1e30"}))}
    models = {key: Path(e["OUTPUT_DIR_MODELS"]) for key, e in envs.items()}
    image = root / "qformer" / "photo.png"
    draw("blue", "circle", 64).save(image)
    for kind in vision:
        (models[kind, "D"] / f"2_{kind}_qformer_top1.pt").mkdir(parents=True)
    runs = parallel({(kind, name): lambda kind=kind, name=name: run_script(["--train"], envs[kind, name])
                     for kind in vision for name in ("A", "D")})
    jobs = {}
    for kind in vision:
        assert runs[kind, "A"].returncode == 0, explain(runs[kind, "A"])
        assert runs[kind, "D"].returncode == 1 and "could not write" in runs[kind, "D"].stderr, explain(runs[kind, "D"])
        (models[kind, "D"] / f"2_{kind}_qformer_top1.pt").rmdir()
        jobs[kind, "resume"] = lambda kind=kind: run_script(["--train", "--resume"], envs[kind, "D"])
        jobs[kind, "test"] = lambda kind=kind: run_script(["--test"], envs[kind, "A"])
        jobs[kind, "explain"] = lambda kind=kind: run_script(
            ["--caption", "--explain", str(image), str(image.with_name("missing.png"))], envs[kind, "A"])
    models["clip", "C"].mkdir(parents=True)
    shutil.copy(models["clip", "D"] / "1_clip_qformer_top1.pt", models["clip", "C"])
    jobs["clip", "nan"] = lambda: run_script(["--train", "--resume"], envs["clip", "C"])
    jobs["clip", "as mlp"] = lambda: run_script(["--train", "--resume", "--checkpoint",
                                                 str(models["clip", "A"] / "1_clip_qformer_top1.pt")],
                                                {**envs["clip", "A"], "ADAPTER": "mlp"})
    return {"root": root / "qformer", "image": image, **runs, **parallel(jobs)}


def qformer_checkpoint(runs: dict, kind: str, name: str, epoch: int) -> dict:
    """Checkpoint `epoch` of run `name` (A, C or D) of `qformer_runs` with encoder `kind`."""
    return torch.load(runs["root"] / kind / name / "models" / f"{epoch}_{kind}_qformer_top1.pt", weights_only=True)


# A script that builds the model from the environment, compiles the fast path with the light aot_eager
# backend (dynamo decides the graphs; the backend only turns each into kernels), then runs a training
# step and a scoring pass at every caption length and prints the number of length buckets. With
# up_front, as under torchrun (where every graph compiles inside use_fast_path), it marks in stderr
# where compiling up front ended.
FAST_PATH_SCRIPT = """
import functools, os, sys, torch
sys.path.insert(0, sys.argv[1])
import multimodal_transfer_learning as mtl
torch.compile = functools.partial(torch.compile, backend="aot_eager")
up_front = sys.argv[2] == "up-front"
mtl.DIST = mtl.Dist(0, 1, 0, launched=up_front)  # as under torchrun (one process: no exchange needed below)
cfg = mtl.load_config(dict(os.environ))
encoder, model = mtl.build_model(cfg, *mtl.resolve_device(cfg))
model.use_fast_path(training=True)
print("compiled up front", file=sys.stderr, flush=True)
mtl.DIST = mtl.Dist()  # no process group: the steps below exchange nothing
opt = mtl.make_optimizer(model, cfg)
features = torch.randn(cfg.batch_size, encoder.dim)
for n in range(1, cfg.max_caption_tokens + 1):  # every caption length, EOS included
    model.train()
    mtl.train_step(model, opt, [(features, [[5] * n] * cfg.batch_size, None)], cfg.grad_clip)
    model.eval()
    with torch.no_grad():
        model.caption_log_likelihood(features[:3], [[5] * n, [5] * max(1, n // 3), [5]])
print("buckets", len(model.length_buckets))
"""


def run_fast_path_script(env: dict[str, str], up_front: bool = False) -> tuple[str, int]:
    """FAST_PATH_SCRIPT's stderr (TORCH_LOGS=recompiles lines included) and number of length buckets."""
    res = subprocess.run([sys.executable, "-c", FAST_PATH_SCRIPT, str(ROOT), "up-front" if up_front else "lazy"],
                         env={**env, "TORCH_LOGS": "recompiles"}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stderr, int(re.search(r"buckets (\d+)", res.stdout).group(1))

