#!/usr/bin/env python3
"""Turn a text-only base LM into a vision-language model that captions images and answers questions.

Recipe: a frozen vision encoder (CLIP ViT-B/32: 512-d projected image embedding, or ViT-B/16: 768-d
CLS) -> a trainable bridge (ADAPTER=mlp: a 2-layer MLP over that embedding; ADAPTER=qformer: learned
queries that cross-attend the encoder's patch tokens) -> NUM_VISUAL_TOKENS vectors in the LM's
embedding space -> [visual][prompt][caption][EOS] -> Qwen3-0.6B-Base with its top TOP_K blocks
unfrozen (TUNING=lora: LoRA matrices on every block instead) -> cross-entropy on caption + EOS only.

    python multimodal_transfer_learning.py --train            # train, validate, checkpoint each epoch
    python multimodal_transfer_learning.py --test             # evaluate the last checkpoint on the test split
    python multimodal_transfer_learning.py --caption a.jpg    # caption your own images
    python multimodal_transfer_learning.py --ask "What colour is the car?" a.jpg
    torchrun --standalone --nproc_per_node 8 multimodal_transfer_learning.py --train   # the same run on 8 GPUs

This file is the recipe and runs alone. The workflow around it (--demo, --sweep, --compare, --export,
--caption --explain) lives in workflow_tools.py beside it, imported only by those commands.
Configuration comes from `.env` (or --env-file), overridden by real environment variables; see
`.env.example` or `--help` for every variable.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import csv
import dataclasses
import datetime
import difflib
import errno
import fcntl
import functools
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import colorlog
import torch
import torch.nn as nn
import torch.nn.functional as F
from dotenv import dotenv_values
from PIL import Image
from tqdm.auto import tqdm

log = logging.getLogger("mtl")


class UserError(Exception):
    """A failure the user can fix: printed as one line, no traceback. exit_code 2 = config."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class Stopped(BaseException):
    """Raised by the SIGTERM handler so the run can stop as cleanly as on Ctrl-C. Like KeyboardInterrupt it is
    no Exception, so that no `except Exception` (torch.compile's fallback, say) swallows it and runs on."""


# =============================================================================================
# Config
# =============================================================================================
# One flat, typed list of knobs. Each field's env variable is its name in upper case, and each
# field carries all of its rules: the help text (--help, .env.example), the allowed values, what
# it defines (the model, the data, or training values that may change on --resume) and whether it
# is secret. `load_config` is the only place that reads the environment and `config_errors` the
# only place that judges values; every list of keys below is derived from the fields.

@dataclass(frozen=True)
class Range:
    """Allowed numbers: low/high bounds, each open (excluded) or closed."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, v) -> bool:
        return ((self.low is None or (v > self.low if self.low_open else v >= self.low))
                and (self.high is None or (v < self.high if self.high_open else v <= self.high)))

    def __str__(self) -> str:
        if self.high is None:
            return f"must be {'>' if self.low_open else '>='} {self.low}"
        return f"must be in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


@dataclass(frozen=True)
class Pattern:
    """Allowed strings: a regular expression, and how to say it to a user."""
    regex: str
    says: str

    def __contains__(self, v) -> bool:
        return re.fullmatch(self.regex, v) is not None

    def __str__(self) -> str:
        return f"is not allowed (allowed: {self.says})"


POSITIVE, NON_NEGATIVE = Range(0, low_open=True), Range(0)


def _f(default, help, allowed=None, defines=None, secret=False):
    """A config field. allowed: a tuple of choices, a Range or a Pattern. defines: "model" (rebuilding
    the model, or telling it apart, needs it), "data" (the split and features depend on it) or "training" (may
    change on --resume, with a warning)."""
    return field(default=default, repr=not secret,
                 metadata={"help": help, "allowed": allowed, "defines": defines, "secret": secret})


@dataclass
class Config:
    # --- model ---
    vision_encoder: str = _f("clip", "clip (512-d projected image embedding) or vit (768-d CLS token)",
                             ("clip", "vit"), "model")
    vision_model: str = _f("", "hub id or local dir; empty = openai/clip-vit-base-patch32 or google/vit-base-patch16-224-in21k",
                           defines="model")
    lm_model: str = _f("Qwen/Qwen3-0.6B-Base", "decoder-only LM: hub id or local dir", defines="model")
    adapter: str = _f("mlp", "mlp (2-layer MLP over the image embedding) or qformer (queries cross-attend patch tokens)",
                      ("mlp", "qformer"), "model")
    num_visual_tokens: int = _f(16, "adapter output tokens", POSITIVE, "model")
    adapter_hidden: int = _f(1024, "hidden width of the 2-layer MLP adapter", POSITIVE, "model")
    qformer_layers: int = _f(2, "ADAPTER=qformer: query-transformer layers", POSITIVE, "model")
    tuning: str = _f("topk", "topk (unfreeze the top TOP_K blocks) or lora (LoRA adapters on every block)",
                     ("topk", "lora"), "model")
    top_k: int = _f(3, "TUNING=topk: number of top decoder blocks to unfreeze, 0..num_layers", NON_NEGATIVE, "model")
    lora_rank: int = _f(16, "TUNING=lora: rank of the LoRA matrices", POSITIVE, "model")
    lora_alpha: int = _f(32, "TUNING=lora: LoRA scaling numerator (scale = alpha / rank)", POSITIVE, "model")
    lora_dropout: float = _f(0.05, "TUNING=lora: dropout on the LoRA branch", Range(0, 1, high_open=True), "model")
    qlora: bool = _f(False, "TUNING=lora: load the frozen LM in 4-bit NF4 (bitsandbytes, CUDA only)", defines="model")
    prompt: str = _f("A short caption of the image:", "text between the visual tokens and the caption; may be empty",
                     defines="model")
    max_caption_tokens: int = _f(48, "captions are truncated to this many tokens (EOS comes after)", POSITIVE, "model")
    trust_remote_code: bool = _f(False, "allow model code from the hub (off: only transformers' own architectures)")
    # --- data ---
    dataset: str = _f("lmms-lab/flickr30k", "hub dataset id, local image folder (metadata.jsonl/.csv), or Karpathy-format JSON",
                      Pattern(r"\S.*", "a hub dataset id, a local image folder or a Karpathy JSON"), "data")
    dataset_split: str = _f("test", "hub split to read (lmms-lab/flickr30k keeps all 31,783 images in 'test'); we re-split 80/10/10",
                            defines="data")
    image_column: str = _f("image", "hub dataset: image column", defines="data")
    caption_column: str = _f("caption", "hub dataset: caption column (a list of strings or one string)", defines="data")
    id_column: str = _f("filename", "hub dataset: image identifier column (the split is a function of these)",
                        defines="data")
    image_dir: str = _f("", "image folder for a Karpathy-format JSON", defines="data")
    max_images: int = _f(0, "use only the first N images (sorted by id) before splitting; 0 = all", NON_NEGATIVE, "data")
    max_bad_fraction: float = _f(0.05, "stop if more than this share of images is missing, undecodable or caption-less",
                                 Range(0, 1))
    test_dataset: str = _f("", "--test evaluates every image of this source (as DATASET) instead of DATASET's test split")
    test_image_dir: str = _f("", "TEST_DATASET: as IMAGE_DIR; empty = IMAGE_DIR")
    test_dataset_split: str = _f("", "TEST_DATASET: as DATASET_SPLIT; empty = DATASET_SPLIT")
    test_image_column: str = _f("", "TEST_DATASET: as IMAGE_COLUMN; empty = IMAGE_COLUMN")
    test_caption_column: str = _f("", "TEST_DATASET: as CAPTION_COLUMN; empty = CAPTION_COLUMN")
    test_id_column: str = _f("", "TEST_DATASET: as ID_COLUMN; empty = ID_COLUMN")
    # --- questions ---
    qa_dataset: str = _f("", "questions: hub dataset id (VQAv2-style) or local .jsonl/.csv, a row each; empty = none",
                         defines="training")
    qa_split: str = _f("validation", "QA_DATASET on the hub: split to read (then split 80/10/10 by image)")
    qa_image_column: str = _f("image", "QA_DATASET: image column (a local file's: paths relative to QA_IMAGE_DIR)")
    qa_question_column: str = _f("question", "QA_DATASET: question column")
    qa_answers_column: str = _f("answers", "QA_DATASET: answers column: a string, a list, or VQAv2's {'answer': ...} list")
    qa_type_column: str = _f("question_type", "QA_DATASET: question type column (optional: VQA-acc per type)")
    qa_id_column: str = _f("image_id", "QA_DATASET on the hub: image id column (an image's questions share a split)")
    qa_image_dir: str = _f("", "QA_DATASET file: the folder its image paths are relative to; empty = the file's")
    qa_mix: float = _f(0.0, "share of training sequences from QA_DATASET; 0 = captions only", Range(0, 1, high_open=True),
                       "training")
    qa_shots: int = _f(0, "solved examples from the QA train split before each question (Frozen-style)", NON_NEGATIVE)
    qa_max_new_tokens: int = _f(10, "longest answer in tokens (a newline also ends it)", POSITIVE)
    # --- training ---
    init_from: str = _f("", "a checkpoint or export folder whose adapter (and LM weights) start this run, fresh optimizer "
                        "and schedule; in a --sweep file @stem = that variant's last checkpoint", defines="model")
    freeze_adapter: bool = _f(False, "1: the adapter is not trained (the LM part only)", defines="model")
    batch_size: int = _f(32, "(image, caption) pairs per step", POSITIVE, "training")
    grad_accum: int = _f(1, "micro-batches per optimizer step", POSITIVE, "training")
    epochs: int = _f(3, "passes over every (image, caption) pair of the train split", POSITIVE, "training")
    lr_adapter: float = _f(1e-3, "AdamW learning rate of the adapter", POSITIVE, "training")
    lr_qwen: float = _f(2e-5, "AdamW learning rate of the trained LM weights (top-K blocks or LoRA)", POSITIVE, "training")
    weight_decay: float = _f(0.01, "AdamW weight decay (both groups)", NON_NEGATIVE, "training")
    warmup_ratio: float = _f(0.05, "share of optimizer steps spent in linear warm-up before cosine decay",
                             Range(0, 1, high_open=True), "training")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this; 0 = off", NON_NEGATIVE, "training")
    prompts: str = _f("", "several training prompts separated by ';', one drawn per pair (PROMPT is used for evaluation)",
                      defines="training")
    seed: int = _f(42, "seeds the split, the shuffling, the initialisation and sampling", Range(0, 2**32 - 1), "data")
    compile: str = _f("auto", "auto (the fused fast path on CUDA, eager on CPU), 1 or 0 to force it, max: the fast path with "
                      "CUDA graphs (on CPU the same as 1)", ("auto", "1", "0", "max"))
    liger: bool = _f(False, "1: Liger-Kernel's fused Qwen3 RMSNorm/RoPE/SwiGLU on CUDA (pip install liger-kernel)")
    # --- evaluation and decoding ---
    eval_batch_size: int = _f(64, "batch size of val/test loss, generation and retrieval scoring", POSITIVE)
    val_caption_images: int = _f(500, "val images whose generated captions are scored each epoch; 0 = all", NON_NEGATIVE)
    test_caption_images: int = _f(0, "test images whose generated captions are scored; 0 = all", NON_NEGATIVE)
    retrieval_pool: int = _f(100, "test images (with all their captions) in the retrieval pool; 0 = skip retrieval",
                             NON_NEGATIVE)
    decoding: str = _f("greedy", "greedy, beam or sample", ("greedy", "beam", "sample"))
    num_beams: int = _f(3, "beam width for DECODING=beam", POSITIVE)
    length_penalty: float = _f(1.0, "beam length penalty (>1 favours longer captions)")
    sample_top_k: int = _f(50, "DECODING=sample: keep the k most likely tokens; 0 = all", NON_NEGATIVE)
    temperature: float = _f(1.0, "DECODING=sample: softmax temperature", POSITIVE)
    top_p: float = _f(1.0, "DECODING=sample: nucleus probability mass; 1 = off", Range(0, 1, low_open=True))
    no_repeat_ngram: int = _f(3, "never repeat an n-gram of this size in a caption; 0 = off", NON_NEGATIVE)
    max_new_tokens: int = _f(32, "longest generated caption, in tokens", POSITIVE)
    # --- runtime ---
    device: str = _f("auto", "auto (CUDA if present), cpu, cuda, cuda:N or mps",
                     Pattern(r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, cuda, cuda:N, mps"))
    dtype: str = _f("auto", "auto (bf16 on a GPU that supports it, else fp32), bf16 or fp32", ("auto", "bf16", "fp32"))
    num_workers: int = _f(2, "image-decoding worker processes for feature extraction", NON_NEGATIVE)
    output_dir_models: str = _f(".data/models", "checkpoints, test results and results.csv")
    cache_dir: str = _f(".data/cache", "cached image features and the demo's data and models")
    log_every: int = _f(10, "log training metrics every N optimizer steps (the loss is read from the GPU only then)",
                        POSITIVE)
    log_level: str = _f("INFO", "DEBUG shows tracebacks of expected failures", ("DEBUG", "INFO", "WARNING", "ERROR"))
    demo_images: int = _f(1500, "--demo: number of synthetic images", POSITIVE)
    demo_task: str = _f("shapes", "--demo: shapes (colour + shape), position (the caption also says where the shape is) "
                        "or qa (1-3 shapes; questions on colour, shape, place, count)", ("shapes", "position", "qa"))
    # --- services ---
    wandb_project: str = _f("mlx8-w4-multimodal-transferlearning", "W&B project")
    wandb_entity: str = _f("", "W&B entity (team or user); empty = your default")
    wandb_mode: str = _f("", "online, offline or disabled; empty = online if logged in, else offline",
                         ("", "online", "offline", "disabled"))
    hf_token: str = _f("", "Hugging Face token for gated/private repos (secret)", secret=True)
    wandb_api_key: str = _f("", "W&B API key (secret); `wandb login` works too", secret=True)

    # ---- derived helpers ----
    def public(self) -> dict:
        """Every non-secret value: what goes to W&B, checkpoints and result files."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata["secret"]}

    def secrets(self) -> list[str]:
        return [getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["secret"] and getattr(self, f.name)]

    @property
    def vision_model_id(self) -> str:
        return self.vision_model or DEFAULT_VISION_MODELS.get(self.vision_encoder, "")

    @property
    def run_name(self) -> str:
        """What tells variants apart in file names: clip_top3, vit_qformer_lora16, ..."""
        adapter = "_qformer" if self.adapter == "qformer" else ""
        tuning = f"lora{self.lora_rank}" if self.tuning == "lora" else f"top{self.top_k}"
        return f"{self.vision_encoder}{adapter}_{tuning}"

    @property
    def unused_keys(self) -> set[str]:
        """Settings this variant ignores: TOP_K under LoRA, LoRA's under top-K, one adapter's under the other."""
        tuning = {"top_k"} if self.tuning == "lora" else {"lora_rank", "lora_alpha", "lora_dropout", "qlora"}
        return tuning | ({"adapter_hidden"} if self.adapter == "qformer" else {"qformer_layers"})


def keys_defining(what: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(Config) if f.metadata["defines"] == what)


DEFAULT_VISION_MODELS = {"clip": "openai/clip-vit-base-patch32", "vit": "google/vit-base-patch16-224-in21k"}


MODEL_KEYS, DATA_KEYS, TRAINING_KEYS = keys_defining("model"), keys_defining("data"), keys_defining("training")


SECRET_ENV = tuple(f.name.upper() for f in dataclasses.fields(Config) if f.metadata["secret"])


def _parse_value(raw: str, typ):
    raw = raw.strip()
    if typ is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError("is not a boolean (allowed: 1/0, true/false)")
    if typ is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError("is not an integer") from None
    if typ is float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("is not a number") from None
        if not math.isfinite(value):
            raise ValueError("is not a finite number")
        return value
    return raw


