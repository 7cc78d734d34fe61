"""Shared fixtures: tiny models of the real architectures saved to disk, small datasets in every
accepted format, and a helper that runs the script as a user would (a subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import multimodal_transfer_learning as mtl  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 60, 220), "yellow": (230, 210, 30)}
SHAPES = ("circle", "square")
WORDS = sorted({"a", "an", "the", "photo", "of", "picture", "small", "big", "caption", ":", "shape", "on", "gray",
                "background", *COLOURS, *SHAPES})


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A 2-block random Qwen3 with grouped-query heads and a word-level tokenizer that, like
    Qwen3-Base, has an EOS token but no BOS and no pad token."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
    path = tmp_path_factory.mktemp("qwen3")
    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>").save_pretrained(path)
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                      tie_word_embeddings=True, eos_token_id=0, bos_token_id=None, pad_token_id=None)
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    return path


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


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=50, bos_token_id=0, eos_token_id=1, pad_token_id=1),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=24)
    CLIPModel(cfg).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel
    path = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=40, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=8)).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


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


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A local image folder of 40 images with metadata.jsonl."""
    folder = tmp_path / "images"
    rows = write_images(folder, 40)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


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
    return subprocess.run([sys.executable, str(ROOT / "multimodal_transfer_learning.py"), *args], env=env,
                          cwd=cwd or Path(env["CACHE_DIR"]).parent, capture_output=True, text=True, timeout=timeout,
                          stdin=stdin)


@pytest.fixture
def config_from_env(base_env, monkeypatch):
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