def read_environment(env_file: str | None, demo: bool, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables in effect: the env file, overridden by real environment variables (`environ`:
    os.environ, or what --sweep gives a variant).

    With --demo the file is read only for W&B and token variables (it describes the real run),
    and the demo preset fills in between."""
    path = Path(env_file or ".env")
    if env_file and not path.is_file():
        raise UserError(f"--env-file {env_file}: no such file", exit_code=2)
    file_values = {k: v for k, v in dotenv_values(path).items() if v is not None} if path.is_file() else {}
    for problem in unknown_variables(file_values) if environ is None else []:  # --sweep: said once, at its start
        log.warning(f"{path}: {problem}; it is ignored")
    if demo:
        file_values = {k: v for k, v in file_values.items() if v and (k.startswith("WANDB_") or k in SECRET_ENV)}
        file_values = {**workflow_tools("--demo").DEMO_PRESET, **file_values}
    return {**file_values, **(os.environ if environ is None else environ)}


LIBRARY_VARIABLES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DATASETS_", "TOKENIZERS_", "WANDB_", "TORCH", "PYTORCH_",
                     "CUDA_", "NCCL_", "TRITON_", "OMP_", "MKL_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_", "PYTHON")


def unknown_variables(keys) -> list[str]:
    """'KEY is not a setting (did you mean SETTING?)' for each key of an env file that neither we nor a library reads."""
    settings = [f.name.upper() for f in dataclasses.fields(Config)]
    return [f"{key} is not a setting" + "".join(f" (did you mean {close}?)" for close in
                                               difflib.get_close_matches(key.upper(), settings, n=1, cutoff=0.75))
            for key in keys if key not in settings and not key.startswith(LIBRARY_VARIABLES)]


def load_config(env: dict[str, str]) -> Config:
    """Parse and judge every variable; all bad values are reported together (exit code 2)."""
    types = {"int": int, "float": float, "bool": bool, "str": str}
    values, errors = {}, []
    for f in dataclasses.fields(Config):
        key = f.name.upper()
        if key in env:
            try:
                values[f.name] = _parse_value(env[key], types[f.type])
            except ValueError as e:
                shown = "***" if f.metadata["secret"] else env[key]
                errors.append(f"{key}={shown!r} {e}")
    if isinstance(values.get("log_level"), str):
        values["log_level"] = values["log_level"].upper()
    cfg = Config(**values)
    errors += config_errors(cfg, skip={e.split("=")[0].lower() for e in errors})
    if errors:
        raise UserError("invalid configuration:\n  - " + "\n  - ".join(errors), exit_code=2)
    return cfg


def config_errors(cfg: Config, skip=()) -> list[str]:
    """What is wrong with the values, one line each; judges, changes nothing."""
    errors = []
    for f in dataclasses.fields(cfg):
        value, allowed = getattr(cfg, f.name), f.metadata["allowed"]
        if f.name in skip or allowed is None:
            continue
        if isinstance(allowed, tuple) and value not in allowed:
            errors.append(f"{f.name.upper()}={value!r} is not allowed (allowed: {', '.join(a or '(empty)' for a in allowed)})")
        elif not isinstance(allowed, tuple) and value not in allowed:
            errors.append(f"{f.name.upper()}={value!r} {allowed}")
    for f in dataclasses.fields(cfg):  # a secret is judged but never echoed
        if f.metadata["secret"] and re.search(r"[\s'\"]", getattr(cfg, f.name)):
            errors.append(f"{f.name.upper()}=*** (hidden) contains spaces or quotes; paste the token alone")
    if cfg.qlora and cfg.tuning != "lora":
        errors.append(f"QLORA=1 needs TUNING=lora (got TUNING={cfg.tuning!r}): 4-bit weights cannot be trained directly")
    if cfg.freeze_adapter and cfg.tuning == "topk" and cfg.top_k == 0:
        errors.append("FREEZE_ADAPTER=1 with TOP_K=0 trains nothing: unfreeze LM blocks (TOP_K > 0) or the adapter")
    for name in ("output_dir_models", "cache_dir"):
        problem = _unwritable(Path(getattr(cfg, name)))
        if problem:
            errors.append(f"{name.upper()}={getattr(cfg, name)!r} is not writable ({problem})")
    return errors


def _unwritable(path: Path) -> str | None:
    """Why files could not be written under `path` (created on first write), or None. Creates nothing."""
    path = path.expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"no permission to write in {existing}"
    return None


def check_top_k(cfg: Config, num_layers: int) -> None:
    """TOP_K can only be judged once the LM's config (not its weights) is known."""
    if cfg.tuning == "topk" and not 0 <= cfg.top_k <= num_layers:
        raise UserError(f"TOP_K={cfg.top_k} is out of range (allowed: 0..{num_layers} for {cfg.lm_model})", exit_code=2)


# =============================================================================================
# Logging and progress
# =============================================================================================

class _Redact(logging.Filter):
    """Belt and braces: a secret that reaches a log message is replaced before printing."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = [s for s in secrets if len(s) >= 4]

    def filter(self, record):
        msg = record.getMessage()
        for s in self.secrets:
            msg = msg.replace(s, "***")
        record.msg, record.args = msg, None
        return True


class _TqdmHandler(colorlog.StreamHandler):
    """Log lines go through tqdm.write so they never tear a progress bar."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(level: str = "INFO", secrets: list[str] = ()) -> None:
    """Our log lines on stderr. Under torchrun only rank 0 speaks; the other ranks show their errors only,
    marked with their rank (or everything with LOG_LEVEL=DEBUG)."""
    rank = "" if DIST.is_main else f"[rank {DIST.rank}] "
    if not DIST.is_main and level != "DEBUG":
        level = "ERROR"
    handler = _TqdmHandler()
    handler.setFormatter(colorlog.ColoredFormatter(
        f"%(log_color)s%(asctime)s %(levelname)-7s%(reset)s {rank}%(message)s", datefmt="%H:%M:%S",
        no_color=not sys.stderr.isatty(),  # plain text in log files and CI
        log_colors={"DEBUG": "cyan", "INFO": "green", "WARNING": "yellow", "ERROR": "red", "CRITICAL": "bold_red"}))
    handler.addFilter(_Redact(list(secrets)))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    import transformers
    transformers.logging.set_verbosity_error()  # load reports and fallback notices drown our own lines
    transformers.logging.disable_progress_bar()  # per-tensor "Loading weights" bars clutter every start...
    import huggingface_hub.utils
    if DIST.is_main:
        huggingface_hub.utils.enable_progress_bars()  # ...but multi-GB downloads deserve theirs (once)
    else:
        huggingface_hub.utils.disable_progress_bars()
        warnings.filterwarnings("ignore")  # library warnings repeat what rank 0 already shows


def progress_bar(iterable=None, **kw):
    """A tqdm bar; on a non-terminal (nohup, CI) it updates rarely instead of flooding the log."""
    kw.setdefault("mininterval", 1.0 if sys.stderr.isatty() else 30.0)
    kw.setdefault("dynamic_ncols", True)
    kw.setdefault("leave", False)
    kw.setdefault("disable", not DIST.is_main)
    return tqdm(iterable, **kw)


# =============================================================================================
# Processes: torchrun and DistributedDataParallel
# =============================================================================================
# `torchrun --nproc_per_node N multimodal_transfer_learning.py --train` starts N copies of this
# script, each told its RANK, WORLD_SIZE and LOCAL_RANK. Every rank builds the same model from the
# same seed, sees the same split and the same shuffle, and takes its own share of every batch;
# DistributedDataParallel averages the gradients, so N processes make the updates one process makes
# at the same (global) BATCH_SIZE. Evaluation is shared out by whole batches and gathered. Only rank
# 0 speaks: console, progress bars, W&B and every file written. A plain `python ... --train` is
# the case of one process without a process group, where every helper below does nothing.

# Where every rank does the same work (gradients, evaluation), a rank that waits longer than this
# for the others has lost one of them: the run stops instead of hanging.
LOCKSTEP_TIMEOUT = datetime.timedelta(seconds=60)


# Where the others wait for rank 0 alone (its metrics, checkpoint or feature cache), minutes are normal.
WAIT_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass
class Dist:
    """This process's place in the run and the collectives the script needs, all no-ops for one plain process."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # by torchrun (even with one process): the process group and DDP are used
    waiting_group: object = None  # gloo, with WAIT_TIMEOUT: waits for rank 0 alone

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous share of n items (a global batch). Shares differ by one item at most
        when n does not divide, rank 0's being the smallest; a rank gets none when n < WORLD_SIZE."""
        return slice(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)

    def my_batches(self, n: int, batch_size: int) -> list[range]:
        """The batches of n items (in order, `batch_size` each) this rank evaluates: every WORLD_SIZE-th,
        so that each batch holds the same items as in a one-process run and gives the same numbers."""
        starts = range(self.rank * batch_size, n, self.world_size * batch_size)
        return [range(s, min(s + batch_size, n)) for s in starts]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over the ranks, in place (on the tensor's own device: gloo or NCCL)."""
        if self.launched:
            torch.distributed.all_reduce(t)
        return t

    def gather(self, obj, patient: bool = False) -> list:
        """Every rank's `obj`, in rank order, on every rank. patient: after work whose length differs from
        rank to rank (decoding images), so with WAIT_TIMEOUT."""
        if not self.launched:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj, group=self.waiting_group if patient else None)
        return out

    def from_main(self, fn, *args, **kwargs):
        """fn(...) computed by rank 0 alone (a JVM per rank for METEOR would be a waste), its result on every rank."""
        if not self.launched:
            return fn(*args, **kwargs)
        box = [fn(*args, **kwargs) if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0, group=self.waiting_group)
        return box[0]

    def barrier(self) -> None:
        """Every rank waits here for all the others, on the long timeout: for rank 0 writing a file, or for
        start-up work that takes each rank its own time, so that the next lockstep exchange starts together."""
        if self.launched:
            torch.distributed.barrier(group=self.waiting_group)


DIST = Dist()


def read_torchrun_environment(env=os.environ) -> Dist:
    """Where torchrun put this process (RANK, WORLD_SIZE, LOCAL_RANK); one plain process without it."""
    if "WORLD_SIZE" not in env:
        return Dist()
    try:
        rank, world, local = (int(env[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except (KeyError, ValueError):
        raise UserError("WORLD_SIZE is set but RANK/LOCAL_RANK are missing or not integers: start several processes "
                        "with torchrun, or unset WORLD_SIZE", exit_code=2) from None
    return Dist(rank, world, local, launched=True)


def start_process_group(device: torch.device) -> None:
    """Join the other ranks: NCCL for GPU tensors, gloo for host tensors and objects, and a gloo group with a
    long timeout for waiting on rank 0."""
    if not DIST.launched or torch.distributed.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, timeout=LOCKSTEP_TIMEOUT)
    DIST.waiting_group = torch.distributed.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    log.info(f"torchrun: {DIST.world_size} processes ({backend}), this one on {device}")


def stop_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exchange_failure(e: Exception) -> str:
    """gloo's and NCCL's message in one short line: its first sentence, without the source location."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip().splitlines() or [""])[0])
    return f"{type(e).__name__}: {text.split('. ')[0][:200]}"


def lost_other_ranks(e: BaseException) -> bool:
    """Whether an exception is a failed exchange with the other ranks (one died, or hangs past the timeout).
    gloo raises plain RuntimeErrors that name it; NCCL raises DistBackendError."""
    return DIST.launched and (isinstance(e, torch.distributed.DistError) or (
        isinstance(e, RuntimeError) and re.search(r"gloo|NCCL|Connection (closed|reset) by peer", str(e)) is not None))


def data_parallel(model: nn.Module) -> nn.Module:
    """The model as the training step calls it: wrapped in DDP under torchrun, so that backward averages the
    gradients over the ranks. Only trainable parameters take part, and every one of them is used by every
    forward (no search for unused ones)."""
    if not DIST.launched:
        return model
    device = next(p.device for p in model.parameters() if p.requires_grad)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                     find_unused_parameters=False)


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DDP (what owns the weights, the tokenizer and the checkpoint names), or the model itself."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def check_global_batch(cfg: Config) -> None:
    """BATCH_SIZE is the global batch: each of the WORLD_SIZE processes takes BATCH_SIZE / WORLD_SIZE pairs."""
    if cfg.batch_size % DIST.world_size:
        raise UserError(f"BATCH_SIZE={cfg.batch_size} is the global batch and does not divide over WORLD_SIZE="
                        f"{DIST.world_size} processes: set BATCH_SIZE to a multiple of {DIST.world_size}", exit_code=2)


# =============================================================================================
# Data
# =============================================================================================

@dataclass
class Record:
    """One image with all its reference captions. `ref` is a file path or a hub row index."""
    image_id: str
    captions: list[str]
    ref: str | int


class ImageStore:
    """Opens a record's image from disk or from the hub dataset's rows (picklable for workers)."""

    def __init__(self, hub_dataset=None, column: str = ""):
        self.hub_dataset, self.column = hub_dataset, column

    def open(self, ref) -> Image.Image:
        image = self.hub_dataset[ref][self.column] if isinstance(ref, int) else Image.open(ref)
        return to_rgb(image)


def to_rgb(image: Image.Image, max_side: int = 1024) -> Image.Image:
    """Any PIL image -> RGB. Transparent pixels become white; huge images shrink first."""
    image.draft("RGB", (max_side, max_side))  # JPEG: decode at reduced size, a big saving for photos
    if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image.alpha_composite(rgba)
    image = image.convert("RGB")
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side))
    return image


def _clean_captions(captions) -> list[str]:
    if isinstance(captions, str):
        captions = [captions]
    return [" ".join(str(c).split()) for c in captions or [] if c is not None and str(c).strip()]


def looks_local(name: str) -> bool:
    """A path, not a hub id (owner/name): missing paths get 'no such file', not a hub lookup."""
    return name.startswith((".", "/", "~"))


def is_hub_id(name: str) -> bool:
    """Something to fetch from the hub: neither an existing path nor one that looks like a path."""
    return bool(name) and not looks_local(name) and not Path(name).expanduser().exists()


def dataset_kind(cfg: Config) -> str:
    """"karpathy", "folder" or "hub". Cheap, so a wrong local path fails before any model is loaded."""
    source = Path(cfg.dataset).expanduser()
    if source.is_file() and source.suffix == ".json":
        if not cfg.image_dir:
            raise UserError(f"DATASET={cfg.dataset} is a Karpathy JSON: set IMAGE_DIR to the folder holding its images", 2)
        if not Path(cfg.image_dir).expanduser().is_dir():
            raise UserError(f"IMAGE_DIR={cfg.image_dir}: no such folder")
        return "karpathy"
    if source.is_dir():
        return "folder"
    if source.exists() or looks_local(cfg.dataset) or cfg.dataset.endswith(".json"):
        raise UserError(f"DATASET={cfg.dataset}: no such image folder or Karpathy JSON (check the path)")
    return "hub"


def load_records(cfg: Config) -> tuple[list[Record], ImageStore, list[str]]:
    """All usable records, the store that opens their images, and the ids skipped for no caption."""
    kind, source = dataset_kind(cfg), Path(cfg.dataset).expanduser()
    if kind == "karpathy":
        rows, store = _karpathy_rows(source, cfg), ImageStore()
    elif kind == "folder":
        rows, store = _imagefolder_rows(source), ImageStore()
    else:
        rows, store = _hub_rows(cfg)
    merged: dict[str, Record] = {}
    for image_id, captions, ref in rows:
        rec = merged.setdefault(image_id, Record(image_id, [], ref))
        rec.captions += _clean_captions(captions)
    no_caption = sorted(i for i, r in merged.items() if not r.captions)
    records = sorted((r for r in merged.values() if r.captions), key=lambda r: r.image_id)
    if cfg.max_images:
        records = records[: cfg.max_images]
    if not records:
        raise UserError(f"DATASET={cfg.dataset} holds no image with a caption")
    return records, store, no_caption


def test_source(cfg: Config) -> tuple[Config, tuple]:
    """TEST_DATASET as a config of its own (its TEST_* settings, an empty one as DATASET's; every image) and its
    records, read as DATASET's are but with errors that name the TEST_* variables."""
    own = {k: getattr(cfg, f"test_{k}") or getattr(cfg, k)
           for k in ("image_dir", "dataset_split", "image_column", "caption_column", "id_column")}
    source = dataclasses.replace(cfg, dataset=cfg.test_dataset, max_images=0, **own)
    try:
        return source, load_records(source)
    except UserError as e:
        named = re.sub(r"\b(DATASET(_SPLIT)?|IMAGE_DIR|(IMAGE|CAPTION|ID)_COLUMN)\b", r"TEST_\1", str(e))
        raise UserError(named, e.exit_code) from None


def _karpathy_rows(path: Path, cfg: Config):
    image_dir = Path(cfg.image_dir).expanduser()
    try:
        images = json.loads(path.read_text())["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"DATASET={path} is not a Karpathy-format JSON ({{'images': [...]}}): {e}") from None
    for img in images:
        rel = Path(img.get("filepath", "")) / img["filename"]
        yield str(rel), [s.get("raw", "") for s in img.get("sentences", [])], str(image_dir / rel)


def _imagefolder_rows(folder: Path):
    table = next((folder / n for n in ("metadata.jsonl", "metadata.csv") if (folder / n).is_file()), None)
    if table is None:
        raise UserError(f"DATASET={folder}: an image folder needs metadata.jsonl or metadata.csv")
    for row in read_table(table, lists=("captions",)):
        if "file_name" not in row:
            raise UserError(f"DATASET={folder}: metadata rows need a file_name column (got {sorted(row)})")
        yield row["file_name"], row.get("captions", row.get("caption")), str(folder / row["file_name"])


def read_table(path: Path, lists=()) -> list[dict]:
    """The rows of a .jsonl or .csv file; a CSV cell of a column in `lists` may hold a JSON list."""
    with open(path, newline="") as fh:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in fh if line.strip()]
        rows = list(csv.DictReader(fh))
    for row in rows:
        for k in lists:
            if isinstance(row.get(k), str) and row[k].lstrip().startswith("["):
                row[k] = json.loads(row[k])
    return rows


def check_columns(var: str, name: str, have, columns: dict[str, str], optional=()) -> None:
    """columns: {variable: the column it names}; a missing one (not in `optional`) stops the run (exit 2)."""
    missing = [c for k, c in columns.items() if c not in have and k not in optional]
    if missing:
        raise UserError(f"{var}={name} has no column {missing} (columns: {sorted(have)}); set {' / '.join(columns)}",
                        exit_code=2)


def hub_columns(var: str, name: str, split: str, cfg: Config, columns: dict[str, str], optional=()):
    """{variable: values} of a hub dataset's text columns (`columns` as in `check_columns`, the image column
    first; a missing optional one gives Nones), read without decoding an image, and the store of its images."""
    import datasets
    ds = call_hub(var, name, datasets.load_dataset, name, split=split, token=cfg.hf_token or None)
    check_columns(var, name, ds.column_names, columns, optional)
    (_, image), *text = columns.items()
    meta = ds.select_columns([c for _, c in text if c in ds.column_names])  # reading text must not decode images
    values = {k: list(meta[c]) if c in ds.column_names else [None] * len(ds) for k, c in text}
    return values, ImageStore(ds.select_columns([image]), image)


def _hub_rows(cfg: Config):
    columns = {"IMAGE_COLUMN": cfg.image_column, "CAPTION_COLUMN": cfg.caption_column, "ID_COLUMN": cfg.id_column}
    values, store = hub_columns("DATASET", cfg.dataset, cfg.dataset_split, cfg, columns)
    return [(str(i), c, n) for n, (i, c) in enumerate(zip(values["ID_COLUMN"], values["CAPTION_COLUMN"]))], store


def split_by_image(image_ids, seed: int) -> dict[str, list[str]]:
    """80/10/10 train/val/test by image: a function of the set of ids and the seed only."""
    ids = sorted(set(image_ids))
    random.Random(seed).shuffle(ids)
    n_train, n_val = round(0.8 * len(ids)), round(0.1 * len(ids))
    return {"train": sorted(ids[:n_train]), "val": sorted(ids[n_train:n_train + n_val]),
            "test": sorted(ids[n_train + n_val:])}


def check_bad_data(num_total: int, skipped: dict[str, str], cfg: Config, what: str = "images") -> None:
    """Report skipped images (or question rows); refuse to train on a dataset where too many are broken."""
    if not skipped:
        return
    first = "; ".join(f"{i} ({why})" for i, why in list(skipped.items())[:5])
    log.warning(f"skipped {len(skipped)} of {num_total} {what}: {first}{' ...' if len(skipped) > 5 else ''}")
    share = len(skipped) / max(num_total, 1)
    if share > cfg.max_bad_fraction:
        raise UserError(f"{share:.1%} of the {what} are missing, undecodable, caption-less or answer-less "
                        f"(MAX_BAD_FRACTION={cfg.max_bad_fraction}); fix the dataset or raise MAX_BAD_FRACTION")


# The question takes the prompt's place, in training, evaluation and --ask alike. A model trained on
# captions only has learnt to describe whatever follows its visual tokens: it answers with a description.
ASK_TEMPLATE = "Question: {question} Answer:"


def ask_text(question: str, answer: str | None = None) -> str:
    """The template around a question; with its answer (and a newline), a solved example (QA_SHOTS)."""
    text = ASK_TEMPLATE.format(question=question)
    return text if answer is None else f"{text} {answer}\n"


@dataclass
class Question:
    """A question about an image and its reference answers (VQAv2: ten annotators'). `ref` as in Record."""
    image_id: str
    question: str
    answers: list[str]
    type: str
    ref: str | int

    @property
    def answer(self) -> str:
        """What training teaches and a solved example shows: the most frequent answer (VQAv2's choice)."""
        return max(self.answers, key=self.answers.count)


def load_questions(cfg: Config) -> tuple[list[Question], ImageStore, dict[str, str]] | None:
    """QA_DATASET's usable questions, the store of their images and {row: why} of the rows skipped; None without
    QA_DATASET. Cheap, so that a wrong source fails before any model is loaded."""
    if not cfg.qa_dataset:
        if cfg.qa_mix or cfg.qa_shots:
            raise UserError(f"QA_MIX={cfg.qa_mix} and QA_SHOTS={cfg.qa_shots} need QA_DATASET (a question source)", 2)
        return None
    source = Path(cfg.qa_dataset).expanduser()
    columns = {"QA_IMAGE_COLUMN": cfg.qa_image_column, "QA_QUESTION_COLUMN": cfg.qa_question_column,
               "QA_ANSWERS_COLUMN": cfg.qa_answers_column, "QA_TYPE_COLUMN": cfg.qa_type_column}
    if source.suffix in (".jsonl", ".csv") or looks_local(cfg.qa_dataset):
        if not source.is_file():
            raise UserError(f"QA_DATASET={cfg.qa_dataset}: no such .jsonl or .csv file (check the path)")
        table = read_table(source, lists=(cfg.qa_answers_column,))
        check_columns("QA_DATASET", cfg.qa_dataset, {k for r in table for k in r}, columns, ("QA_TYPE_COLUMN",))
        values, store = {k: [r.get(c) for r in table] for k, c in columns.items()}, ImageStore()
        ids = values["QA_IMAGE_COLUMN"]  # paths as written: `file_key` tells which are caption images too
        refs = [str(Path(cfg.qa_image_dir or source.parent).expanduser() / i) if i else None for i in ids]
    else:
        values, store = hub_columns("QA_DATASET", cfg.qa_dataset, cfg.qa_split, cfg,
                                    {**columns, "QA_ID_COLUMN": cfg.qa_id_column}, ("QA_TYPE_COLUMN",))
        ids, refs = values["QA_ID_COLUMN"], range(len(values["QA_ID_COLUMN"]))
    questions, skipped = [], {}
    for n, (i, ref, text, answers, kind) in enumerate(zip(ids, refs, values["QA_QUESTION_COLUMN"],
                                                          values["QA_ANSWERS_COLUMN"], values["QA_TYPE_COLUMN"])):
        q = Question(str(i), " ".join(str(text or "").split()), answer_texts(answers), str(kind or ""), ref)
        why = "no image" if i in (None, "") else "empty question" if not q.question else "" if q.answers else "no answer"
        if why:
            skipped[f"row {n + 1}"] = why
        else:
            questions.append(q)
    return questions, store, skipped


def answer_texts(answers) -> list[str]:
    """Reference answers from a string, a list of strings, or VQAv2's list of {"answer": ...} (or the dict of
    lists a hub dataset makes of it)."""
    answers = answers.get("answer") if isinstance(answers, dict) else answers
    return _clean_captions([a.get("answer") if isinstance(a, dict) else a for a in answers]
                           if isinstance(answers, list) else answers)


# =============================================================================================
# Vision encoder and feature cache
# =============================================================================================

class VisionEncoder(nn.Module):
    """Frozen CLIP (the 512-d projected image embedding) or ViT (the 768-d CLS token); with patches=True,
    the vision tower's final hidden states at every position instead (CLS first, then the patch grid row
    by row: CLIP B/32 50 x 768, ViT-B/16 197 x 768), what a Q-Former cross-attends."""

    def __init__(self, kind: str, name: str, token: str, device: torch.device, dtype: torch.dtype,
                 patches: bool = False):
        super().__init__()
        from transformers import AutoImageProcessor, CLIPModel, ViTModel
        var = "VISION_MODEL"
        self.kind, self.name, self.patches = kind, name, patches
        self.processor = call_hub(var, name, AutoImageProcessor.from_pretrained, name, token=token or None)
        if kind == "clip":
            clip = call_hub(var, name, CLIPModel.from_pretrained, name, token=token or None, dtype=dtype)
            self.backbone, self.projection = clip.vision_model, clip.visual_projection  # the text tower is dropped
            self.dim = clip.config.projection_dim
        else:
            self.backbone = call_hub(var, name, ViTModel.from_pretrained, name, token=token or None, dtype=dtype,
                                     add_pooling_layer=False)
            self.projection, self.dim = None, self.backbone.config.hidden_size
        self.commit = getattr(self.backbone.config, "_commit_hash", None)
        vision = self.backbone.config
        self.grid = vision.image_size // vision.patch_size  # patches per side
        self.feature_shape = (self.grid ** 2 + 1, vision.hidden_size) if patches else (self.dim,)
        self.to(device).eval().requires_grad_(False)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=to_rgb(image), return_tensors="pt")["pixel_values"][0]

    def unprocess(self, pixel_values: torch.Tensor) -> Image.Image:
        """What the encoder saw: preprocessed pixels (3, H, W) back to an RGB image (resized and cropped)."""
        p = self.processor
        mean, std = (p.image_mean, p.image_std) if getattr(p, "do_normalize", True) else ((0, 0, 0), (1, 1, 1))
        rgb = pixel_values.float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
        rgb = (rgb.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).contiguous()
        return Image.frombytes("RGB", (rgb.shape[1], rgb.shape[0]), rgb.numpy().tobytes())

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, *feature_shape) in fp32
        p = next(self.parameters())
        out = self.backbone(pixel_values=pixel_values.to(p.device, p.dtype))
        if self.patches:
            return out.last_hidden_state.float()
        emb = self.projection(out.pooler_output) if self.projection is not None else out.last_hidden_state[:, 0]
        return emb.float()


class _EncodeSet(torch.utils.data.Dataset):
    """Decodes and preprocesses one image per item; a bad image yields None instead of raising."""

    def __init__(self, records, store, encoder):
        self.records, self.store, self.preprocess = records, store, encoder.preprocess

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        try:
            return i, self.preprocess(self.store.open(self.records[i].ref)), None
        except Exception as e:  # missing file, truncated JPEG, not an image, ...
            return i, None, f"{type(e).__name__}: {e}"


def _keep_batch(items):
    return items


def encode_records(records, store, encoder: VisionEncoder, cfg: Config) -> tuple[torch.Tensor, dict[str, str]]:
    """Every record's image encoded, batched: (N, *feature_shape) features and {image_id: why} for bad images."""
    features = torch.zeros(len(records), *encoder.feature_shape)
    return features, encode_records_into(features, records, store, encoder, cfg)


def encode_records_into(out: torch.Tensor, records, store, encoder: VisionEncoder, cfg: Config) -> dict[str, str]:
    """Encode records[i] into out[i], batched, with a progress bar; returns {image_id: why} for bad images
    (their rows are left as they were). `out` may be any slice of a table, a memory-mapped one included,
    so that the work can be shared out."""
    loader = torch.utils.data.DataLoader(_EncodeSet(records, store, encoder), batch_size=cfg.eval_batch_size,
                                         num_workers=cfg.num_workers, collate_fn=_keep_batch)
    bad = {}
    bar = progress_bar(total=len(records), desc="encoding images", unit="img")
    for items in loader:
        good = [(i, px) for i, px, _ in items if px is not None]
        bad.update({records[i].image_id: why for i, px, why in items if px is None})
        if good:
            idx = torch.tensor([i for i, _ in good])
            out[idx] = encoder(torch.stack([px for _, px in good])).cpu().to(out.dtype)
        bar.update(len(items))
    bar.close()
    return bad


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _local_files_fingerprint(path: str) -> list | None:
    p = Path(path).expanduser()
    if not p.is_dir():
        return None
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(p.iterdir()) if f.is_file()]


def feature_cache_path(cfg: Config, encoder: VisionEncoder, records, store: ImageStore) -> Path:
    """The cache for these records under this encoder: a file of pooled features, or a folder of patch
    tokens (see `cached_patch_tokens`), so both caches of one encoder coexist. Any change gives another."""
    model_key = {"kind": cfg.vision_encoder, "name": encoder.name, "commit": encoder.commit,
                 "files": _local_files_fingerprint(encoder.name), "processor": encoder.processor.to_dict()}
    data_key = {"dataset": cfg.dataset, "split": cfg.dataset_split, "column": cfg.image_column,
                "hub": getattr(store.hub_dataset, "_fingerprint", None),
                "records": [(r.image_id, r.ref if isinstance(r.ref, int) else _file_stamp(r.ref)) for r in records]}
    name = f"{cfg.vision_encoder}{'-patches' if encoder.patches else ''}-{_fingerprint(model_key)}-{_fingerprint(data_key)}"
    return Path(cfg.cache_dir) / "features" / (name if encoder.patches else f"{name}.pt")


def _file_stamp(path: str):
    try:
        st = os.stat(path)
        return [path, st.st_size, st.st_mtime_ns]
    except OSError:
        return [path, None]


def cached_features(cfg: Config, encoder: VisionEncoder, records, store) -> tuple[dict[str, torch.Tensor], dict]:
    """{image_id: feature} for every decodable image, computed once and then read from CACHE_DIR. A run that
    finds another one writing the same cache waits for it (its lock), then reads it."""
    path = feature_cache_path(cfg, encoder, records, store)
    with holding_lock(output_path(path.parent, f".{path.name}", "lock"), re.compile(re.escape(path.name))):
        if encoder.patches:
            return cached_patch_tokens(path, records, store, encoder, cfg)
        blob = open_cache(path, lambda p: torch.load(p, weights_only=True), records, encoder.feature_shape)
        if all(DIST.gather(blob is not None, patient=True)):  # one answer for all ranks
            log.info(f"image features: read {len(blob['ids'])} from cache {path}")
        else:
            shares = DIST.gather(encode_records(records[DIST.share(len(records))], store, encoder, cfg), patient=True)
            feats, bad = torch.cat([f for f, _ in shares]), {i: why for _, b in shares for i, why in b.items()}
            ok = [i for i, r in enumerate(records) if r.image_id not in bad]
            blob = {"ids": [records[i].image_id for i in ok], "features": feats[ok].contiguous(), "bad": bad}
            if DIST.is_main:
                atomic_save(blob, path)
            log.info(f"image features: encoded {len(ok)} images, cached in {path}")
    return dict(zip(blob["ids"], blob["features"])), blob["bad"]


def open_cache(path: Path, read, records, feature_shape: tuple) -> dict | None:
    """A feature cache as `read(path)` gives it ({"ids", "features", "bad"}), or None if there is none; or if it is
    unreadable or does not hold the records' rows (truncated, damaged): derived data, said and computed again."""
    try:
        blob = read(path) if path.exists() else None
        if blob is not None and (blob["features"].shape != (len(blob["ids"]), *feature_shape)
                                 or set(blob["ids"]) | set(blob["bad"]) != {r.image_id for r in records}):
            raise ValueError(f"rows {tuple(blob['features'].shape)} for {len(blob['ids'])} ids, not {len(records)} of {feature_shape}")
        return blob
    except Exception as e:
        why = " ".join(str(e).split()).split(". ")[0][:200]  # torch's messages run to paragraphs
        log.warning(f"the feature cache {path} is damaged ({type(e).__name__}: {why}); computing it again")
        return None


PATCH_TABLE, PATCH_INDEX = "tokens.npy", "index.json"


def cached_patch_tokens(path: Path, records, store, encoder: VisionEncoder, cfg: Config) -> tuple[dict, dict]:
    """{image_id: (P, D) fp16 patch tokens} read memory-mapped from the cache folder `path` (written once):
    the table (Flickr30k: 2.4 GB for CLIP B/32, 9.6 GB for ViT-B/16) is never loaded whole into RAM, the
    OS pages in the rows a batch gathers. Copy-on-write, so no stray write can reach the cache file."""
    written = DIST.from_main(lambda: open_cache(path, read_patch_cache, records, encoder.feature_shape) is None)
    if written and DIST.is_main:  # under torchrun rank 0 encodes them all while the others wait
        write_patch_cache(path, records, store, encoder, cfg)
    DIST.barrier()
    blob = read_patch_cache(path)
    rows = {i: blob["features"][n] for n, i in enumerate(blob["ids"]) if i not in blob["bad"]}
    log.info(f"patch tokens: {'encoded' if written else 'read'} {len(rows)} images, "
             f"{'cached in' if written else 'from cache'} {path}")
    return rows, blob["bad"]


def read_patch_cache(path: Path) -> dict:
    import numpy as np
    return {**json.loads((path / PATCH_INDEX).read_text()),
            "features": torch.from_numpy(np.load(path / PATCH_TABLE, mmap_mode="c"))}  # (N, P, D) fp16


def write_patch_cache(path: Path, records, store, encoder: VisionEncoder, cfg: Config) -> None:
    """Encode every record's patch tokens straight into an fp16 .npy on disk (a row per record), beside the
    list of ids and bad images, in a temp folder renamed into place once complete: a crash never leaves a
    half-written cache under the final name."""
    import numpy as np
    shape = (len(records), *encoder.feature_shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(path.parent, math.prod(shape) * 2, "the patch-token cache")
    try:
        with atomic_folder(path) as tmp:
            table = np.lib.format.open_memmap(tmp / PATCH_TABLE, mode="w+", dtype=np.float16, shape=shape)
            reserve_disk_space(tmp / PATCH_TABLE)
            bad = encode_records_into(torch.from_numpy(table), records, store, encoder, cfg)
            table.flush()
            del table
            index = {"ids": [r.image_id for r in records], "bad": bad}
            atomic_write(tmp / PATCH_INDEX, lambda fh: fh.write(json.dumps(index).encode()))
    except Exception as e:
        if isinstance(e, UserError) or not _os_error_in(e):
            raise
        raise UserError(f"could not write the patch-token cache in {path.parent} ({_os_error_in(e)}); free disk "
                        "space or point CACHE_DIR at a larger disk") from e


# =============================================================================================
# Adapter, language model and fast path
# =============================================================================================

class MLPAdapter(nn.Module):
    """2-layer MLP: one image embedding -> NUM_VISUAL_TOKENS vectors of the LM's hidden size."""

    def __init__(self, in_dim: int, hidden: int, num_tokens: int, lm_dim: int):
        super().__init__()
        self.num_tokens, self.lm_dim = num_tokens, lm_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, num_tokens * lm_dim))

    def forward(self, x):  # (B, D) -> (B, V, H)
        return self.net(x).view(x.shape[0], self.num_tokens, self.lm_dim)


class QueryBlock(nn.Module):
    """One Q-Former layer, pre-norm with residuals: the queries attend to each other, then to the image's
    patch tokens, then pass an MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.self_norm, self.cross_norm, self.mlp_norm = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, queries, patches, need_weights: bool = False):  # (B, V, D), (B, P, D) -> (B, V, D), (B, V, P)
        x = self.self_norm(queries)
        queries = queries + self.self_attention(x, x, x, need_weights=False)[0]
        seen, weights = self.cross_attention(self.cross_norm(queries), patches, patches, need_weights=need_weights)
        queries = queries + seen
        return queries + self.mlp(self.mlp_norm(queries)), weights


class QFormer(nn.Module):
    """BLIP-2-style bridge: NUM_VISUAL_TOKENS learned queries read the frozen encoder's patch tokens through
    QFORMER_LAYERS query blocks of the encoder's width, then a projection to the LM's hidden size.

    Cross-attention is blind to the order of the tokens it reads, and an encoder's final hidden states keep
    where each patch sits only as far as its own training needed, so each position gets a learned
    embedding added (starting at zero): the queries can tell a shape on the left from one on the right."""

    def __init__(self, patch_shape: tuple[int, int], num_tokens: int, layers: int, lm_dim: int):
        super().__init__()
        num_patches, patch_dim = patch_shape
        self.num_tokens, self.lm_dim = num_tokens, lm_dim
        self.queries = nn.Parameter(torch.randn(num_tokens, patch_dim) * 0.02)
        self.patch_norm = nn.LayerNorm(patch_dim)  # CLIP's final hidden states are not layer-normed (ViT's are)
        self.patch_positions = nn.Parameter(torch.zeros(num_patches, patch_dim))
        self.blocks = nn.ModuleList(QueryBlock(patch_dim, attention_heads(patch_dim)) for _ in range(layers))
        self.out_norm = nn.LayerNorm(patch_dim)
        self.projection = nn.Linear(patch_dim, lm_dim)

    def forward(self, patches):  # (B, P, D) -> (B, V, H)
        return self.read(patches)[0]

    def attention(self, patches):  # (B, P, D) -> (B, V, P)
        """Where each query looks: the last block's cross-attention, averaged over heads (rows sum to 1)."""
        return self.read(patches, need_weights=True)[1]

    def read(self, patches, need_weights: bool = False):
        patches = self.patch_norm(patches) + self.patch_positions  # (B, P, D)
        queries = self.queries.expand(patches.shape[0], -1, -1)  # (B, V, D)
        weights = None
        for block in self.blocks:
            queries, weights = block(queries, patches, need_weights)
        return self.projection(self.out_norm(queries)), weights


def attention_heads(width: int) -> int:
    """Heads of at least 64 dimensions (768 -> 12, as in BERT-base and BLIP-2's Q-Former); 1 for narrow widths."""
    return max((h for h in range(1, width // 64 + 1) if width % h == 0), default=1)


def make_adapter(cfg: Config, feature_shape: tuple, lm_dim: int) -> nn.Module:
    """ADAPTER: the MLP over one image embedding (D,), or the Q-Former over patch tokens (P, D)."""
    if cfg.adapter == "qformer":
        return QFormer(feature_shape, cfg.num_visual_tokens, cfg.qformer_layers, lm_dim)
    return MLPAdapter(feature_shape[0], cfg.adapter_hidden, cfg.num_visual_tokens, lm_dim)


def resolve_device(cfg: Config) -> tuple[torch.device, torch.dtype]:
    """DTYPE=auto: bf16 on a GPU that supports it; fp32 on CPU, where bf16 matmuls crawl."""
    if DIST.launched and cfg.device in ("auto", "cuda") and torch.cuda.is_available():
        if DIST.local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started more processes on this machine than the {torch.cuda.device_count()} "
                            "visible GPUs: set --nproc_per_node to the number of GPUs at most", exit_code=2)
        device = torch.device("cuda", DIST.local_rank)  # torchrun: one GPU per process
    elif DIST.world_size > 1 and cfg.device.startswith("cuda:"):
        raise UserError(f"DEVICE={cfg.device} would put all {DIST.world_size} processes on one GPU: set DEVICE=auto "
                        "(each takes cuda:LOCAL_RANK; choose the GPUs with CUDA_VISIBLE_DEVICES)", exit_code=2)
    elif cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"DEVICE={cfg.device} but no CUDA GPU is visible (set DEVICE=auto or cpu)", exit_code=2)
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise UserError("DEVICE=mps but MPS is not available (set DEVICE=auto or cpu)", exit_code=2)
    check_tuning_support(cfg, device)  # here, so that every command judges it before any download
    if cfg.dtype == "fp32" or (cfg.dtype == "auto" and not (device.type == "cuda" and torch.cuda.is_bf16_supported())):
        return device, torch.float32
    return device, torch.bfloat16


def check_tuning_support(cfg: Config, device: torch.device) -> None:
    """TUNING=lora needs peft, QLORA=1 also bitsandbytes and a CUDA GPU; all optional, so the default
    recipe never imports them."""
    if cfg.tuning != "lora":
        return
    require_package("peft", "TUNING=lora")
    if not cfg.qlora:
        return
    if device.type != "cuda":
        raise UserError(f"QLORA=1 needs a CUDA GPU (bitsandbytes 4-bit kernels) and the device is {device}: "
                        "set QLORA=0 to train LoRA on the unquantized LM", exit_code=2)
    require_package("bitsandbytes", "QLORA=1")
    require_package("accelerate", "QLORA=1")  # transformers places quantized weights through it


def read_lm_config(cfg: Config):
    """The LM's config.json only: enough to judge TOP_K before a multi-GB weight download."""
    from transformers import AutoConfig
    return call_hub("LM_MODEL", cfg.lm_model, AutoConfig.from_pretrained, cfg.lm_model,
                    token=cfg.hf_token or None, trust_remote_code=cfg.trust_remote_code)


def load_language_model(cfg: Config, device, dtype):
    """The LM (frozen weights in `dtype`) and its tokenizer, with pad/EOS sorted out."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kw = dict(token=cfg.hf_token or None, trust_remote_code=cfg.trust_remote_code)
    tokenizer = call_hub("LM_MODEL", cfg.lm_model, AutoTokenizer.from_pretrained, cfg.lm_model, **kw)
    lm = call_hub("LM_MODEL", cfg.lm_model, AutoModelForCausalLM.from_pretrained, cfg.lm_model, dtype=dtype,
                  attn_implementation="sdpa", **quantization_kwargs(cfg, device, dtype), **kw)
    if tokenizer.eos_token_id is None:
        raise UserError(f"LM_MODEL={cfg.lm_model}: its tokenizer has no EOS token, so captions could not end")
    if tokenizer.pad_token_id is None:  # Qwen3-Base may ship without one; pads are masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return (lm if cfg.qlora else lm.to(device)), tokenizer


def quantization_kwargs(cfg: Config, device, dtype) -> dict:
    """QLORA=1: load the LM's linear layers in 4-bit NF4, straight onto the GPU (a 4-bit model cannot be
    moved with .to); they compute in DTYPE. Embeddings, norms and the head stay in DTYPE."""
    if not cfg.qlora:
        return {}
    from transformers import BitsAndBytesConfig
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                      bnb_4bit_use_double_quant=True)
    return {"quantization_config": quantization, "device_map": {"": device}}


def freeze_except_top_k(lm, top_k: int) -> None:
    """Freeze the whole LM, then unfreeze its top K blocks (kept in fp32: they are trained).

    Embeddings and the (tied) LM head stay frozen, so the LM keeps its vocabulary as it was."""
    lm.requires_grad_(False)
    blocks = list(decoder_blocks(lm))
    for block in blocks[len(blocks) - top_k:] if top_k else []:
        block.float().requires_grad_(True)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def choose_trainable(lm, cfg: Config) -> None:
    """TUNING: the LM trains its top TOP_K blocks, or LoRA matrices on every block (TOP_K is then ignored)."""
    if cfg.tuning == "lora":
        add_lora(lm, cfg)
    else:
        freeze_except_top_k(lm, cfg.top_k)


def add_lora(lm, cfg: Config) -> None:
    """Freeze the whole LM, then add LoRA matrices to the attention and MLP projections of every block.

    peft injects them in place, so the LM stays an ordinary transformers model: generation, the compiled
    fast path and `decoder_base` work unchanged. peft creates them in the base weights' dtype; they are
    kept in fp32 since they are trained (the frozen base may be bf16 or 4-bit)."""
    from peft import LoraConfig, inject_adapter_in_model
    lm.requires_grad_(False)
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(LORA_TARGETS), bias="none")
    try:
        inject_adapter_in_model(lora, lm)
    except ValueError as e:
        if "not found in the base model" not in str(e):
            raise
        raise UserError(f"TUNING=lora: LM_MODEL={cfg.lm_model} has none of the projections LoRA targets "
                        f"({', '.join(LORA_TARGETS)}); use TUNING=topk", exit_code=2) from None
    for name, module in lm.named_modules():
        if name.endswith((".lora_A", ".lora_B")):
            module.float()


def decoder_base(lm):
    """The LM without its head: returns hidden states, so the head can run where labels exist."""
    return lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model


def decoder_blocks(lm) -> nn.ModuleList:
    if not hasattr(decoder_base(lm), "layers"):
        raise UserError(f"{type(lm).__name__} keeps no `model.layers`; only decoder-only LMs of that layout work")
    return decoder_base(lm).layers


LENGTH_BUCKETS = 4  # text lengths the compiled fast path pads to: at most 4 graphs for training, 4 for evaluation


class Captioner(nn.Module):
    """Adapter + LM. Holds the tokenizer, the prompts, the precision policy and the input shapes in one place."""

    def __init__(self, cfg: Config, feature_shape: tuple, lm, tokenizer, device, dtype):
        super().__init__()
        self.lm, self.tokenizer, self.device, self.dtype = lm, tokenizer, device, dtype
        hidden = lm.get_input_embeddings().embedding_dim
        self.adapter = make_adapter(cfg, feature_shape, hidden).to(device)
        choose_trainable(lm, cfg)  # after the adapter, whose initialisation is then the same for every TUNING
        self.adapter.requires_grad_(not cfg.freeze_adapter)
        self.prompt_ids = self.tokenize_prompt(cfg.prompt)
        # PROMPTS: training draws one of these per pair, so that the model does not overfit one wording
        self.train_prompt_ids = [self.tokenize_prompt(p.strip()) for p in cfg.prompts.split(";") if p.strip()]
        self.caption_prefix = " " if cfg.prompt else ""
        self.max_caption_tokens = cfg.max_caption_tokens
        # The compiled fast path pads every batch to one of a few shapes, so that it compiles a few graphs,
        # not one per caption length: rows up to the batch size (this process's share of BATCH_SIZE in
        # training, EVAL_BATCH_SIZE otherwise), text up to one of LENGTH_BUCKETS lengths. Eager runs pad
        # to the batch's own longest.
        self.fixed_shapes = False
        self.rows_per_batch = {True: cfg.batch_size // DIST.world_size, False: cfg.eval_batch_size}
        longest = max(len(p) for p in [self.prompt_ids, *self.train_prompt_ids]) + cfg.max_caption_tokens + 1
        self.length_buckets = sorted({max(8, longest - 8 * i) for i in range(LENGTH_BUCKETS)})
        self.feature_shape = tuple(feature_shape)  # of one image: (D,) pooled, (P, D) patch tokens
        lm.config.use_cache = False

    def tokenize_prompt(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    # ---- precision in one place ----
    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def trainable_names(self) -> list[str]:
        """What a checkpoint holds: the trained weights, and the adapter also when FREEZE_ADAPTER keeps it as it came."""
        return [n for n, p in self.named_parameters() if p.requires_grad or n.startswith("adapter.")]

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host -> device without a hidden sync: a copy from pageable memory waits for the GPU to drain
        its queue, one from pinned memory does not."""
        if self.device.type != "cuda" or t.device.type != "cpu":
            return t.to(self.device)
        return t.contiguous().pin_memory().to(self.device, non_blocking=True)  # an expanded view cannot be pinned

    # ---- inputs ----
    def tokenize_captions(self, captions: list[str], prefix: str | None = None) -> list[list[int]]:
        """Caption (or answer) token ids, truncated, with EOS appended (what the model must learn to emit)."""
        prefix = self.caption_prefix if prefix is None else prefix
        ids = self.tokenizer([prefix + c for c in captions], add_special_tokens=False)["input_ids"]
        return [x[: self.max_caption_tokens] + [self.tokenizer.eos_token_id] for x in ids]

    def layout(self, caption_ids: list[list[int]], prompt_ids=None, shots=None):
        """The batch's sequences on the host: token ids, attention mask and labels (B', T), and `places` (N, 2):
        the (row, position) where each image's visual tokens start (the token ids there are pads).

        A row is [visual][prompt][caption][EOS]; with shots (per row, the texts of solved examples, Frozen-style,
        each after its own image) [visual][shot]...[visual][prompt][caption][EOS], still causal and right-padded.
        Labels are -100 everywhere except at caption and EOS positions. Rows pad to the longest of the
        batch; with fixed shapes, to a length bucket, and extra rows fill the batch up: fully attended
        (so their activations stay finite), never supervised."""
        prompts = prompt_ids or [self.prompt_ids] * len(caption_ids)
        rows = [[*s, p + c] for s, p, c in zip(shots or [[]] * len(caption_ids), prompts, caption_ids)]
        V = self.adapter.num_tokens
        T, B = max(sum(V + len(text) for text in texts) for texts in rows), len(rows)
        if self.fixed_shapes:
            T = V + next((b for b in self.length_buckets if b >= T - V), T - V)
            B = max(B, self.rows_per_batch[self.training])
        ids = torch.full((B, T), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.ones(B, T, dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        places = []
        for b, (texts, c) in enumerate(zip(rows, caption_ids)):
            at = 0
            for text in texts:
                places.append((b, at))
                ids[b, at + V: at + V + len(text)] = torch.tensor(text, dtype=torch.long)
                at += V + len(text)
            mask[b, at:] = 0
            labels[b, at - len(c): at] = torch.tensor(c, dtype=torch.long)
        return ids, mask, labels, torch.tensor(places, dtype=torch.long)

    def embed(self, features: torch.Tensor, ids: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
        """Input embeddings (B', T, H) of laid-out sequences: the tokens', and each image's visual tokens at its place."""
        visual = self.adapter(self.to_device(features))  # (N, V, H)
        text = self.lm.get_input_embeddings()(ids)
        columns = places[:, 1:] + torch.arange(visual.shape[1], device=places.device)  # (N, V)
        return text.index_put((places[:, :1].expand_as(columns), columns), visual.to(text.dtype))

    # ---- the decoder blocks: eager, or the compiled fast path ----
    def run_blocks(self, embeds: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The decoder stack without its head: (B, T, H) input embeddings -> (B, T, H) hidden states."""
        return decoder_base(self.lm)(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state

    def run_decoder(self, embeds: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        try:
            if self.fixed_shapes:  # CUDA graphs (COMPILE=max): the previous step's outputs may now be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            return self.run_blocks(embeds, mask)
        except Exception as e:
            if not self.fixed_shapes or isinstance(e, torch.OutOfMemoryError):
                raise
            self.go_eager(e)  # a real bug fails again below, eagerly, with its own traceback
            return self.run_blocks(embeds, mask)

    def use_fast_path(self, training: bool, cuda_graphs: bool = False) -> None:
        """Regional compilation: each decoder block is compiled on its own and all blocks share the compiled code
        (one graph per padded shape for frozen and one for trained blocks, in training and in evaluation), so a
        shape costs one block to compile, not the 28-block stack. Kernels fuse the RMSNorm, RoPE, SwiGLU and
        dtype-cast elementwise work that dominates eager launches; attention gets no mask (see `token_losses`).
        cuda_graphs (COMPILE=max, CUDA only): each block's kernels replay as one CUDA graph.
        Never silently eager: a graph break, one graph too many or a compile error, forward or backward (compiled
        with its forward), is one warning line, and the run goes on eager. Training compiles its first graph
        here; under torchrun every graph compiles here (see `compile_every_shape`)."""
        mode = "reduce-overhead" if cuda_graphs and self.device.type == "cuda" else None
        if cuda_graphs and not mode:
            log.info(f"COMPILE=max: CUDA graphs need a CUDA GPU, so on {self.device} it compiles as COMPILE=1 does")
        was_training = self.training
        try:
            torch._dynamo.config.recompile_limit += 4 * len(self.length_buckets)  # the blocks' graphs, on top of the rest
            torch._dynamo.config.fail_on_recompile_limit_hit = True
            torch._functorch.config.force_non_lazy_backward_lowering = True
            for block in decoder_blocks(self.lm):
                block.compile(dynamic=False, fullgraph=True, mode=mode)
                for p in block.parameters() if mode else []:  # a CUDA graph's outputs live until its next replay:
                    if p.requires_grad:  # a gradient kept over GRAD_ACCUM micro-batches must be a copy
                        p.register_hook(torch.clone)
            self.fixed_shapes = True
            if training:
                self.train()
                self(torch.zeros(1, *self.feature_shape), [[self.tokenizer.eos_token_id]]).backward()
        except Exception as e:
            self.go_eager(e)
        self.zero_grad(set_to_none=True)
        self.train(was_training)
        if DIST.launched:
            self.compile_every_shape(training)

    def go_eager(self, why: Exception | None = None) -> None:
        """Leave the fast path: eager blocks, batches padded to their own longest. `why`: the compile failure
        that forces it, said in one warning line."""
        if why is not None:
            text = (str(why).strip().splitlines() or [""])[0][:200]
            log.warning(f"torch.compile failed ({type(why).__name__}: {text}); continuing eager "
                        "(COMPILE=0 skips compiling)")
        for block in decoder_blocks(self.lm):
            block._compiled_call_impl = None  # what Module.compile set
        self.fixed_shapes = False

    @contextlib.contextmanager
    def eager(self):
        """Eager for the duration of a with-block (a comparison), then back on the path it was on."""
        fixed, self.fixed_shapes = self.fixed_shapes, False
        try:
            with torch.compiler.set_stance("force_eager") if fixed else contextlib.nullcontext():
                yield
        finally:
            self.fixed_shapes = fixed

    def compile_every_shape(self, training: bool) -> None:
        """Compile now the graph of every padded shape (each length bucket; for evaluation, and forward and
        backward for training). Under torchrun each rank does so in `use_fast_path`: compiled on first use
        instead, a rank would compile while the others wait for it in a lockstep exchange (LOCKSTEP_TIMEOUT)."""
        if not self.fixed_shapes:
            return
        was_training = self.training
        features, no_prompt = torch.zeros(1, *self.feature_shape), [[]]  # the caption alone sets the length
        for length in self.length_buckets:
            caption = [[self.tokenizer.eos_token_id] * length]
            self.eval()
            with torch.no_grad():
                self.token_losses(features, caption, no_prompt)
            if training:
                self.train()
                self(features, caption, no_prompt).backward()
        self.zero_grad(set_to_none=True)
        self.train(was_training)

    # ---- losses ----
    def token_losses(self, features, caption_ids, prompt_ids=None, shots=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token cross-entropy at supervised positions only, and the row each belongs to.

        The 151,936-wide LM head runs only where a label exists, never over the whole (batch x
        sequence x vocabulary), and the loss itself is computed in fp32. Where the labels are is known
        on the host, so gathering those positions needs no device-to-host sync.

        Rows are right-padded and attention is causal, so no pad precedes a position that is read: the
        decoder runs without a padding mask, and SDPA takes its causal flash / memory-efficient kernels with
        grouped-query heads as they are. A row with a pad before a real token (left padding) keeps the mask."""
        ids, mask, labels, places = self.layout(caption_ids, prompt_ids, shots)
        targets = labels[:, 1:]
        positions = (targets != -100).flatten().nonzero()[:, 0]  # into (B' x (T - 1))
        rows = positions // targets.shape[1]
        mask = self.to_device(mask) if (mask[:, 1:] > mask[:, :-1]).any() else None
        ids, places, positions, targets, rows = (self.to_device(t) for t in (
            ids, places, positions, targets.flatten()[positions], rows))
        with self.autocast():
            hidden = self.run_decoder(self.embed(features, ids, places), mask)
            hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, positions)
            logits = self.lm.get_output_embeddings()(hidden)
        return F.cross_entropy(logits.float(), targets, reduction="none"), rows

    def forward(self, features, caption_ids, prompt_ids=None, tokens: float = 0) -> torch.Tensor:
        """The training loss: the mean over all supervised tokens of the batch (as `lm(..., labels=...)`
        would give), or their sum divided by `tokens` (a share of a global batch: see `train_step`).
        A forward, so that wrappers (DistributedDataParallel) see the training call."""
        losses = self.token_losses(features, caption_ids, prompt_ids)[0]
        return losses.sum() / tokens if tokens else losses.mean()

    def caption_log_likelihood(self, features, caption_ids) -> torch.Tensor:
        """Mean per-token log-likelihood of each caption given its image and the prompt: (B,)."""
        losses, rows = self.token_losses(features, caption_ids)
        total = torch.zeros(len(caption_ids), device=losses.device).index_add_(0, rows, losses)
        counts = torch.bincount(rows, minlength=len(caption_ids)).clamp(min=1)
        return -(total / counts)

    # ---- generation ----
    @torch.no_grad()
    def generate(self, features: torch.Tensor, decoding: dict, prompt_ids=None, shots=None) -> list[str]:
        """Batched captions with the KV cache, or under per-row prompts (questions, after solved examples:
        see `layout`) answers. Rows of different lengths are left-padded, since generation goes on at the
        end of every row (the LM numbers positions from the attention mask, so padding changes nothing)."""
        n = len(prompt_ids) if prompt_ids else len(features)
        ids, mask, _, places = self.layout([[]] * n, prompt_ids, shots)
        lengths = mask[:n].sum(1)
        T = int(lengths.max())  # fixed shapes pad for the compiled blocks, which generation does not use
        left = ((torch.arange(T) - (T - lengths)[:, None]) % T)  # (n, T): row b's pads moved to its front
        with self.autocast(), self.eager():  # the fast path's shapes are not decoding's
            prefix = self.embed(features, self.to_device(ids[:n, :T]), self.to_device(places))
            prefix = prefix.gather(1, self.to_device(left)[..., None].expand(-1, -1, prefix.shape[-1]))
            with warnings.catch_warnings():  # "n-gram blocking sees only the new tokens": what we want
                warnings.filterwarnings("ignore", message="Passing `no_repeat_ngram_size` with `inputs_embeds`")
                out = self.lm.generate(inputs_embeds=prefix.to(self.lm.dtype), use_cache=True,
                                       attention_mask=self.to_device(mask[:n, :T].gather(1, left)),
                                       pad_token_id=self.tokenizer.pad_token_id,
                                       **{"eos_token_id": self.tokenizer.eos_token_id, **decoding})
        stops = decoding.get("eos_token_id", [self.tokenizer.eos_token_id])
        texts = []
        for row in out.tolist():  # with inputs_embeds only, generate returns just the new tokens
            row = row[: next((k for k, t in enumerate(row) if t in stops), len(row))]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    @functools.cached_property
    def answer_stops(self) -> list[int]:
        """EOS and every token with a newline in it (Qwen has ".\n", "\n\n", ...): where an answer ends."""
        texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
        return [self.tokenizer.eos_token_id] + [i for i, t in enumerate(texts) if "\n" in t]


def decoding_kwargs(cfg: Config) -> dict:
    """DECODING -> keyword arguments of `generate`."""
    kw = dict(max_new_tokens=cfg.max_new_tokens, no_repeat_ngram_size=cfg.no_repeat_ngram or None,
              do_sample=False, num_beams=1)
    if cfg.decoding == "beam":
        kw.update(num_beams=cfg.num_beams, length_penalty=cfg.length_penalty, early_stopping=True)
    elif cfg.decoding == "sample":
        kw.update(do_sample=True, top_k=cfg.sample_top_k or None, temperature=cfg.temperature, top_p=cfg.top_p)
    return kw


def build_model(cfg: Config, device, dtype) -> tuple[VisionEncoder, Captioner]:
    check_top_k(cfg, read_lm_config(cfg).num_hidden_layers)
    encoder = VisionEncoder(cfg.vision_encoder, cfg.vision_model_id, cfg.hf_token, device, dtype,
                            patches=cfg.adapter == "qformer")
    lm, tokenizer = load_language_model(cfg, device, dtype)
    if cfg.liger:
        use_liger_kernels(lm, device)
    torch.manual_seed(cfg.seed)  # the adapter's initialisation
    model = Captioner(cfg, encoder.feature_shape, lm, tokenizer, device, dtype)
    return encoder, model


def use_liger_kernels(lm, device: torch.device) -> None:
    """LIGER=1: swap the LM's RMSNorm, RoPE and SwiGLU for Liger-Kernel's fused Triton kernels (CUDA only).
    Its fused linear cross-entropy is left out: it chunks the vocabulary for long sequences, while our head
    runs on ~1k supervised positions a batch, where chunking adds launches."""
    why = None
    if device.type != "cuda":
        why = "its Triton kernels need a CUDA GPU"
    elif lm.config.model_type != "qwen3":
        why = f"it is wired here for Qwen3 only, not {lm.config.model_type}"
    else:
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_qwen3
            apply_liger_kernel_to_qwen3(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False, model=lm)
            return
        except ImportError:
            why = "liger-kernel is not installed (pip install liger-kernel)"
        except Exception as e:  # an API change between versions must not stop a run
            why = f"applying it failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
    log.warning(f"LIGER=1 ignored: {why}; using PyTorch's kernels")


def wants_compile(cfg: Config, device: torch.device) -> bool:
    """COMPILE=auto: the fused fast path where it pays (CUDA); eager on CPU, where compiling costs more than it wins."""
    return cfg.compile in ("1", "max") or (cfg.compile == "auto" and device.type == "cuda")


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process (each shape and kind of block is one)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


# =============================================================================================
# Training
# =============================================================================================

class FeatureRows:
    """A split's image features, indexed like an (N, *feature_shape) fp32 tensor but gathered only when
    indexed: an int, a slice or a list of rows gives a tensor, `first(n)` a shorter FeatureRows. With the
    patch cache memory-mapped, a split is never copied whole into RAM (Flickr30k train: 1.9 GB of fp16)."""

    def __init__(self, rows: list[torch.Tensor]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, int):
            return self.rows[key].float()
        picked = self.rows[key] if isinstance(key, slice) else [self.rows[i] for i in key]
        return torch.stack(picked).float()

    def first(self, n: int) -> FeatureRows:
        return FeatureRows(self.rows[:n])


@dataclass
class Split:
    """The pairs of one split: image features, their ids and every tokenized caption; and QA_DATASET's
    questions about its images (sorted by image), with their images' features."""
    ids: list[str]
    features: FeatureRows           # (N, *feature_shape)
    references: list[list[str]]     # raw captions per image
    pairs: list[tuple[int, list[int]]]  # (image row, caption token ids)
    questions: list[Question] = field(default_factory=list)
    qa_features: FeatureRows = field(default_factory=lambda: FeatureRows([]))  # a row per question


def make_split(ids, features: dict, records_by_id: dict, model: Captioner) -> Split:
    ids = [i for i in ids if i in features]
    refs = [records_by_id[i].captions for i in ids]
    flat = [c for r in refs for c in r]
    tokens = model.tokenize_captions(flat) if flat else []
    rows = [n for n, r in enumerate(refs) for _ in r]
    return Split(ids, FeatureRows([features[i] for i in ids]), refs, list(zip(rows, tokens)))


def add_questions(splits: dict[str, Split], questions, records_by_id: dict, cfg: Config, encoder) -> None:
    """Give each split its questions and their images' features (cached as the captions' are). An image both
    sources hold (the same file, or the same id) keeps its caption split, so that no val/test image of either
    source reaches training; the QA source's other images are split 80/10/10 by image with SEED."""
    questions, store, skipped = questions
    total, images = len(questions) + len(skipped), {q.image_id: Record(q.image_id, [], q.ref) for q in questions}
    source = dataclasses.replace(cfg, dataset=cfg.qa_dataset, dataset_split=cfg.qa_split, image_column=cfg.qa_image_column)
    features, bad = cached_features(source, encoder, sorted(images.values(), key=lambda r: r.image_id), store)
    skipped.update({f"{q.image_id} ({q.question})": bad[q.image_id] for q in questions if q.image_id in bad})
    check_bad_data(total, skipped, cfg, "question rows")
    known = {file_key(records_by_id[i]): name for name, split in splits.items() for i in split.ids}
    where = {i: known.get(file_key(r)) for i, r in images.items()}
    where |= {i: name for name, ids in split_by_image([i for i, n in where.items() if not n], cfg.seed).items() for i in ids}
    for name, split in splits.items():
        split.questions = [q for q in sorted(questions, key=lambda q: q.image_id)
                           if q.image_id in features and where[q.image_id] == name]
        split.qa_features = FeatureRows([features[q.image_id] for q in split.questions])


def file_key(record: Record) -> str:
    """What tells an image apart across sources: its real path, or its id on the hub."""
    return os.path.realpath(record.ref) if isinstance(record.ref, str) else record.image_id


def batches(split: Split, batch_size: int, order: list[int], prompts: list[list[int]] | None = None):
    """(features, caption ids, prompt ids per pair or None for PROMPT) of each batch of pairs in `order`."""
    for start in range(0, len(order), batch_size):
        chosen = order[start: start + batch_size]
        pairs = [split.pairs[i] for i in chosen]
        yield (split.features[[r for r, _ in pairs]], [c for _, c in pairs],
               [prompts[i] for i in chosen] if prompts else None)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffle of an epoch depends only on SEED and the epoch, so a resumed run sees the same order."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()


def epoch_prompts(model: Captioner, n: int, seed: int, epoch: int) -> list[list[int]] | None:
    """PROMPTS: the prompt of each of the n pairs this epoch (a function of SEED and the epoch); None = PROMPT."""
    if not model.train_prompt_ids:
        return None
    rnd = random.Random(f"prompts-{seed}-{epoch}")
    return [rnd.choice(model.train_prompt_ids) for _ in range(n)]


def make_optimizer(model: Captioner, cfg: Config) -> torch.optim.AdamW:
    groups = [{"params": [p for p in part.parameters() if p.requires_grad], "name": name}
              for name, part in (("adapter", model.adapter), ("lm", model.lm))]
    groups = [g for g in groups if g["params"]]  # FREEZE_ADAPTER=1, or TOP_K=0: a part that trains nothing
    for g in groups:
        g["lr"] = g["base_lr"] = base_lr(cfg, g["name"])
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=model.device.type == "cuda")


def base_lr(cfg: Config, group: str) -> float:
    """The learning rate of a parameter group before the schedule scales it."""
    return cfg.lr_adapter if group == "adapter" else cfg.lr_qwen


def get_lr_scale(step: int, total: int, warmup_ratio: float) -> float:
    """Linear warm-up, then cosine decay to zero over the remaining optimizer steps."""
    warmup = max(1, round(warmup_ratio * total))
    if step < warmup:
        return (step + 1) / warmup
    done = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def steps_per_epoch(num_pairs: int, cfg: Config) -> int:
    return math.ceil(math.ceil(num_pairs / cfg.batch_size) / cfg.grad_accum)


def qa_pairs_per_epoch(split: Split, cfg: Config) -> int:
    """QA_MIX: the question-answer pairs that join an epoch's caption pairs, so that they are that share of it."""
    return round(len(split.pairs) * cfg.qa_mix / (1 - cfg.qa_mix)) if split.questions else 0


def epoch_pairs(model: Captioner, split: Split, cfg: Config, epoch: int) -> tuple[Split, list[list[int]] | None]:
    """The epoch's pairs and the prompt of each (None: as `epoch_prompts`): every (image, caption) pair, then with
    QA_MIX (image, answer) pairs under their question, drawn in a shuffle of SEED and the epoch, all before repeats."""
    n, m = len(split.pairs), qa_pairs_per_epoch(split, cfg)
    prompts = epoch_prompts(model, n, cfg.seed, epoch)
    if not m:
        return split, prompts
    order = random.Random(f"qa-{cfg.seed}-{epoch}").sample(range(len(split.questions)), len(split.questions))
    chosen = [order[j % len(order)] for j in range(m)]
    answers = model.tokenize_captions([split.questions[i].answer for i in chosen], prefix=" ")
    features = FeatureRows(split.features.rows + [split.qa_features.rows[i] for i in chosen])
    pairs = split.pairs + [(len(split.features) + j, a) for j, a in enumerate(answers)]
    prompts = (prompts or [model.prompt_ids] * n) + [model.tokenize_prompt(ask_text(split.questions[i].question))
                                                     for i in chosen]
    return dataclasses.replace(split, features=features, pairs=pairs), prompts


def optimizer_steps(model: Captioner, split: Split, cfg: Config, epoch: int):
    """The epoch's micro-batches grouped by optimizer step: GRAD_ACCUM each, the last group maybe fewer."""
    split, prompts = epoch_pairs(model, split, cfg, epoch)
    group, n = [], len(split.pairs)
    for batch in batches(split, cfg.batch_size, epoch_order(n, cfg.seed, epoch), prompts):
        group.append(batch)
        if len(group) == cfg.grad_accum:
            yield group
            group = []
    if group:
        yield group


def train_step(model: nn.Module, opt, micro_batches: list, grad_clip: float) -> torch.Tensor:
    """One optimizer step over its micro-batches; returns their mean loss as a 0-d tensor left on the
    device (reading it waits for the GPU, so the caller reads it only every LOG_EVERY steps).

    Each micro-batch's loss is divided by the number of micro-batches in *this* step, so the last,
    shorter step of an epoch averages what it holds instead of shrinking its gradient.

    Under torchrun `model` is DDP around the Captioner and the micro-batches are global: each rank runs
    its share, sums its token losses and divides by the micro-batch's global supervised-token count over
    WORLD_SIZE (known from the caption lengths, no exchange needed). DDP's mean over the ranks then is the
    gradient of the global mean loss, as one process computes it. Gradients are exchanged once a step,
    in the last micro-batch's backward; the returned loss is the global one on every rank."""
    total = torch.zeros((), device=unwrapped(model).device)
    for n, (features, caption_ids, prompt_ids) in enumerate(micro_batches):
        tokens = sum(len(c) for c in caption_ids) / DIST.world_size
        mine, weight = DIST.share(len(caption_ids)), 1.0
        if mine.start == mine.stop:  # fewer pairs than ranks: a zero-weight pair keeps this rank in the exchange
            mine, weight = slice(0, 1), 0.0
        last = n == len(micro_batches) - 1
        with model.no_sync() if DIST.launched and not last else contextlib.nullcontext():
            loss = weight * model(features[mine], caption_ids[mine], prompt_ids[mine] if prompt_ids else None, tokens)
            (loss / len(micro_batches)).backward()
        total += loss.detach()
    if grad_clip:  # the gradients are the same on every rank by now, and so is the clipping
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return DIST.sum(total) / (len(micro_batches) * DIST.world_size)


class LossWatch:
    """The running training loss and the first non-finite one, kept on the device; `read` syncs once."""

    def __init__(self, device):
        self.total = torch.zeros((), device=device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_loss = torch.zeros((), device=device)
        self.count = self.read_total = self.read_count = 0

    def add(self, loss: torch.Tensor, step: int) -> None:
        first_bad = ~torch.isfinite(loss) & (self.bad_step < 0)
        self.bad_step = torch.where(first_bad, step, self.bad_step)
        self.bad_loss = torch.where(first_bad, loss, self.bad_loss)
        self.total += loss
        self.count += 1

    def read(self, epoch: int) -> float:
        """Mean loss since the last read; stops the run if any loss since the start was not finite."""
        bad_step, bad_loss, total = self.bad_step.item(), self.bad_loss.item(), self.total.item()
        if bad_step >= 0:
            raise UserError(f"the loss became {bad_loss} at step {bad_step} (epoch {epoch}); training stopped, the "
                            "last good checkpoint is kept: lower LR_ADAPTER/LR_QWEN or check the data")
        mean = (total - self.read_total) / max(1, self.count - self.read_count)
        self.read_total, self.read_count = total, self.count
        return mean

    def epoch_mean(self, epoch: int) -> float:
        self.read(epoch)
        return self.read_total / max(1, self.count)


def train_epoch(model: nn.Module, opt, train: Split, cfg: Config, epoch: int, state: dict, run) -> float:
    """One pass over every (image, caption) pair of the train split, with QA_MIX's question-answer pairs.
    Returns the mean loss. `model`: the Captioner, or DDP around it (see `train_step`)."""
    model.train()
    captioner = unwrapped(model)
    size = len(train.pairs) + qa_pairs_per_epoch(train, cfg)
    total_steps = steps_per_epoch(size, cfg) * cfg.epochs
    watch = LossWatch(captioner.device)
    bar = progress_bar(total=size, desc=f"epoch {epoch}/{cfg.epochs}", unit="pair")
    t0, seen, tokens = time.perf_counter(), 0, 0
    for micro_batches in optimizer_steps(captioner, train, cfg, epoch):
        scale = get_lr_scale(state["step"], total_steps, cfg.warmup_ratio)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * scale
        watch.add(train_step(model, opt, micro_batches, cfg.grad_clip), state["step"])
        state["step"] += 1
        pairs = sum(len(caps) for _, caps, _ in micro_batches)
        seen += pairs
        tokens += sum(len(c) for _, caps, _ in micro_batches for c in caps)
        bar.update(pairs)
        if state["step"] % cfg.log_every == 0:
            loss, elapsed = watch.read(epoch), time.perf_counter() - t0
            bar.set_postfix(loss=f"{loss:.3f}", samples_s=f"{seen / elapsed:.1f}", refresh=False)
            run.log({"train/loss": loss, "train/samples_per_s": seen / elapsed, "train/tokens_per_s": tokens / elapsed,
                     **{f"train/lr_{g['name']}": g["lr"] for g in opt.param_groups}, "epoch": epoch},
                    step=state["step"])
    bar.close()
    mean = watch.epoch_mean(epoch)
    broken = next((n for n, p in captioner.named_parameters() if p.requires_grad and not torch.isfinite(p).all()), None)
    if broken:  # a finite loss with non-finite gradients in the last step: never checkpoint such weights
        raise UserError(f"the weights became non-finite ({broken}) by step {state['step']} (epoch {epoch}); training "
                        "stopped, the last good checkpoint is kept: lower LR_ADAPTER/LR_QWEN or check the data")
    return mean


# =============================================================================================
# Evaluation and metrics
# =============================================================================================

# Every metric --test reports, in the order tables show them, and where else each is shown: "card" in
# an export's model card, "plot" in --compare's bar chart, "epochs" in its per-epoch plots of validation.
# Only the loss is better when lower. With a question source, VQA-acc/{question type} follow VQA-acc.
METRICS = {"loss": "card", "BLEU-1": "card", "BLEU-2": "", "BLEU-3": "", "BLEU-4": "card plot",
           "METEOR": "card plot", "ROUGE-L": "card plot", "CIDEr": "card plot epochs", "Recall@1": "card plot",
           "Recall@5": "card plot", "Precision@1": "card", "Precision@5": "card", "T2I-Recall@1": "", "T2I-Recall@5": "",
           "VQA-acc": "card plot epochs"}
LOWER_IS_BETTER = ("loss",)
SIZE_KEYS = ("retrieval_pool", "num_images", "num_questions")  # how much was scored, reported beside the metrics


@torch.no_grad()
def split_loss(model: Captioner, split: Split, cfg: Config) -> float:
    """Mean token cross-entropy over every (image, caption) pair of a split. Under torchrun each rank
    scores its share of the batches; the batch sums are then added in batch order, as one process does."""
    model.eval()
    bs = cfg.eval_batch_size
    mine = DIST.my_batches(len(split.pairs), bs)
    sums = torch.zeros(math.ceil(len(split.pairs) / bs), device=model.device)
    order = [i for items in mine for i in items]
    for items, (feats, caps, _) in zip(mine, progress_bar(batches(split, bs, order), total=len(mine), desc="loss",
                                                           unit="batch")):
        sums[items.start // bs] = model.token_losses(feats, caps)[0].sum()
    count = sum(len(c) for _, c in split.pairs)
    return DIST.sum(sums).sum().item() / max(count, 1)


@torch.no_grad()
def generate_texts(model: Captioner, n: int, inputs, cfg: Config, decoding: dict, desc: str) -> list[str]:
    """n generated texts, EVAL_BATCH_SIZE at a time; inputs(range of rows) -> `generate`'s features, prompts
    and shots for those rows. Under torchrun each rank generates its share of the batches and every rank
    gets all texts; sampling is seeded per batch, so a text does not depend on which rank made it."""
    model.eval()
    mine = {}
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        for items in progress_bar(DIST.my_batches(n, cfg.eval_batch_size), desc=desc, unit="batch"):
            torch.manual_seed(cfg.seed + items.start)  # sampling is reproducible and leaves the training RNG alone
            features, prompts, shots = inputs(items)
            mine[items.start] = model.generate(features, decoding, prompts, shots)
    every = {start: texts for part in DIST.gather(mine) for start, texts in part.items()}
    return [text for start in sorted(every) for text in every[start]]


def generate_captions(model: Captioner, features: torch.Tensor | FeatureRows, cfg: Config, desc="generating"):
    """A caption of each image (with PROMPT and DECODING)."""
    return generate_texts(model, len(features), lambda rows: (features[rows.start: rows.stop], None, None), cfg,
                          decoding_kwargs(cfg), desc)


def answer_questions(model: Captioner, questions: list[Question], features, cfg: Config, solved: Split | None):
    """Answers to the questions about the images of `features` (a row each); with QA_SHOTS, each after as many
    solved examples of `solved` (the QA train split), drawn for that question with SEED."""
    def inputs(rows: range):
        images, prompts, shots = [], [], []
        for q, feature in zip(questions[rows.start: rows.stop], features[rows.start: rows.stop]):
            draw = random.Random(f"{cfg.seed}-{q.image_id}-{q.question}")
            examples = draw.sample(range(len(solved.questions)), cfg.qa_shots) if cfg.qa_shots else []
            images += [solved.qa_features[i] for i in examples] + [feature]
            prompts.append(model.tokenize_prompt(ask_text(q.question)))
            shots.append([model.tokenize_prompt(ask_text(solved.questions[i].question, solved.questions[i].answer))
                          for i in examples])
        return torch.stack(images), prompts, shots
    if cfg.qa_shots > len(solved.questions if solved else []):
        raise UserError(f"QA_SHOTS={cfg.qa_shots} is more than the QA train split's questions: lower it", exit_code=2)
    # greedy and short, ending at EOS or at a newline (which ends a solved example)
    decoding = dict(max_new_tokens=cfg.qa_max_new_tokens, do_sample=False, num_beams=1, eos_token_id=model.answer_stops)
    return generate_texts(model, len(questions), inputs, cfg, decoding, "answering")


_JAVA_WARNED = False
_PTB_TOKENS: dict[str, str] = {}  # every text Java's PTB tokenizer has seen in this process, and its tokens
_METEOR = None  # this process's METEOR JVM: its paraphrase tables take seconds to load, so one serves every evaluation


def _tokenized(predictions: dict[str, str], references: dict[str, list[str]]) -> tuple[dict, dict]:
    """References and predictions of the predicted images, PTB-tokenized as pycocoevalcap's PTBTokenizer does it
    (its jar, flags and punctuation list), one text a line: a text keeps its tokens for the process and only new
    texts start a JVM (the val references: once), whose "PTBTokenizer tokenized N tokens" line stays off the
    console. Without Java, a Python fallback."""
    global _JAVA_WARNED
    keys = sorted(predictions)
    texts, tokens = {c for k in keys for c in [predictions[k], *references[k]]}, _PTB_TOKENS
    if not shutil.which("java"):
        if not _JAVA_WARNED:
            log.warning("Java not found: captions are tokenized in Python and METEOR is reported as missing "
                        "(install a JRE for the standard numbers)")
            _JAVA_WARNED = True
        tokens = {t: _simple_tokenize(t) for t in texts}
    elif new := sorted(texts - _PTB_TOKENS.keys()):
        from pycocoevalcap.tokenizer import ptbtokenizer as ptb
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "lines").write_bytes("\n".join(" ".join(t.split()) for t in new).encode())  # one line each
            out = subprocess.run(["java", "-cp", str(Path(ptb.__file__).parent / ptb.STANFORD_CORENLP_3_4_1_JAR),
                                  "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", "lines"],
                                 cwd=tmp, capture_output=True, check=True).stdout.decode().split("\n")
        _PTB_TOKENS.update((t, " ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS))
                           for t, line in zip(new, out))
    return {k: [tokens[c] for c in references[k]] for k in keys}, {k: [tokens[predictions[k]]] for k in keys}


def _simple_tokenize(caption: str) -> str:
    """What the PTB tokenizer (minus punctuation) gives for ordinary captions, so numbers stay close
    without Java: lower case, clitics split off ("dog's" -> "dog 's", "don't" -> "do n't"), hyphenated
    words ("t-shirt") and decimals kept whole. Rare symbols (&, brackets, "u.s.") still differ."""
    text = re.sub(r"(\w)n't\b", r"\1 n't", caption.lower())
    return " ".join(re.findall(r"n't|'(?:s|re|ve|ll|d|m)\b|[^\W_]+(?:[-.][^\W_]+)*", text))


def caption_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float | None]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr (CIDEr-D) with pycocoevalcap, one prediction per image."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    if not predictions:
        return {}
    gts, res = _tokenized(predictions, references)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["METEOR"] = _meteor(gts, res) if shutil.which("java") else None  # missing, never a fake 0
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out


def image_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Each image's own CIDEr (with the IDF of all the images, as in their corpus CIDEr, which is the mean) and
    BLEU-4 (its sentence BLEU), by pycocoevalcap."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    if not predictions:
        return {}
    gts, res = _tokenized(predictions, references)
    cider, bleu = Cider().compute_score(gts, res)[1], Bleu(4).compute_score(gts, res, verbose=0)[1][3]
    return {k: {"CIDEr": float(c), "BLEU-4": float(b)} for k, c, b in zip(gts, cider, bleu)}


def _meteor(gts: dict, res: dict) -> float | None:
    """METEOR 1.5 through pycocoevalcap's Java wrapper, in this process's one JVM; None if the JVM dies (e.g. no
    room for its 2 GB heap), so the other metrics of a long run survive."""
    global _METEOR
    from pycocoevalcap.meteor.meteor import Meteor
    if _METEOR is None:
        _METEOR = Meteor()
        atexit.register(_stop_meteor, _METEOR)
    try:
        return float(_METEOR.compute_score(gts, res)[0])
    except (OSError, ValueError) as e:  # a broken pipe or an empty answer: the JVM is gone
        log.warning(f"METEOR failed, its Java process stopped ({type(e).__name__}: {e}); reported as missing")
        _stop_meteor(_METEOR)
        _METEOR = None
        return None


def _stop_meteor(meteor) -> None:
    """Version 1.2 has no close(): the JVM lives until __del__, which takes a lock that a failed or interrupted
    compute_score never releases (a hang at exit). So the JVM is stopped here, after a failure and at exit."""
    import threading
    meteor.meteor_p.kill()
    meteor.meteor_p.wait()
    meteor.lock = threading.Lock()  # __del__ acquires it; this one cannot be left held


def _ranked_hits(scores: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Rank each row's candidates by score; ties are broken against the model (wrong ones first)."""
    by_own = torch.sort(own.int(), dim=1, stable=True).indices
    by_score = torch.sort(-scores.gather(1, by_own), dim=1, stable=True).indices
    return own.gather(1, by_own.gather(1, by_score))


def retrieval_metrics(scores: torch.Tensor, owner: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """scores: (N images, M captions); owner[m] = the image caption m describes.

    Image->text: Recall@K = share of images with an own caption in the top K; Precision@K =
    mean share of the top K that are own captions (divided by K). Text->image: T2I-Recall@K =
    share of captions whose image ranks in the top K of the N images. Ties are broken against
    the model: among equal scores the wrong candidates rank first (a constant scorer gets Recall@1 = 0)."""
    n = scores.shape[0]
    own = owner[None, :] == torch.arange(n)[:, None]            # (N, M)
    i2t, t2i = _ranked_hits(scores, own), _ranked_hits(scores.T, own.T)
    out = {}
    for k in ks:
        out[f"Recall@{k}"] = i2t[:, :k].any(1).float().mean().item()
        out[f"Precision@{k}"] = i2t[:, :k].float().sum(1).div(k).mean().item()
    for k in ks:
        out[f"T2I-Recall@{k}"] = t2i[:, :k].any(1).float().mean().item()
    return out


@torch.no_grad()
def retrieval_scores(model: Captioner, split: Split, pool: int, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-token log-likelihood of every caption of the pool under every image of the pool."""
    model.eval()
    n = min(pool, len(split.ids))
    caps = [(r, c) for r, c in split.pairs if r < n]
    owner = torch.tensor([r for r, _ in caps])
    scores = torch.zeros(n, len(caps))  # under torchrun each rank fills its rows, and the sum over ranks has them all
    bs = cfg.eval_batch_size
    for i in progress_bar(range(DIST.rank, n, DIST.world_size), desc=f"retrieval ({n} images x {len(caps)} captions)",
                          unit="img"):
        for start in range(0, len(caps), bs):
            chunk = [c for _, c in caps[start: start + bs]]
            feature = split.features[i]
            feats = feature.expand(len(chunk), *feature.shape)
            scores[i, start: start + len(chunk)] = model.caption_log_likelihood(feats, chunk).float().cpu()
    return DIST.sum(scores), owner


# VQAv2's answer normalisation, as its official evaluation script (vqaEval.py) does it.
VQA_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
VQA_NUMBERS = dict(zip("none zero one two three four five six seven eight nine ten".split(), "0 0 1 2 3 4 5 6 7 8 9 10".split()))
# Its contractions, written out: each form missing any one apostrophe ("dont", "couldnt've") maps to the form.
VQA_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've "
    "he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've needn't "
    "not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll "
    "somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd "
    "there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll "
    "what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's "
    "won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've").split()
VQA_CONTRACTIONS = {c[:i] + c[i + 1:]: c for c in VQA_CONTRACTED for i, ch in enumerate(c) if ch == "'"}


def normalize_answer(text: str) -> str:
    """An answer as VQAv2 compares it: punctuation dropped where it touches a space or in a number with a comma
    ("yes!" -> "yes", "1,000" -> "1000"), else a space ("black/white" -> "black white"); periods dropped but in
    numbers; lower case; number words as digits; no articles; contractions restored ("dont" -> "don't")."""
    text = " ".join(text.split())
    out, glued = text, re.search(r"\d,\d", text) is not None
    for p in VQA_PUNCTUATION:
        out = out.replace(p, "" if glued or p + " " in text or " " + p in text else " ")
    words = [VQA_NUMBERS.get(w, w) for w in re.sub(r"\.(?!\d)", "", out).lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in ("a", "an", "the"))


def vqa_accuracy(generated: str, answers: list[str]) -> float:
    """VQAv2's accuracy of one answer, both sides normalised: with 10 reference answers, min(#matching / 3, 1)
    averaged over the 10 leave-one-out subsets of 9; with any other number, 1 if it matches one, else 0."""
    said, refs = normalize_answer(generated), [normalize_answer(a) for a in answers]
    if len(refs) != 10:
        return float(said in refs)
    return sum(min(1.0, (refs.count(said) - (r == said)) / 3) for r in refs) / 10


def vqa_metrics(questions: list[Question], generated: list[str]) -> tuple[dict[str, float], list[dict]]:
    """VQA-acc (the mean accuracy) and VQA-acc/{type} per question type, and a record of each answer."""
    answered = [{"image_id": q.image_id, "question": q.question, "generated": g, "answers": q.answers,
                 "accuracy": vqa_accuracy(g, q.answers), "type": q.type} for q, g in zip(questions, generated)]
    metrics = {"VQA-acc": sum(a["accuracy"] for a in answered) / max(len(answered), 1)}
    for kind in sorted({q.type for q in questions if q.type}):
        scores = [a["accuracy"] for a in answered if a["type"] == kind]
        metrics[f"VQA-acc/{kind}"] = sum(scores) / len(scores)
    return metrics, answered


def evaluate(model: Captioner, split: Split, cfg: Config, caption_images: int, pool: int, solved: Split | None = None):
    """Loss over the whole split, caption metrics on the first `caption_images` images (0 = all),
    retrieval over a pool of `pool` images, and VQA accuracy on the questions of the first `caption_images`
    images of the question source (solved examples from `solved`). Returns (metrics, generated captions,
    a record of each answer); under torchrun the same on every rank."""
    metrics = {"loss": split_loss(model, split, cfg)}
    n = len(split.ids) if caption_images == 0 else min(caption_images, len(split.ids))
    generated = generate_captions(model, split.features.first(n), cfg)
    preds = dict(zip(split.ids[:n], generated))
    metrics.update(DIST.from_main(caption_metrics, preds, dict(zip(split.ids[:n], split.references[:n]))))
    metrics["num_images"] = n
    if pool:
        scores, owner = retrieval_scores(model, split, pool, cfg)
        metrics.update(retrieval_metrics(scores, owner))
        metrics["retrieval_pool"] = scores.shape[0]
    first = set(sorted({q.image_id for q in split.questions})[:caption_images or None])
    asked = [q for q in split.questions if q.image_id in first]  # a prefix: the questions are sorted by image
    if not asked:
        return metrics, preds, []
    vqa, answered = vqa_metrics(asked, answer_questions(model, asked, split.qa_features, cfg, solved))
    return {**metrics, **vqa, "num_questions": len(asked)}, preds, answered


def format_table(metrics: dict) -> str:
    width = max(len(k) for k in metrics)
    lines = []
    for k, v in metrics.items():
        shown = "missing" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
        lines.append(f"  {k:<{width}}  {shown:>10}")
    return "\n".join(lines)


def epoch_table(history: list[dict]) -> str:
    """A run's history as the aligned table that training ends with, one row per epoch."""
    lines = ["".join(f"{h:>12}" for h in ("epoch", "train loss", "val loss", "val BLEU-4", "val CIDEr", "train s"))]
    for h in history:
        scores = h.get("val_metrics", {})  # a line of an older version may lack some values
        values = (h["epoch"], h.get("train_loss"), h.get("val_loss"), scores.get("BLEU-4"), scores.get("CIDEr"),
                  h.get("train_seconds"))
        lines.append("".join(f"{'missing':>12}" if v is None else f"{v:>12{f}}"
                             for v, f in zip(values, ("d", ".4f", ".4f", ".4f", ".4f", ".1f"))))
    return "\n".join(lines)


RESULT_COLUMNS = ("checkpoint", *MODEL_KEYS, "decoding", "qa_mix", "qa_shots", "epochs", "untrained", "test_dataset",
                  *METRICS, *SIZE_KEYS)


def append_results_row(cfg: Config, path: Path, ckpt: dict, metrics: dict, untrained: bool = False) -> None:
    """One row per --test run in results.csv, so ablations line up side by side. A file written
    with other columns (an older version) is rewritten with the union, so no row is lost.
    The zero-shot baseline's row says untrained=yes (and epochs=0; its checkpoint is untrained_{run})."""
    results = output_path(cfg.output_dir_models, "results", "results")
    row = {"checkpoint": path.name, **{k: getattr(cfg, k) for k in MODEL_KEYS}, "decoding": cfg.decoding,
           "qa_mix": ckpt.get("config", {}).get("qa_mix", 0.0), "qa_shots": cfg.qa_shots, "epochs": ckpt["epoch"],
           "untrained": "yes" if untrained else "no", "test_dataset": cfg.test_dataset,
           **{k: ("" if v is None else v) for k, v in metrics.items() if k in RESULT_COLUMNS or k.startswith("VQA-acc/")}}
    rows, columns = [], list(RESULT_COLUMNS)
    if results.is_file():
        with open(results, newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns += [c for c in reader.fieldnames or [] if c not in columns]
    columns += [c for c in row if c not in columns]

    def write(fh):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows([*rows, row])
        fh.write(text.getvalue().encode())
    atomic_write(results, write)


# =============================================================================================
# Checkpoints
# =============================================================================================
# A checkpoint holds the trainable weights only, the public config to rebuild the model and the
# metrics; the newest one of a run also holds what resuming needs (optimizer, RNG), which older
# epochs drop (it is twice the size of the weights). Plain tensors and Python containers only, so
# `torch.load(..., weights_only=True)` reads it.

CHECKPOINT_NAME = re.compile(r"(\d+)_(clip|vit)(_qformer)?_(?:top(\d+)|lora(\d+))\.pt")


# Every file a run writes into OUTPUT_DIR_MODELS: a stem, then the kind's suffix. A checkpoint's stem is
# {epoch}_{run_name}, and the results of testing it share that stem; a run's history is {run_name}.history.jsonl.
OUTPUT_SUFFIXES = {"checkpoint": ".pt", "history": ".history.jsonl", "results": ".csv", "test": ".test.json",
                   "captions": ".test_captions.jsonl", "answers": ".test_answers.jsonl", "gallery": ".test_gallery.html",
                   "explain": ".explain", "lock": ".lock"}


def output_path(folder: Path | str, stem: str, kind: str) -> Path:
    return Path(folder) / f"{stem}{OUTPUT_SUFFIXES[kind]}"


def checkpoint_path(cfg: Config, epoch: int) -> Path:
    return output_path(cfg.output_dir_models, f"{epoch}_{cfg.run_name}", "checkpoint")


def result_path(checkpoint: Path, kind: str, test_dataset: str = "") -> Path:
    """A result of testing `checkpoint` (a .pt file, an export folder, or untrained_{run_name}), beside it; on a
    TEST_DATASET under a stem of its own, so that the results on DATASET's test split stay."""
    on = f".on-{Path(test_dataset).stem}" if test_dataset else ""
    return output_path(checkpoint.parent, checkpoint.name.removesuffix(OUTPUT_SUFFIXES["checkpoint"]) + on, kind)


def run_lock(cfg: Config):
    """One --train of a run at a time, from its first write on (checkpoints, history): two would interleave them."""
    folder = Path(cfg.output_dir_models)
    checkpoints = output_path(folder, r"\d+_" + re.escape(cfg.run_name), "checkpoint").name  # a pattern of the names
    owns = re.compile(f"{checkpoints}|{re.escape(history_path(folder, cfg.run_name).name)}")
    return holding_lock(output_path(folder, f".{cfg.run_name}", "lock"), owns, busy=(
        f"is training {cfg.run_name} into OUTPUT_DIR_MODELS={folder}: wait for it to end, or set another folder"))


def settings_in_name(name: str) -> dict[str, str] | None:
    """What a checkpoint's file name says of its variant: {"VISION_ENCODER": "clip", "TOP_K": "3", ...}."""
    m = CHECKPOINT_NAME.fullmatch(name)
    if not m:
        return None
    tuning = {"TUNING": "lora", "LORA_RANK": m[5]} if m[5] else {"TUNING": "topk", "TOP_K": m[4]}
    return {"VISION_ENCODER": m[2], "ADAPTER": "qformer" if m[3] else "mlp", **tuning}


def find_last_checkpoint(cfg: Config) -> Path:
    """The highest epoch of this configuration's variant (encoder, adapter, tuning) in OUTPUT_DIR_MODELS."""
    folder = Path(cfg.output_dir_models)
    pattern = re.compile(rf"(\d+)_{re.escape(cfg.run_name)}\.pt")
    found = [(int(m.group(1)), p) for p in folder.glob("*.pt") if (m := pattern.fullmatch(p.name))]
    if found:
        return max(found)[1]
    others = []
    for p in sorted(folder.glob("*.pt")):
        settings = settings_in_name(p.name) or {}
        differ = [f"{k}={v}" for k, v in settings.items() if str(getattr(cfg, k.lower())) != v]
        others.append(f"{p.name} ({', '.join(differ)})" if differ else p.name)
    raise UserError(f"no checkpoint {{epoch}}_{cfg.run_name}.pt in {folder} for the current settings "
                    f"(found: {'; '.join(others) or 'none'}); train first, set the variables to match, "
                    "or pass --checkpoint PATH")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(model: Captioner, opt, cfg: Config, epoch: int, step: int, metrics: dict, run_id) -> Path:
    trainable = set(model.trainable_names())
    path = checkpoint_path(cfg, epoch)
    atomic_save({
        "format": 1,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items() if k in trainable},
        "config": cfg.public(),
        "epoch": epoch, "step": step, "metrics": metrics,
        "optimizer": opt.state_dict(), "rng": rng_state(), "wandb_run_id": run_id,
    }, path)
    previous = checkpoint_path(cfg, epoch - 1)
    if previous.is_file():
        drop_resume_state(previous)
    return path


def drop_resume_state(path: Path) -> None:
    """Rewrite an older epoch's checkpoint without optimizer and RNG state: its weights still serve --test."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if "optimizer" in ckpt:
        atomic_save({k: v for k, v in ckpt.items() if k not in ("optimizer", "rng")}, path)


def read_checkpoint(path: Path) -> dict:
    """A .pt checkpoint, or an export folder (`--export`) as the same dict."""
    if path.is_dir():
        return read_export(path)
    if not path.is_file():
        raise UserError(f"--checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = (str(e).strip().splitlines() or [""])[0][:200]  # one line: torch's messages run to paragraphs
        if why.startswith("Weights only load failed"):
            why = "it holds more than tensors and plain containers, which torch.load(weights_only=True) refuses"
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {why}); it may be truncated or "
                        "not written by this script: pass another --checkpoint or train again") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != 1:
        raise UserError(f"{path} is not a checkpoint written by this script")
    return ckpt


EXPORT_FORMAT = "multimodal_transfer_learning export"


def read_export_info(folder: Path) -> dict | None:
    """An export's config.json, or None if the folder is not an export."""
    with contextlib.suppress(OSError, ValueError):
        info = json.loads((folder / "config.json").read_text())
        if isinstance(info, dict) and info.get("format") == EXPORT_FORMAT:
            return info
    return None


def read_export(folder: Path) -> dict:
    """An export folder as the dict a .pt checkpoint gives (model, config, epoch, step, metrics)."""
    from safetensors.torch import load_file
    info = read_export_info(folder)
    if info is None:
        raise UserError(f"--checkpoint {folder}: a folder must be an export written by --export "
                        "(config.json + model.safetensors); pass a .pt file or such a folder")
    try:
        weights = load_file(folder / "model.safetensors")
    except Exception as e:
        raise UserError(f"{folder / 'model.safetensors'} is not readable ({type(e).__name__}: {e}); export again") from None
    return {"format": 1, "model": weights, "config": info["config"], "epoch": info["epoch"], "step": info["step"],
            "metrics": info["val_metrics"], "images": info["images"], "test": info["test"]}


def config_differences(cfg: Config, stored: dict, keys) -> list[str]:
    """'VAR=current (checkpoint: stored)' for each of `keys` whose stored value differs."""
    return [f"{k.upper()}={getattr(cfg, k)!r} (checkpoint: {stored[k]!r})" for k in keys
            if k in stored and stored[k] != getattr(cfg, k)]


def config_from_checkpoint(ckpt: dict, cfg: Config) -> Config:
    """The current config with the model- and data-defining values taken from the checkpoint."""
    stored = {k: ckpt["config"][k] for k in MODEL_KEYS + DATA_KEYS if k in ckpt["config"]}
    changed = config_differences(cfg, stored, stored)
    if changed:
        log.info("using the checkpoint's values for: " + "; ".join(changed))
    return dataclasses.replace(cfg, **stored)


def load_weights(model: Captioner, ckpt: dict) -> None:
    """The checkpoint's weights into the model, or one line naming the first weight that does not fit
    (load_state_dict would skip unknown names silently and fail on shapes with a paragraph)."""
    own, saved = model.state_dict(), ckpt["model"]
    missing = sorted(set(model.trainable_names()) - set(saved))
    unknown = sorted(set(saved) - set(own))
    reshaped = [k for k in saved if k in own and saved[k].shape != own[k].shape]
    if missing or unknown or reshaped:
        why = (f"it lacks {len(missing)} trainable weights (e.g. {missing[0]})" if missing else
               f"it holds {len(unknown)} weights the model has not (e.g. {unknown[0]})" if unknown else
               f"{reshaped[0]} is {tuple(saved[reshaped[0]].shape)} in it, {tuple(own[reshaped[0]].shape)} in the model")
        raise UserError(f"the checkpoint does not fit the model built from its settings: {why}; was it written by "
                        "another version, or were the models at VISION_MODEL/LM_MODEL replaced since?")
    model.load_state_dict(saved, strict=False)


def start_from(model: Captioner, cfg: Config) -> None:
    """INIT_FROM: the source's adapter, and the LM weights it trained that this run trains too (the others could not
    be in this run's checkpoints), replace their fresh values. Another encoder or adapter shape is refused."""
    if not Path(cfg.init_from).exists():
        sweep = " (@stem is for the variant files of a --sweep)" if cfg.init_from.startswith("@") else ""
        raise UserError(f"INIT_FROM={cfg.init_from}: no such checkpoint or export folder{sweep}", exit_code=2)
    ckpt = read_checkpoint(Path(cfg.init_from))
    shape = ("vision_encoder", "vision_model", "lm_model", "adapter", "num_visual_tokens", "adapter_hidden", "qformer_layers")
    differing = config_differences(cfg, ckpt["config"], [k for k in shape if k not in cfg.unused_keys])
    if differing:
        raise UserError(f"INIT_FROM={cfg.init_from} has another encoder or adapter: {'; '.join(differing)}", 2)
    kept = set(model.trainable_names())
    carried = {k: v for k, v in ckpt["model"].items() if k in kept}
    model.load_state_dict(carried, strict=False)
    lm, dropped = sum(k.startswith("lm.") for k in carried), len(ckpt["model"]) - len(carried)
    log.info(f"INIT_FROM={cfg.init_from}: loaded {len(carried)} tensors (adapter {len(carried) - lm}, LM {lm}); fresh: "
             f"{len(kept) - len(carried)} LM tensors, the optimizer and the schedule"
             + (f"; left out {dropped} tensors that this run does not train" if dropped else ""))


def chosen_checkpoint(cfg: Config, checkpoint: str | None) -> Path:
    """--checkpoint PATH if given, else the last checkpoint of this configuration's variant."""
    return Path(checkpoint) if checkpoint else find_last_checkpoint(cfg)


def checkpoint_to_resume(cfg: Config, checkpoint: str | None) -> tuple[Path, dict]:
    """The checkpoint --resume continues (`checkpoint` or the last one), checked against the config."""
    path = chosen_checkpoint(cfg, checkpoint)
    ckpt = read_checkpoint(path)
    differing = config_differences(cfg, ckpt["config"], [k for k in MODEL_KEYS + DATA_KEYS if k not in cfg.unused_keys])
    if differing:
        raise UserError(f"{path} was trained with other values: {'; '.join(differing)}; "
                        "restore them to resume, or train without --resume", exit_code=2)
    if "optimizer" not in ckpt:
        raise UserError(f"{path} keeps only weights (the optimizer state lives in the newest checkpoint of its run): "
                        "resume from that one", exit_code=2)
    changed = config_differences(cfg, ckpt["config"], TRAINING_KEYS)
    if changed:
        log.warning("resuming with changed training values (the result will differ from an uninterrupted "
                    "run): " + "; ".join(changed))
    return path, ckpt


def restore_run(model: Captioner, opt, ckpt: dict, cfg: Config) -> dict:
    """Put weights, optimizer, RNG and step back as the checkpoint left them; returns the run state."""
    load_weights(model, ckpt)
    opt.load_state_dict(ckpt["optimizer"])
    for g in opt.param_groups:  # load_state_dict restores the old hyperparameters; the current config wins
        g["base_lr"] = base_lr(cfg, g["name"])
        g["weight_decay"] = cfg.weight_decay
    set_rng_state(ckpt["rng"])
    return {"step": ckpt["step"]}


def history_path(folder: Path | str, run_name: str) -> Path:
    """Beside the run's checkpoints ({epoch}_{run_name}.pt): {run_name}.history.jsonl."""
    return output_path(folder, run_name, "history")


def read_history(path: Path) -> list[dict]:
    """The epochs a run's history records, one dict per line; [] if there is none yet."""
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            rows.append({**row, "epoch": int(row["epoch"])})
        except (ValueError, TypeError, KeyError) as e:
            raise UserError(f"{path}:{n} is not a history line ({type(e).__name__}: {e}); fix or delete the line") from None
    return rows


def record_epoch(cfg: Config, epoch: int, step: int, metrics: dict, images: dict[str, int]) -> None:
    """Write the epoch's line of the run's history, keeping the earlier epochs (a resumed run's too).
    A line for this epoch or a later one is from a run that went further before being restarted or
    resumed from an earlier checkpoint: it is replaced."""
    path = history_path(cfg.output_dir_models, cfg.run_name)
    kept = [row for row in read_history(path) if row["epoch"] < epoch]
    line = {"epoch": epoch, "step": step, "train_loss": metrics["train_loss"], "train_seconds": metrics["train_seconds"],
            "val_loss": metrics["loss"], "images": images,
            "val_metrics": {k: v for k, v in metrics.items() if k not in ("loss", "train_loss", "train_seconds")}}
    text = "".join(json.dumps(row) + "\n" for row in [*kept, line])
    atomic_write(path, lambda fh: fh.write(text.encode()))


# =============================================================================================
# Weights & Biases
# =============================================================================================

class NoRun:
    """The run W&B calls reach when WANDB_MODE=disabled, and on every rank but 0 under torchrun: nothing is
    logged, and wandb is not even imported."""
    disabled, id = True, None

    def __init__(self):
        self.summary = {}

    def log(self, *args, **kwargs) -> None:
        pass

    def finish(self, *args, **kwargs) -> None:
        pass


def init_wandb(cfg: Config, job: str, run_id: str | None = None, wandb_dir: str | None = None):
    """Start a W&B run; without a login (and no WANDB_MODE), go offline instead of prompting."""
    if cfg.wandb_mode == "disabled" or not DIST.is_main:
        return NoRun()
    import wandb
    if cfg.wandb_api_key:
        os.environ["WANDB_API_KEY"] = cfg.wandb_api_key  # from .env: wandb reads it from the environment
    mode = cfg.wandb_mode
    if not mode:
        logged_in = False
        with contextlib.suppress(Exception):
            logged_in = wandb.login(prompt=False, verify=False)
        mode = "online" if logged_in else "offline"
        if not logged_in:
            log.info("W&B: not logged in, logging offline; upload later with `wandb sync --sync-all` "
                     "(or run `wandb login` / set WANDB_MODE)")
    settings = wandb.Settings(silent=True, console="off")
    try:
        return wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity or None, config=cfg.public(),
                          job_type=job, mode=mode, id=run_id, resume="allow" if run_id else None,
                          dir=wandb_dir, settings=settings, reinit="finish_previous")
    except Exception as e:
        log.debug("wandb.init failed", exc_info=True)
        raise UserError(f"W&B could not start ({type(e).__name__}: {e}); set WANDB_MODE=offline or disabled") from None


@contextlib.contextmanager
def wandb_run(cfg: Config, job: str, run_id: str | None = None, demo: bool = False):
    """A W&B run for the duration of a command, finished with the command's exit code."""
    run = init_wandb(cfg, job, run_id, wandb_dir=str(Path(cfg.cache_dir).parent) if demo else None)
    try:
        yield run
    except BaseException as e:
        run.finish(exit_code=exit_code_of(e))
        raise
    run.finish()


def exit_code_of(e: BaseException) -> int:
    if isinstance(e, KeyboardInterrupt):
        return 130
    if isinstance(e, Stopped):
        return 143
    return getattr(e, "exit_code", 1)


def sample_table(run, records_by_id, store, ids, preds) -> dict:
    """{"samples": a W&B table of images with generated and reference captions}, or {} when W&B is off."""
    if getattr(run, "disabled", False):
        return {}
    import wandb
    table = wandb.Table(columns=["image_id", "image", "generated", "references"])
    for i in ids:
        image = None
        with contextlib.suppress(Exception):
            image = wandb.Image(store.open(records_by_id[i].ref))
        table.add_data(i, image, preds.get(i, ""), " | ".join(records_by_id[i].captions))
    return {"samples": table}


def wandb_footer(run) -> str:
    if run is None or getattr(run, "disabled", False) or run.settings.mode == "disabled":
        return "W&B: disabled"
    if run.settings.mode == "offline":
        return f"W&B: offline run in {Path(run.dir).parent}; upload with `wandb sync {Path(run.dir).parent}`"
    return f"W&B: {run.url}"


# =============================================================================================
# Support: files written whole, the hub, signals
# =============================================================================================

def atomic_write(path: Path, write) -> None:
    """Call write(binary file) on a temp file in the same folder, fsync, then rename over `path`:
    a crash or Ctrl-C mid-write never leaves a truncated file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's file is private; ours are ordinary files
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = _os_error_in(e)
        if cause:
            raise UserError(f"could not write {path} ({cause}); free disk space or check the folder's "
                            "permissions — earlier files are intact") from e
        raise


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def fsync_folder(folder: Path) -> None:
    """Make a rename into `folder` survive a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error_in(e: BaseException) -> OSError | None:
    """The OSError behind an exception, if any: torch.save re-raises ENOSPC as a RuntimeError."""
    while e is not None:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


def atomic_save(obj, path: Path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh))


@contextlib.contextmanager
def atomic_folder(path: Path):
    """A temp folder beside `path` to fill in the with-block; once the block ends without error it takes
    `path`'s place (an older `path` is replaced). On any error it is removed and `path` stays as it was:
    a crash never leaves a half-written folder under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = path.with_name(f".{path.name}.old{os.getpid()}.tmp")
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's folder is private; ours are ordinary folders
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


ATOMIC_TEMP = re.compile(r"\.(.+)\.(?:[a-z0-9_]{8}|old\d+)\.tmp")  # how atomic_write and atomic_folder name temps


def take_lock(path: Path, wait: bool) -> int | str:
    """An OS lock on the file `path` (flock: the kernel drops it when its holder dies, so none is ever stale), the
    file naming its holder: the file descriptor, or, if another process holds it and not `wait`, who that is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 1000, 0).decode(errors="replace") or "another process"
            if not wait:
                os.close(fd)
                return holder
            log.info(f"waiting for {holder}, which holds {path}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink:  # else its last holder removed the file meanwhile: take the new one
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} on {os.uname().nodename} ({' '.join(sys.argv)})".encode(), 0)
            return fd
        os.close(fd)


@contextlib.contextmanager
def holding_lock(lock: Path, owns: re.Pattern, busy: str | None = None):
    """The with-block, run while this process (rank 0 under torchrun) holds `lock` (another holder stops the run:
    exit 2, `busy` saying why; or is waited for), first removing what killed writes of files named `owns` left."""
    taken = DIST.from_main(take_lock, lock, wait=busy is None)
    if isinstance(taken, str):
        raise UserError(f"{taken} {busy}", exit_code=2)
    stale = [p for p in lock.parent.glob(".*.tmp") if (m := ATOMIC_TEMP.fullmatch(p.name)) and owns.fullmatch(m[1])]
    if stale and DIST.is_main:
        freed = sum(f.stat().st_size for p in stale for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file())
        for p in stale:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        log.info(f"removed {len(stale)} temp file(s) of killed writes in {lock.parent}: {readable_size(freed)} freed")
    try:
        yield
    finally:
        if DIST.is_main:
            lock.unlink(missing_ok=True)
            os.close(taken)


@contextlib.contextmanager
def out_of_memory_advice(cfg: Config, device: torch.device, training: bool):
    """Out of memory in a training step (or evaluation): one line with the batch size, memory and what to set."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError (CUDA) too; on the host, the allocator's
        if not isinstance(e, (torch.OutOfMemoryError, MemoryError)) and "can't allocate memory" not in str(e):
            raise
        name, size = ("BATCH_SIZE", cfg.batch_size) if training else ("EVAL_BATCH_SIZE", cfg.eval_batch_size)
        half = size // (2 * DIST.world_size) * DIST.world_size if training else size // 2  # BATCH_SIZE: over the ranks
        step = f"{2 * half * cfg.grad_accum} pairs per optimizer step, " + ("as now" if 2 * half == size else "fewer")
        fix = (f"set {name}={half}" + (f" GRAD_ACCUM={2 * cfg.grad_accum} ({step})" if training else "")) if half else \
            "lower MAX_CAPTION_TOKENS or TOP_K"
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            peak, there = torch.cuda.max_memory_reserved(device), f"{readable_size(free)} of {readable_size(total)} free"
        else:
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
            ram, limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), resource.getrlimit(resource.RLIMIT_AS)[0]
            there = f"{readable_size(limit)} allowed (ulimit -v)" if 0 < limit < ram else f"{readable_size(ram)} of RAM"
        raise UserError(f"out of memory while {'training' if training else 'evaluating'} at {name}={size} ({readable_size(peak)}"
                        f" in use at the peak, {there} on {device}): {fix}; the last good checkpoint is kept") from None


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Stop before writing `needed` bytes under `folder` if the disk cannot hold them."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UserError(f"{what} needs {readable_size(needed)} in {folder}, but only {readable_size(free)} is free: "
                        "free some space or point CACHE_DIR at a larger disk")


def readable_size(num_bytes: int) -> str:
    size = float(num_bytes)
    for unit in ("bytes", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000


def reserve_disk_space(path: Path) -> None:
    """Allocate a sparse file's blocks now: a memory-mapped write into a full disk kills the process with
    SIGBUS instead of raising, so a disk filled by others meanwhile must fail here, as an OSError."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate: go on
            raise
    finally:
        os.close(fd)


def go_offline_if_hub_unreachable(cfg: Config, timeout: float = 5.0) -> None:
    """Unless HF_HUB_OFFLINE is set and something is to come from the hub: if the hub does not answer
    within `timeout`, work offline for this run (cached copies still load) instead of letting the hub
    client retry every file with back-off for ~25 s before failing."""
    from huggingface_hub import constants
    hub_names = [n for n in (cfg.lm_model, cfg.vision_model_id, cfg.dataset, cfg.test_dataset) if is_hub_id(n)]
    if constants.HF_HUB_OFFLINE or not hub_names:
        return
    import httpx
    try:
        httpx.head(constants.ENDPOINT, timeout=timeout, trust_env=True)  # any HTTP answer means reachable
        return
    except httpx.HTTPError as e:
        reason = f"{type(e).__name__}: {e}"
    log.warning(f"the Hugging Face Hub ({constants.ENDPOINT}) is unreachable ({reason}); "
                "working offline from cached copies (set HF_HUB_OFFLINE=1 to skip this check)")
    os.environ["HF_HUB_OFFLINE"] = "1"  # for worker processes
    constants.HF_HUB_OFFLINE = True
    import datasets.config
    datasets.config.HF_HUB_OFFLINE = True


def call_hub(var: str, name: str, fn, *args, **kwargs):
    """Run a hub loader; turn the usual failures into one line that names the fix."""
    from huggingface_hub import errors as hub_errors
    try:
        return fn(*args, **kwargs)
    except UserError:
        raise
    except Exception as e:
        text = f"{type(e).__name__}: {e}"
        log.debug("hub failure", exc_info=True)
        local_hint = f"or point {var} at a local copy"
        kind = " --repo-type dataset" if var == "DATASET" else ""
        if looks_local(name) and not Path(name).expanduser().exists():
            msg = f"{var}={name}: no such local directory (check the path, or give a hub id like owner/name)"
        elif isinstance(e, hub_errors.GatedRepoError) or "gated" in text.lower():
            msg = f"{var}={name} is gated: accept its terms on huggingface.co and set HF_TOKEN"
        elif "401" in text or "Invalid credentials" in text or "Invalid user token" in text:
            msg = f"{var}={name}: the hub rejected HF_TOKEN (check or renew the token)"
        elif isinstance(e, (hub_errors.RepositoryNotFoundError,)) or "not a valid model identifier" in text \
                or "doesn't exist on the Hub" in text or "DatasetNotFoundError" in text:
            msg = f"{var}={name} was not found on the hub: check the spelling, {local_hint}"
        elif isinstance(e, (OSError, ConnectionError, hub_errors.OfflineModeIsEnabled, hub_errors.HfHubHTTPError)) \
                or "offline" in text.lower() or "connect" in text.lower():
            msg = (f"{var}={name} could not be fetched (no network, or HF_HUB_OFFLINE=1 and it is not cached; "
                   "offline a misspelled name looks the same, so check it too): "
                   f"download it where there is network (`hf download {name}{kind} --local-dir DIR`) "
                   f"and set {var}=DIR")
        else:
            raise
        raise UserError(msg) from e


def require_package(name: str, needed_by: str, exit_code: int = 2) -> None:
    import importlib
    try:
        importlib.import_module(name)
    except ImportError as e:
        raise UserError(f"{needed_by} needs the optional package {name} ({e}): pip install {name}", exit_code) from None


def _on_sigterm(signum, frame):
    raise Stopped()


def _on_stop_signal_under_torchrun(signum, frame):
    """torchrun's agent passes a Ctrl-C or SIGTERM on to every rank, which may have had it already:
    the first one stops this rank, later ones must not break into its clean exit."""
    ignore_stop_signals()
    raise KeyboardInterrupt() if signum == signal.SIGINT else Stopped()


def ignore_stop_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


# =============================================================================================
# Runs: --train, --test, --caption, --ask
# =============================================================================================

def prepare_data(cfg: Config, data, encoder: VisionEncoder, model: Captioner, questions=None, whole: bool = False):
    """Features (cached) and tokenized captions of the train/val/test splits (whole: every image as "test"), and
    the questions (`load_questions`) about each split's images."""
    records, store, no_caption = data
    features, bad = cached_features(cfg, encoder, records, store)
    skipped = {**{i: "no caption" for i in no_caption}, **bad}
    check_bad_data(len(records) + len(no_caption), skipped, cfg)
    by_id = {r.image_id: r for r in records}
    ids = [r.image_id for r in records]
    parts = {"test": ids} if whole else split_by_image(ids, cfg.seed)
    splits = {name: make_split(ids, features, by_id, model) for name, ids in parts.items()}
    if questions:
        add_questions(splits, questions, by_id, cfg, encoder)
    return splits, by_id, store


def settings_table(cfg: Config) -> str:
    """The settings that differ from the defaults, one aligned row each (the checkpoint and W&B keep them all)."""
    rows = "".join(f"\n  {f.name.upper():<20} {getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
                   if not f.metadata["secret"] and getattr(cfg, f.name) != f.default)
    return f"settings that differ from the defaults:{rows or ' none'}"


def banner(cfg: Config, device, dtype, splits=None, model=None) -> None:
    log.info(f"device: {device}, dtype: {str(dtype).replace('torch.', '')}")
    if splits:
        log.info("data: " + ", ".join(f"{k} {len(s.ids)} images / {len(s.pairs)} captions"
                                      + (f" / {len(s.questions)} questions" if s.questions else "") for k, s in splits.items()))
    if model is not None:
        log.info(describe_adapter(model))
        counts = parameter_counts(model)
        log.info(f"parameters: adapter {counts['adapter']:,} trainable; LM {counts['lm']:,} trainable "
                 f"({lm_tuning(cfg, model)}); {counts['frozen']:,} frozen")


def parameter_counts(model: Captioner) -> dict[str, int]:
    """Trainable parameters of the adapter and of the LM, and the frozen ones, counted as the weights they
    stand for: a 4-bit tensor packs two per byte, its quant_state knows the real shape."""
    def numel(p) -> int:
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        return math.prod(shape) if shape is not None else p.numel()
    return {"adapter": sum(numel(p) for p in model.adapter.parameters() if p.requires_grad),
            "lm": sum(numel(p) for p in model.lm.parameters() if p.requires_grad),
            "frozen": sum(numel(p) for p in model.parameters() if not p.requires_grad)}


def lm_tuning(cfg: Config, model: Captioner) -> str:
    """What of the LM trains, in words."""
    blocks = len(decoder_blocks(model.lm))
    if cfg.tuning == "topk":
        return f"top {cfg.top_k} of {blocks} blocks"
    frozen = "frozen weights in 4-bit NF4, " if cfg.qlora else ""
    return (f"LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha}, dropout {cfg.lora_dropout} on "
            f"{'/'.join(LORA_TARGETS)} of all {blocks} blocks; {frozen}TOP_K is ignored")


def describe_adapter(model: Captioner) -> str:
    adapter, shape = model.adapter, model.feature_shape
    if isinstance(adapter, QFormer):
        return (f"adapter: qformer, {adapter.num_tokens} queries x {len(adapter.blocks)} layers cross-attending "
                f"{shape[0]} patch tokens of width {shape[1]} -> LM width {adapter.lm_dim}")
    return f"adapter: mlp, one {shape[0]}-d image embedding -> {adapter.num_tokens} tokens of LM width {adapter.lm_dim}"


def cmd_train(cfg: Config, checkpoint: str | None, resume: bool, demo: bool) -> None:
    """--train: train from scratch, or with `resume` continue `checkpoint` (default: the last one)."""
    check_global_batch(cfg)
    if DIST.launched:
        log.info(f"BATCH_SIZE={cfg.batch_size} is the global batch: {cfg.batch_size // DIST.world_size} pairs on each "
                 f"of the {DIST.world_size} processes")
    device, dtype = resolve_device(cfg)
    resumed = checkpoint_to_resume(cfg, checkpoint) if resume else None
    if resumed and resumed[1]["epoch"] >= cfg.epochs:
        log.info(f"{resumed[0]} already finished epoch {resumed[1]['epoch']} of EPOCHS={cfg.epochs}: nothing to resume")
        return
    data, questions = load_records(cfg), load_questions(cfg)  # a wrong dataset path fails before any model is loaded
    encoder, model = build_model(cfg, device, dtype)
    if cfg.init_from and not resumed:
        start_from(model, cfg)
    splits, by_id, store = prepare_data(cfg, data, encoder, model, questions)
    if not splits["train"].pairs or not splits["val"].ids:
        raise UserError(f"too few images to split 80/10/10 ({sum(len(s.ids) for s in splits.values())} usable)")
    if wants_compile(cfg, device):
        model.use_fast_path(training=True, cuda_graphs=cfg.compile == "max")
    opt = make_optimizer(model, cfg)
    state = restore_run(model, opt, resumed[1], cfg) if resumed else {"step": 0}
    start_epoch = resumed[1]["epoch"] + 1 if resumed else 1
    if resumed:
        log.info(f"resuming from {resumed[0]} at epoch {start_epoch}")
    banner(cfg, device, dtype, splits, model)
    DIST.barrier()  # start-up takes each rank its own time; DDP's first exchange is a lockstep one
    trainer = data_parallel(model)
    fixed_val = splits["val"].ids[:min(16, cfg.val_caption_images or 16)]  # only images that get a caption
    with run_lock(cfg), wandb_run(cfg, "train", resumed[1]["wandb_run_id"] if resumed else None, demo) as run:
        if demo and not resumed:
            untrained, _, _ = evaluate(model, splits["val"], cfg, cfg.val_caption_images, 0, splits["train"])
            log.info(f"before training: val loss {untrained['loss']:.4f}, CIDEr {untrained['CIDEr']:.4f} (for contrast)")
        for epoch in range(start_epoch, cfg.epochs + 1):
            started = time.perf_counter()
            with out_of_memory_advice(cfg, device, training=True):
                train_loss = train_epoch(trainer, opt, splits["train"], cfg, epoch, state, run)
            train_seconds = time.perf_counter() - started
            with out_of_memory_advice(cfg, device, training=False):
                metrics, preds, _ = evaluate(model, splits["val"], cfg, cfg.val_caption_images, 0, splits["train"])
            metrics.update(train_loss=train_loss, train_seconds=train_seconds)
            samples = sample_table(run, by_id, store, fixed_val, preds)
            run.log({f"val/{k}": v for k, v in {**metrics, **samples}.items() if v is not None} | {"epoch": epoch},
                    step=state["step"])
            path = checkpoint_path(cfg, epoch)
            if DIST.is_main:
                # history first: if the run dies between the two writes, resuming redoes the epoch and replaces its line
                record_epoch(cfg, epoch, state["step"], metrics, {k: len(s.ids) for k, s in splits.items()})
                save_checkpoint(model, opt, cfg, epoch, state["step"], metrics, run.id)
            DIST.barrier()  # the others wait for the checkpoint here, not in the next step's lockstep exchange
            log.info(f"epoch {epoch} ({train_seconds:.0f} s): train loss {train_loss:.4f}, val loss {metrics['loss']:.4f}, "
                     f"BLEU-4 {metrics.get('BLEU-4', 0):.4f}, CIDEr {metrics.get('CIDEr', 0):.4f}"
                     + (f", VQA-acc {metrics['VQA-acc']:.4f}" if "VQA-acc" in metrics else "") + f" -> {path}")
            if epoch == start_epoch and model.fixed_shapes:
                log.info(f"fast path: {compiled_graphs()} graphs compiled for training and validation so far")
            for i in fixed_val[:3]:
                log.info(f"  {i}: {preds.get(i, '')!r}")
    log.info("per epoch:\n" + epoch_table(read_history(history_path(cfg.output_dir_models, cfg.run_name))))
    log.info(f"done: checkpoints in {cfg.output_dir_models}; {wandb_footer(run)}")
    log.info(f"next: python multimodal_transfer_learning.py --test{' --demo' if demo else ''}")


@dataclass
class InferenceModel:
    """A model as --test, --caption and --ask use it: rebuilt from a checkpoint's stored config, or
    the model before training (untrained=True, --test --untrained), whose `path` then names its results."""
    cfg: Config
    path: Path
    checkpoint: dict
    device: torch.device
    dtype: torch.dtype
    encoder: VisionEncoder
    model: Captioner
    untrained: bool = False


def load_trained(cfg: Config, checkpoint: str | None) -> InferenceModel:
    """The checkpoint (`checkpoint`, or the last one of this configuration) and the model it holds."""
    path = chosen_checkpoint(cfg, checkpoint)
    ckpt = read_checkpoint(path)
    cfg = config_from_checkpoint(ckpt, cfg)
    device, dtype = resolve_device(cfg)
    encoder, model = build_model(cfg, device, dtype)
    load_weights(model, ckpt)
    model.eval()
    return InferenceModel(cfg, path, ckpt, device, dtype, encoder, model)


def build_untrained(cfg: Config) -> InferenceModel:
    """The zero-shot baseline: the adapter at its SEED initialisation, the LM as pretrained."""
    device, dtype = resolve_device(cfg)
    encoder, model = build_model(cfg, device, dtype)
    model.eval()
    path = Path(cfg.output_dir_models) / f"untrained_{cfg.run_name}"
    return InferenceModel(cfg, path, {"epoch": 0}, device, dtype, encoder, model, untrained=True)


def cmd_test(cfg: Config, checkpoint: str | None, untrained: bool, demo: bool) -> None:
    """--test: evaluate a checkpoint (or the untrained model) on the test split (or every image of TEST_DATASET,
    captions only) and write its results."""
    questions = None if cfg.test_dataset else load_questions(cfg)
    m = build_untrained(cfg) if untrained else load_trained(cfg, checkpoint)
    cfg, path = m.cfg, m.path
    source, data = test_source(cfg) if cfg.test_dataset else (cfg, load_records(cfg))
    splits, by_id, store = prepare_data(source, data, m.encoder, m.model, questions, whole=bool(cfg.test_dataset))
    if wants_compile(cfg, m.device):
        m.model.use_fast_path(training=False, cuda_graphs=cfg.compile == "max")
    test = splits["test"]
    banner(cfg, m.device, m.dtype, splits, m.model)
    with wandb_run(cfg, "test", demo=demo) as run:
        with out_of_memory_advice(cfg, m.device, training=False):
            metrics, preds, answered = evaluate(m.model, test, cfg, cfg.test_caption_images, cfg.retrieval_pool,
                                                splits.get("train"))
        if not DIST.is_main:
            return  # rank 0 writes and reports
        decoding = {k: v for k, v in decoding_kwargs(cfg).items() if v is not None}
        result = {"checkpoint": None if m.untrained else str(path), "untrained": m.untrained,
                  "epoch": m.checkpoint["epoch"], "metrics": metrics, "decoding": decoding,
                  "test_dataset": cfg.test_dataset, "num_test_images": len(test.ids), "config": cfg.public()}
        written = [result_path(path, kind, cfg.test_dataset) for kind in ("test", "captions")]
        atomic_write(written[0], lambda fh: fh.write(json.dumps(result, indent=2).encode()))
        scores = image_scores(preds, {i: by_id[i].captions for i in preds})
        rows = [{"image_id": i, "generated": preds[i], "references": by_id[i].captions, **scores[i]} for i in preds]
        atomic_write(written[1], lambda fh: fh.write("".join(json.dumps(r) + "\n" for r in rows).encode()))
        if answered:
            written.append(result_path(path, "answers"))
            atomic_write(written[-1], lambda fh: fh.write("".join(json.dumps(a) + "\n" for a in answered).encode()))
        try:  # the gallery is for looking at: without workflow_tools.py (or room for it) the results still stand
            gallery = result_path(path, "gallery", cfg.test_dataset)
            workflow_tools("the test gallery").write_gallery(gallery, rows, lambda i: store.open(by_id[i].ref), result)
            written.append(gallery)
        except UserError as e:
            log.info(f"{e}; no gallery written")
        append_results_row(cfg, path, m.checkpoint, metrics, m.untrained)
        samples = sample_table(run, by_id, store, list(preds)[:16], preds)
        run.log({f"test/{k}": v for k, v in {**metrics, **samples}.items() if v is not None})
        run.summary.update({f"test/{k}": v for k, v in metrics.items() if v is not None})
    print(f"test results for {'the untrained model' if m.untrained else path} ({len(test.ids)} test images"
          f"{' of ' + cfg.test_dataset if cfg.test_dataset else ''}, "
          f"retrieval pool {metrics.get('retrieval_pool', 0)}):")
    print(format_table(metrics))
    log.info(f"wrote {', '.join(str(w) for w in written)}; {wandb_footer(run)}")


def encode_image_files(paths: list[str], encoder: VisionEncoder, batch_size: int):
    """(paths, pixels, features) per batch of the readable image files; each unreadable one is reported in one line."""
    for start in range(0, len(paths), batch_size):
        names, pixels = [], []
        for name in paths[start: start + batch_size]:
            try:
                with Image.open(name) as img:
                    pixels.append(encoder.preprocess(img))
                names.append(name)
            except Exception as e:
                reason = "no such file" if isinstance(e, FileNotFoundError) else f"cannot read image ({type(e).__name__}: {e})"
                log.error(f"{name}: {reason}")
        if names:
            yield names, pixels, encoder(torch.stack(pixels))


def describe_images(m: InferenceModel, paths: list[str], question: str | None = None, solved: Split | None = None,
                    explain=False) -> int:
    """Print path<TAB>text for each readable image: its caption, or the answer to `question` (after
    QA_SHOTS solved examples of `solved`); explain: also the pictures of where a Q-Former's queries look.
    Returns the exit code: 1 if any image could not be read."""
    tools = workflow_tools("--explain") if explain else None
    picture_names, done = tools.explain_names(paths) if tools else {}, 0
    for names, pixels, features in encode_image_files(paths, m.encoder, m.cfg.eval_batch_size):
        texts = (answer_questions(m.model, [Question(n, question, [], "", n) for n in names], features, m.cfg, solved)
                 if question else generate_captions(m.model, features, m.cfg, desc="captioning"))
        for name, text in zip(names, texts):
            print(f"{name}\t{text}", flush=True)
        if tools:
            tools.write_attention_pictures(m, names, pixels, features, texts, picture_names)
        done += len(names)
    return 1 if done < len(paths) else 0


def cmd_caption(cfg: Config, checkpoint: str | None, images: list[str], explain: bool) -> int:
    m = load_trained(cfg, checkpoint)
    if explain and m.cfg.adapter != "qformer":
        raise UserError(f"--explain shows where a Q-Former's queries look, but {m.path} has ADAPTER={m.cfg.adapter}: "
                        "pass a checkpoint trained with ADAPTER=qformer", exit_code=2)
    return describe_images(m, images, explain=explain)


def cmd_ask(cfg: Config, checkpoint: str | None, question: str, images: list[str]) -> int:
    """--ask: answers as --test makes them, after QA_SHOTS solved examples of the QA train split."""
    questions = load_questions(cfg)
    m = load_trained(cfg, checkpoint)
    solved = prepare_data(m.cfg, load_records(m.cfg), m.encoder, m.model, questions)[0]["train"] if cfg.qa_shots else None
    return describe_images(m, images, " ".join(question.split()), solved)


# =============================================================================================
# Command line
# =============================================================================================

def env_help() -> str:
    lines = ["environment variables (also read from .env; see .env.example):"]
    for f in dataclasses.fields(Config):
        lines.append(f"  {f.name.upper():<20} {f.metadata['help']} [default: {f.default!r}]"
                     if not f.metadata["secret"] else f"  {f.name.upper():<20} {f.metadata['help']}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Turn a text-only LM into a vision-language model that captions images "
                                "and answers questions: a frozen vision encoder, a trained bridge (MLP or Q-Former) "
                                "and the LM's top-K blocks (or LoRA) trained.", epilog=env_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    job = p.add_mutually_exclusive_group(required=True)
    job.add_argument("--train", action="store_true", help="train, validate and checkpoint every epoch")
    job.add_argument("--test", action="store_true", help="evaluate the last checkpoint on the test split")
    job.add_argument("--caption", action="store_true", help="caption the image files IMG ... with the last checkpoint")
    job.add_argument("--ask", metavar="QUESTION", help="answer QUESTION about each image IMG ... (prints path<TAB>answer)")
    job.add_argument("--sweep", nargs="+", metavar="ENV_FILE",
                     help="for each file: --train then --test with its settings over the base configuration, outputs "
                          "in OUTPUT_DIR_MODELS/<file stem>/; finished variants are skipped, interrupted ones resumed; "
                          "ends with the comparison")
    job.add_argument("--compare", nargs="*", metavar="DIR",
                     help="table and plots of every run under the folders (default OUTPUT_DIR_MODELS): comparison.md "
                          "and comparison_*.png in the first")
    job.add_argument("--export", metavar="DIR", help="write the last (or --checkpoint) checkpoint as model.safetensors, "
                                                     "config.json and a README.md model card")
    p.add_argument("images", nargs="*", metavar="IMG", help="image files for --caption and --ask")
    p.add_argument("--env-file", metavar="PATH", help="read this file instead of ./.env (--sweep: the base configuration)")
    p.add_argument("--checkpoint", metavar="PATH", help="use this checkpoint (a .pt file or an --export folder) "
                                                        "instead of the last one")
    p.add_argument("--resume", action="store_true", help="with --train: continue from the last checkpoint")
    p.add_argument("--untrained", action="store_true",
                   help="with --test: evaluate the model before training (the zero-shot baseline row)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="with --export: upload the folder to this Hugging Face "
                                                            "model repository (HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.add_argument("--explain", action="store_true", help="with --caption and an ADAPTER=qformer checkpoint: also "
                   "write a PNG per image of where the queries look")
    p.add_argument("--demo", action="store_true", help="offline demo: synthetic shapes and tiny random models")
    p.add_argument("--debug", action="store_true", help="show tracebacks of expected failures")
    args = p.parse_args(argv)
    takes_images = args.caption or args.ask is not None
    for flag, ok, rule in (("--resume", args.train, "--resume goes with --train"),
                           ("--untrained", args.test, "--untrained goes with --test"),
                           ("--push-to-hub", args.export, "--push-to-hub goes with --export DIR"),
                           ("--private", args.push_to_hub, "--private goes with --push-to-hub"),
                           ("--explain", args.caption, "--explain goes with --caption"),
                           ("--checkpoint", not (args.sweep or args.compare is not None or args.untrained),
                            "--checkpoint goes with --test, --caption, --ask, --export or --train --resume")):
        if getattr(args, flag[2:].replace("-", "_")) and not ok:
            p.error(rule)
    if takes_images != bool(args.images):
        p.error("--caption and --ask need at least one image path" if takes_images
                else "image paths go with --caption or --ask")
    if args.ask is not None and not args.ask.strip():
        p.error("--ask needs a question, e.g. --ask 'What is the dog doing?' IMG")
    return args


def resume_command(demo: bool, env_file: str | None) -> str:
    launcher = "torchrun ... " if DIST.launched else "python "
    return (f"{launcher}multimodal_transfer_learning.py --train --resume{' --demo' if demo else ''}"
            f"{f' --env-file {env_file}' if env_file else ''}")


def stop_message(code: int, job: str, resume: str) -> str:
    """What Ctrl-C or SIGTERM leaves (130 or 143) during `job`, and how to continue."""
    stopped = f"stopped ({'Ctrl-C' if code == 130 else 'SIGTERM'})"
    if job == "train":
        return f"{stopped}; no partial checkpoint was written. Continue with: {resume}"
    if job == "sweep":
        return (f"{stopped}; no variant was started after it. Continue with the same command: finished variants "
                f"are skipped, the interrupted one resumes")
    return stopped


def workflow_tools(command: str):
    """The sibling module of workflow tools, for the commands that need it. It imports this module by its
    name, so a script run (module __main__) registers itself under that name first: one module, one DIST."""
    sys.modules.setdefault("multimodal_transfer_learning", sys.modules[__name__])
    try:
        import workflow_tools as tools
    except ModuleNotFoundError as e:
        if e.name != "workflow_tools":
            raise
        raise UserError(f"{command} needs workflow_tools.py beside {Path(__file__).name} (the recipe alone trains, "
                        "tests, captions and answers): copy it from the repository") from None
    return tools


def run_command(cfg: Config, args) -> int:
    """The command's exit code; the commands that run a model resolve the device themselves."""
    if args.train:
        cmd_train(cfg, args.checkpoint if args.resume else None, resume=args.resume, demo=args.demo)
    elif args.test:
        cmd_test(cfg, args.checkpoint, untrained=args.untrained, demo=args.demo)
    elif args.caption:
        return cmd_caption(cfg, args.checkpoint, args.images, args.explain)
    elif args.ask is not None:
        return cmd_ask(cfg, args.checkpoint, args.ask, args.images)
    elif args.sweep:
        return workflow_tools("--sweep").cmd_sweep(cfg, args.sweep, args.env_file, args.demo, args.debug)
    elif args.export:
        workflow_tools("--export").cmd_export(cfg, args.checkpoint, Path(args.export), args.push_to_hub, args.private)
    else:
        workflow_tools("--compare").cmd_compare(cfg, args.compare)
    return 0


def main(argv=None) -> int:
    global DIST
    args = parse_args(argv)
    setup_logging("DEBUG" if args.debug else "INFO")
    code = 0
    try:
        DIST = read_torchrun_environment()
        cfg = load_config(read_environment(args.env_file, args.demo))
        setup_logging("DEBUG" if args.debug else cfg.log_level, cfg.secrets())
        if DIST.launched:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, _on_stop_signal_under_torchrun)
        else:
            signal.signal(signal.SIGTERM, _on_sigterm)
        if DIST.world_size > 1 and not (args.train or args.test):
            raise UserError("only --train and --test run on several processes: start this command with plain python",
                            exit_code=2)
        if DIST.launched:
            start_process_group(resolve_device(cfg)[0])
        if args.demo:
            log.info("demo: synthetic shapes, a tiny random encoder and a tiny random Qwen3 — this proves the "
                     "pipeline end to end, not the quality of pretrained models")
            # Tiny matrices: extra threads cost more than they give, and spin-waiting threads crawl
            # (60x measured) as soon as anything else runs on the CPU.
            torch.set_num_threads(1)
            tools = workflow_tools("--demo")
            cfg = tools.demo_config(cfg, DIST.from_main(tools.make_demo_files, cfg))
        if args.train or args.test:
            log.info(settings_table(cfg))
        if args.compare is None:  # --compare reads local files only
            go_offline_if_hub_unreachable(cfg)
        code = run_command(cfg, args)
    except UserError as e:
        log.debug("traceback", exc_info=True)
        if DIST.is_main or e.exit_code != 2:  # a configuration error is the same on every rank: said once
            log.error(str(e))
        return e.exit_code
    except (KeyboardInterrupt, Stopped) as e:
        code = exit_code_of(e)
        job = "train" if args.train else "sweep" if args.sweep else ""
        log.warning(stop_message(code, job, resume_command(args.demo, args.env_file)))
        return code
    except Exception as e:
        if not lost_other_ranks(e):
            raise
        log.debug("traceback", exc_info=True)
        log.error(f"stopped: an exchange with the other processes failed ({exchange_failure(e)}); another process "
                  "failed or hangs, and its own message says why" +
                  (f". Continue with: {resume_command(args.demo, args.env_file)}" if args.train else ""))
        return 1
    finally:
        if DIST.launched:  # torchrun's agent stops the ranks with a signal, maybe while this one is exiting
            ignore_stop_signals()
    stop_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
