#!/usr/bin/env python3
"""Speed and memory benchmark of multimodal_transfer_learning.py at the REAL model shapes.

    python benchmarks/bench_train.py [--json PATH] [--check]              # CPU: plain vs eager (fp32, batch 8)
    python benchmarks/bench_train.py --device cuda --batch-size 64 --steps 10 --warmup 3   # + fast, fast+graphs
    python benchmarks/bench_train.py --liger           # CUDA: eager and fast with LIGER=1, alone in the process
    python benchmarks/bench_train.py --compile-strategies   # warm-up: whole decoder stack vs one block at a time
    python benchmarks/bench_train.py --max-batch       # CUDA: the largest batch a 24 GiB card holds
    python benchmarks/bench_train.py --variants        # cost of mlp/top-3, qformer/top-3, mlp/LoRA-16
    python benchmarks/bench_train.py --e2e             # end-to-end --train/--test, eager vs fast path
    python benchmarks/bench_train.py --estimate        # only the analytic 24 GB GPU estimate
    bash benchmarks/gpu_check.sh OUT_DIR               # the GPU measurements, phase by phase, in 8 minutes

Offline and download-free: it builds Qwen3-0.6B-Base (vocab 151,936, hidden 1024, MLP 3072, 28 layers,
16 query / 8 KV heads of 128, tied embeddings, rope_theta 1e6) and CLIP ViT-B/32's vision tower (hidden
768, 12 layers, 12 heads, MLP 3072, 224 px, patch 32, projection 512) from their configs with random
weights, saves them with a small word-level tokenizer and the CLIP image processor, and loads them
through the script's own code (`mtl.load_config` + `mtl.build_model`), so what is measured is what
users run. Random weights cost exactly as much compute as trained ones.

Training recipes, compared at equal batch size on the same pairs in the same order (the script's own
`mtl.optimizer_steps` batching), each with its own AdamW, alternating step by step so that a busy
neighbour slows all alike; warm-up steps are not timed and rates come from the median timed step:
* eager: the script's `mtl.train_step` on cached features, COMPILE=0 (the default on CPU).
* fast: the same step after `Captioner.use_fast_path` (COMPILE=auto on CUDA): each decoder block compiled
  (regional compilation), no attention mask, inputs padded to a length bucket and a full batch. Its warm-up
  (`use_fast_path` + `compile_every_shape`: every training and evaluation shape, before timing) is reported
  in seconds, with the number of graphs compiled.
* fast+graphs (CUDA): the same with CUDA graphs (COMPILE=max), on a model of its own.
* plain: what one writes first: the frozen encoder runs every step on pixel tensors (already decoded
  and preprocessed, which flatters it), captions padded to a fixed MAX_CAPTION_TOKENS+1, and
  `lm(inputs_embeds, attention_mask, labels)` computing logits over batch x sequence x vocabulary,
  then the same clipping and AdamW.
* --liger (CUDA, liger-kernel installed): only eager and fast, on a model built with LIGER=1. Liger replaces
  Qwen3's RoPE function for the whole process, so it never shares one with the other recipes.
Before timing, each compiled recipe is compared with eager from the same weights: the loss and the gradients
accumulated over two micro-batches (what CUDA graphs' memory pool could overwrite), relative differences.
Per recipe: samples/s, useful tokens/s, useful FLOP/s and their share of the measured matmul peak,
kernel launches per step (torch.profiler over one step: on CUDA the launch calls the CPU makes, kernels
and CUDA graphs alike, and the kernels the GPU ran; on CPU the operators dispatched), and the CPU's
enqueue time (until the step function returns) against the step's wall time (until the device is
done): when the two are equal the GPU waits on Python.

Memory: on CPU each uncompiled recipe runs in a fresh subprocess; after a warm-up step (so the AdamW state
exists) the kernel's resident-set high-water mark (VmHWM) is reset via /proc/self/clear_refs and read
after one step; growth = VmHWM - VmRSS at the reset, with MALLOC_MMAP_THRESHOLD_=65536 so that glibc
returns freed tensors at once. On CUDA the allocator is exact, so it is measured in-process: peak
allocated during one step minus what was allocated before it. "step" = that growth (activations,
gradients, logits, temporaries); "total" = weights + the recipe's AdamW state + step.
--max-batch (CUDA, fast path): the largest BATCH_SIZE whose worst-case step (every caption 49 tokens)
fits a 24 GiB card, from the allocator peak at two batch sizes and checked at the predicted size,
with samples/s at both sizes on those worst-case batches.

Latency of --caption: JPEG decoding and preprocessing, the encoder, the adapter and greedy generation of
20 new tokens (`encode_image_files` + `generate_captions`, as `describe_images` runs them), per image at
batch 1 and 32, the median of 3 runs after a warm-up one on CUDA, one run on CPU.

Compile strategies (--compile-strategies): each in a fresh process with empty inductor/Triton caches (a
user's first run), the seconds to compile and run the first training shape forward and backward, then
that step's time: the whole 28-block stack under one torch.compile with its attention mask (before),
regional (the recipe; also the seconds for every training and evaluation shape), and the whole stack
with a dynamic sequence length.

The JSON is rewritten after every section, so a run stopped by a time limit keeps what it measured.

Generation: `mtl.generate_captions` (batched by EVAL_BATCH_SIZE, KV cache) against a loop that calls
`Captioner.generate` one image at a time. With random weights no caption stops early, so both run
MAX_NEW_TOKENS tokens per caption; a trained model favours the loop somewhat (a lone caption stops at
its own EOS). Feature extraction: an encoding epoch (`mtl.encode_images` over N JPEGs of 500x375,
Flickr's usual size) against a cached epoch (`mtl.cached_features` called a second time).

Useful FLOPs of one (image, caption) pair (the formula behind "useful FLOP/s"):

    T = V + P + C - 1   positions that matter: V visual + P prompt + C caption tokens (caption + EOS);
                        the last input (EOS) predicts nothing and padding is never useful
    F = 2 * N_blk * T * L          forward through all L blocks         (N_blk = parameters per block)
      + 2 * N_blk * T * L          input-gradient backward through all L blocks (the adapter below
                                   them is trained, so the gradient must reach the bottom)
      + 2 * N_blk * T * K          weight gradients of the top K blocks only
      + 2 * 2 * H * vocab * C      LM head at the C supervised positions: forward + input gradient
                                   (tied, frozen: no weight gradient)
      + 6 * N_adapter              adapter forward, weight and input gradients (negligible)

Attention-score FLOPs (~4*T*q_dim per token and layer, ~1% here), norms and activations are not
counted. Its share is taken of the device's matmul peak measured in the same run (best of several fp32
2048x2048 matmul bursts on CPU, bf16 8192x8192 on CUDA), so a slow or busy machine lowers both. On CPU
the run also records how much CPU time OTHER processes used while timing (/proc/stat minus this
process) and warns above 10%: spin-waiting OpenMP threads crawl as soon as anything else runs.

The 24 GB GPU estimate (printed as "estimate", never as a measurement): memory = frozen weights in
bf16 + trainable weights, their fp32 gradients and AdamW moments + saved activations (bytes per token
of a frozen and of a trainable block, measured with saved_tensors_hooks on a 2-block model of the real
widths under bf16 autocast) + ~12 bytes per supervised-position logit + CUDA context. Epoch time =
pairs x F / (165 TFLOP/s x an assumed share).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

import multimodal_transfer_learning as mtl  # noqa: E402
import workflow_tools as tools  # noqa: E402

# ---- the real shapes --------------------------------------------------------------------------
QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                  rope_theta=1_000_000.0, max_position_embeddings=32768, rms_norm_eps=1e-6)
CLIP_B32_VISION = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       image_size=224, patch_size=32)
CLIP_PROJECTION = 512
# --tiny: the same architectures at toy widths, to check the benchmark's own code in seconds (tests/test_benchmark.py)
TINY_QWEN3 = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=256)
TINY_CLIP_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        image_size=32, patch_size=8)
FLICKR30K_IMAGES, FLICKR_CAPTIONS_PER_IMAGE = 31_783, 5

# Flickr30k-like words. Captions draw a word count from a log-normal clipped to 5..30 (mean ~12.3
# words, like Flickr30k's), then end with " ." as most Flickr captions do (one more token).
WORDS = """a an the two three several group of man men woman women boy boys girl girls child children
person people dog dogs cat horse bike bicycle car street road city sidewalk building water beach ocean
lake river snow grass field park tree trees mountain rock wall crowd player team ball game soccer
football basketball shirt hat jacket dress blue red white black green yellow orange pink brown gray
young old little small large big is are sitting standing walking running playing riding holding
wearing looking jumping climbing smiling talking eating drinking working waiting in on at with near
next to under over behind front while and his her their its into through down up across along
outside inside background stage music guitar microphone food table chair bench window camera
picture sign night day sunny""".split()
PROMPT_WORDS = ["short", "caption", "image", ":"]
PEAK_LABEL = {"cpu": "fp32 2048x2048 matmul", "cuda": "bf16 8192x8192 matmul"}


def flickr_caption_words(rnd: random.Random) -> int:
    mu, sigma = math.log(12.3) - 0.38 ** 2 / 2, 0.38
    return min(30, max(5, round(rnd.lognormvariate(mu, sigma))))


def flickr_captions(n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS) for _ in range(flickr_caption_words(rnd))) + " ." for _ in range(n)]


# ---- assets: models and images on disk ---------------------------------------------------------

def build_assets(root: Path, num_images: int, seed: int, tiny: bool = False) -> dict[str, Path]:
    """Real-shape (or --tiny) random Qwen3 + CLIP saved like hub checkpoints, and a Flickr-like image folder.
    The tokenizer spans the LM's whole vocabulary: every id the LM can emit decodes to one word."""
    lm_shape_, vision_shape = (TINY_QWEN3, TINY_CLIP_VISION) if tiny else (QWEN3_0_6B, CLIP_B32_VISION)
    lm = tools.save_tiny_lm(root / ("qwen3-tiny" if tiny else "qwen3-0.6b-random"), WORDS + PROMPT_WORDS + ["."],
                            seed, **lm_shape_)
    clip = tools.save_tiny_encoder(root / ("clip-tiny" if tiny else "clip-vit-b32-random"), "clip", seed,
                                   projection_dim=CLIP_PROJECTION, **vision_shape)
    return {"lm": lm, "clip": clip, "images": build_images(root / "images", num_images, seed)}


def build_images(folder: Path, num_images: int, seed: int) -> Path:
    """A Flickr-like image folder: photo-like 500x375 JPEGs with five Flickr-like captions each."""
    from PIL import Image, ImageDraw, ImageFilter
    if (folder / "metadata.jsonl").is_file():
        return folder
    rnd = random.Random(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    captions = flickr_captions(num_images * FLICKR_CAPTIONS_PER_IMAGE, seed)
    rows = []
    for i in range(num_images):  # photo-like: a gradient, a few shapes, a little noise, JPEG q=90
        image = Image.linear_gradient("L").resize((500, 375)).convert("RGB")
        image = Image.blend(image, Image.new("RGB", image.size, tuple(rnd.randrange(256) for _ in range(3))), 0.6)
        d = ImageDraw.Draw(image)
        for _ in range(12):
            x, y = rnd.randrange(500), rnd.randrange(375)
            box = (x, y, x + rnd.randrange(20, 200), y + rnd.randrange(20, 150))
            colour = tuple(rnd.randrange(256) for _ in range(3))
            (d.ellipse if rnd.random() < 0.5 else d.rectangle)(box, fill=colour)
        image = Image.blend(image.filter(ImageFilter.GaussianBlur(2)),
                            Image.effect_noise((500, 375), 40).convert("RGB"), 0.15)
        name = f"img/{i:05d}.jpg"
        image.save(folder / name, quality=90)
        rows.append({"file_name": name, "captions": captions[i * 5: i * 5 + 5]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def bench_env(assets: dict, root: Path, args, **overrides) -> dict[str, str]:
    env = {"LM_MODEL": str(assets["lm"]), "VISION_MODEL": str(assets["clip"]), "VISION_ENCODER": "clip",
           "DATASET": str(assets["images"]), "TOP_K": str(args.top_k), "BATCH_SIZE": str(args.batch_size),
           "EVAL_BATCH_SIZE": str(args.eval_batch_size), "DEVICE": args.device, "DTYPE": "auto", "EPOCHS": "1",
           "CACHE_DIR": str(root / "cache"), "OUTPUT_DIR_MODELS": str(root / "models"), "WANDB_MODE": "disabled",
           "LOG_EVERY": "1000000", "NUM_WORKERS": str(args.num_workers), "COMPILE": "0", "SEED": "42"}
    if args.max_new_tokens:
        env["MAX_NEW_TOKENS"] = str(args.max_new_tokens)
    if args.tiny:  # two length buckets instead of four: half the graphs to compile
        env["MAX_CAPTION_TOKENS"] = "8"
    return {**env, **{k.upper(): str(v) for k, v in overrides.items()}}


def load_bench(assets: dict, root: Path, args, **overrides):
    """(cfg, encoder, model, train split) built by the script's own code, features cached."""
    cfg = mtl.load_config(bench_env(assets, root, args, **overrides))
    device, dtype = mtl.resolve_device(cfg)
    encoder, model = mtl.build_model(cfg, device, dtype)
    records, store, _ = mtl.load_records(cfg)
    feats, _ = mtl.cached_features(cfg, encoder, records, store)
    split = mtl.make_split([r.image_id for r in records], feats, {r.image_id: r for r in records}, model)
    return cfg, encoder, model, split


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, bursts: int = 5) -> float:
    """Best FLOP/s of a few bursts of square matmuls: fp32 2048 on CPU, bf16 8192 on CUDA."""
    n, dtype, reps = (8192, torch.bfloat16, 10) if device.type == "cuda" else (2048, torch.float32, 4)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(bursts):
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
    return best


def busy_seconds() -> tuple[float, float] | None:
    """(CPU seconds all processes have used, incl. the hypervisor's steal; this process's) or None."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), time.process_time()


def others_share(before, after, wall: float) -> float | None:
    """Share of the machine's CPUs that OTHER processes used between two busy_seconds() readings."""
    if before is None or after is None or wall <= 0:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, others) / (wall * (os.cpu_count() or 1))


def run_timed(device: torch.device, fn):
    """(fn(), wall seconds, share of the CPUs other processes used meanwhile)."""
    sync(device)
    t, b = time.perf_counter(), busy_seconds()
    out = fn()
    sync(device)
    wall = time.perf_counter() - t
    return out, wall, others_share(b, busy_seconds(), wall)


def proc_status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def lm_shape(model) -> dict:
    lm_cfg = model.lm.config
    blocks = mtl.decoder_blocks(model.lm)
    return {"layers": len(blocks), "params_per_block": sum(p.numel() for p in blocks[0].parameters()),
            "hidden": lm_cfg.hidden_size, "vocab": lm_cfg.vocab_size,
            "adapter_params": sum(p.numel() for p in model.adapter.parameters()),
            "visual_tokens": model.adapter.num_tokens, "prompt_tokens": len(model.prompt_ids)}


def useful_flops(shape: dict, caption_len: int, top_k: int) -> float:
    """Useful FLOPs of one (image, caption) pair; caption_len counts caption tokens + EOS (see docstring)."""
    t = shape["visual_tokens"] + shape["prompt_tokens"] + caption_len - 1
    blocks = 2 * shape["params_per_block"] * t * (2 * shape["layers"] + top_k)
    head = 2 * 2 * shape["hidden"] * shape["vocab"] * caption_len
    return blocks + head + 6 * shape["adapter_params"]


def train_split(split: "mtl.Split", num_pairs: int) -> "mtl.Split":
    """The first num_pairs pairs of a split (cycled if the split is smaller)."""
    pairs = [split.pairs[i % len(split.pairs)] for i in range(num_pairs)]
    return mtl.Split(split.ids, split.features, split.references, pairs)


# ---- training recipes ---------------------------------------------------------------------------

@dataclass
class Recipe:
    """One way to run a training step on the shared model: on the compiled fast path or eager, its own
    AdamW, and whether it eats pixels (plain) or cached features."""
    name: str
    model: "mtl.Captioner"
    fast: bool
    opt: torch.optim.Optimizer
    step: Callable[[list], None]
    pixels: bool = False
    warmup_seconds: float = 0.0
    graphs: int = 0


def recipe_mode(recipe: Recipe):
    """The model as the recipe runs it: the fast path where it compiled, else eager for the with-block."""
    return contextlib.nullcontext() if recipe.fast else recipe.model.eager()


def plain_inputs(model, features, caps, prompts, length: int):
    """inputs_embeds, attention mask and labels with the text padded to `length` tokens, as a first version does."""
    ids, mask, labels, places = model.layout(caps, prompts)
    extra = model.adapter.num_tokens + length - ids.shape[1]
    ids = torch.nn.functional.pad(ids, (0, extra), value=model.tokenizer.pad_token_id)
    mask, labels = torch.nn.functional.pad(mask, (0, extra)), torch.nn.functional.pad(labels, (0, extra), value=-100)
    ids, mask, labels, places = (model.to_device(t) for t in (ids, mask, labels, places))
    return model.embed(features, ids, places), mask, labels


def plain_step(model, encoder, opt, micro_batches: list, max_len: int, grad_clip: float) -> None:
    """The first recipe one writes: encode pixels every step, fixed padding, full-vocabulary logits."""
    for pixels, caps, prompts in micro_batches:
        with model.autocast():
            length = max(len(p) for p in prompts or [model.prompt_ids]) + max_len
            embeds, mask, labels = plain_inputs(model, encoder(pixels), caps, prompts, length)
            loss = model.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        (loss / len(micro_batches)).backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def make_recipe(name: str, model, encoder, cfg) -> Recipe | None:
    """plain, eager, fast or fast+graphs (COMPILE=max), "+liger" alike (None if the fast path fell back to
    eager: compiling failed). The eager recipes share a model with "fast" and leave its fast path for their
    steps; "fast+graphs" needs a model of its own (a model's blocks are compiled one way at a time)."""
    opt = mtl.make_optimizer(model, cfg)
    if name == "plain":
        return Recipe(name, model, False, opt, pixels=True,
                      step=lambda mb: plain_step(model, encoder, opt, mb, cfg.max_caption_tokens + 1, cfg.grad_clip))
    step = lambda mb: mtl.train_step(model, opt, mb, cfg.grad_clip)  # noqa: E731
    if name.startswith("eager"):
        return Recipe(name, model, False, opt, step)
    sync(model.device)
    t, graphs = time.perf_counter(), mtl.compiled_graphs()
    model.use_fast_path(training=True, cuda_graphs=name.startswith("fast+graphs"))
    model.compile_every_shape(training=True)  # so that no timed step compiles: the warm-up of every shape
    sync(model.device)
    if not model.fixed_shapes:
        return None
    return Recipe(name, model, True, opt, step, warmup_seconds=time.perf_counter() - t,
                  graphs=mtl.compiled_graphs() - graphs)


def pixel_split(split: "mtl.Split", encoder, store, by_id) -> "mtl.Split":
    """The split with preprocessed pixels in place of features: what the plain recipe eats."""
    pixels = torch.stack([encoder.preprocess(store.open(by_id[i].ref)) for i in split.ids])
    return mtl.Split(split.ids, pixels, split.references, split.pairs)


def step_batches(model, split, cfg, n: int) -> list[list]:
    """The first n optimizer steps of epoch 1, as the script forms them."""
    return list(itertools.islice(mtl.optimizer_steps(model, split, cfg, 1), n))


def timed_step(recipe: Recipe, micro_batches: list, device) -> tuple[float, float, float | None]:
    """(CPU enqueue seconds, wall seconds, share of the CPUs other processes used) of one step."""
    sync(device)
    before, t = busy_seconds(), time.perf_counter()
    with recipe_mode(recipe):
        recipe.step(micro_batches)
        enqueue = time.perf_counter() - t
        sync(device)
    wall = time.perf_counter() - t
    return enqueue, wall, others_share(before, busy_seconds(), wall)


LAUNCH_CALLS = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                "cudaLaunchCooperativeKernel", "cudaGraphLaunch", "cuGraphLaunch"}


def launch_profile(recipe: Recipe, micro_batches: list, device) -> dict:
    """Kernel launches of one step (CUDA), or operators dispatched (CPU), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with recipe_mode(recipe), profile(activities=activities) as prof:
        recipe.step(micro_batches)
        sync(device)
    events = prof.events()
    if device.type == "cuda":
        return {"launches": sum(e.name in LAUNCH_CALLS for e in events),
                "kernels": sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events),
                "what": "CUDA launch calls made by the CPU (kernels and CUDA graphs) in one step"}
    return {"launches": sum(e.name.startswith("aten::") for e in events),
            "what": "aten operators dispatched in one step (CPU: no kernel launches)"}


def optimizer_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def cuda_step_bytes(recipe: Recipe, micro_batches: list, device) -> int:
    """Allocator peak during one step minus what was allocated before it (CUDA: exact, in-process)."""
    gc.collect()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with recipe_mode(recipe):
        recipe.step(micro_batches)
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


# ---- the memory worker (CPU: a fresh subprocess per recipe) ---------------------------------------

def memory_worker(args) -> dict:
    """Build the model, run a warm-up step, then measure one step's resident-set growth. Prints JSON."""
    root, assets = Path(args.workdir), json.loads(args._assets)
    cfg, encoder, model, split = load_bench(assets, root, args, **json.loads(args._overrides or "{}"))
    recipe = make_recipe(args._worker, model, encoder, cfg)
    train = train_split(split, 2 * cfg.batch_size * cfg.grad_accum)
    if recipe.pixels:
        records, store, _ = mtl.load_records(cfg)
        train = pixel_split(train, encoder, store, {r.image_id: r for r in records})
    warm, measured = step_batches(model, train, cfg, 2)
    model.train()
    with recipe_mode(recipe):
        recipe.step(warm)  # creates the AdamW state and the one-off buffers
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = proc_status()["VmRSS"]
        recipe.step(measured)
        total = proc_status()["VmHWM"]
    caps = [c for _, cs, _ in measured for c in cs]
    return {"step_bytes": total - base, "total_bytes": total, "before_bytes": base,
            "method": "CPU: VmHWM after resetting it via /proc/self/clear_refs, minus VmRSS at the reset",
            "caption_tokens": sum(map(len, caps)), "batch": len(caps),
            "padded_caption_len": cfg.max_caption_tokens + 1 if recipe.pixels else max(map(len, caps))}


def run_memory_worker(recipe: str, args, assets: dict, root: Path, overrides: dict | None = None) -> dict:
    return run_worker("--_worker", recipe, args, assets, root, overrides, {"MALLOC_MMAP_THRESHOLD_": "65536"})


# ---- the compile worker: one way to compile, in a fresh process with empty caches ------------------

COMPILE_STRATEGIES = {
    "whole-stack": "the 28-block decoder stack under one torch.compile per shape, with its attention mask (before)",
    "regional": "each block compiled on its own, the code shared by all blocks, no mask (the recipe: use_fast_path)",
    "whole-stack-dynamic": "the whole stack with the sequence length marked dynamic: one graph for every length"}


def compile_worker(args) -> dict:
    """Compile and run the first training shape (the shortest length bucket at full rows: forward and
    backward of the decoder) one way; then time that step; "regional" also compiles every other training
    and evaluation shape. Caches are empty (a fresh process and inductor/Triton cache folders): a first run."""
    root, assets, strategy = Path(args.workdir), json.loads(args._assets), args._compile
    cfg, _, model, _ = load_bench(assets, root, args)
    device, eos = model.device, model.tokenizer.eos_token_id
    caps = [[eos] * (model.length_buckets[0] - len(model.prompt_ids))] * cfg.batch_size
    ids, mask, _, places = model.layout(caps)  # padded to the shortest bucket, as use_fast_path's first step is
    features = model.to_device(torch.zeros(cfg.batch_size, *model.feature_shape))
    mask = model.to_device(mask)
    model.train()
    sync(device)
    t = time.perf_counter()
    if strategy == "regional":
        model.use_fast_path(training=True)  # compiles this shape, forward and backward
        decoder, mask = model.run_blocks, None
    else:
        decoder = torch.compile(model.run_blocks, dynamic=None if strategy.endswith("dynamic") else False)

    def step():
        embeds = model.embed(features, model.to_device(ids), model.to_device(places))
        if strategy.endswith("dynamic"):
            torch._dynamo.mark_dynamic(embeds, 1)
            torch._dynamo.mark_dynamic(mask, 1)
        with model.autocast():
            decoder(embeds, mask).float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    run_timed(device, step)
    out = {"what": COMPILE_STRATEGIES[strategy], "first_shape_seconds": time.perf_counter() - t,
           "shape": [cfg.batch_size, model.adapter.num_tokens + model.length_buckets[0]]}
    out["step_seconds"] = statistics.median(run_timed(device, step)[1] for _ in range(max(3, args.steps)))
    if strategy == "regional":
        t = time.perf_counter()
        model.compile_every_shape(training=True)
        sync(device)
        out["all_shapes_seconds"] = out["first_shape_seconds"] + time.perf_counter() - t
        with model.eager():
            out["eager_step_seconds"] = statistics.median(run_timed(device, step)[1] for _ in range(max(3, args.steps)))
    out["graphs"] = mtl.compiled_graphs()
    return out


def run_worker(flag: str, name: str, args, assets: dict, root: Path, overrides: dict | None = None,
               env: dict | None = None) -> dict:
    """Run this benchmark as a worker (--_worker or --_compile) in a fresh process; its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), flag, name, "--_assets",
           json.dumps({k: str(v) for k, v in assets.items()}), "--_overrides", json.dumps(overrides or {}),
           "--workdir", str(root), "--batch-size", str(args.batch_size), "--eval-batch-size",
           str(args.eval_batch_size), "--device", args.device, "--top-k", str(args.top_k), "--steps", str(args.steps),
           "--num-workers", str(args.num_workers)] + (["--tiny"] if args.tiny else [])
    proc = subprocess.run(cmd, env={**os.environ, "WANDB_MODE": "disabled", **(env or {})}, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {flag} {name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_compile(assets, root: Path, args, say, save) -> dict:
    """The warm-up of each compile strategy on the same model, each in a fresh process with empty caches
    (--tiny: the shared ones, to stay quick), and the ratios to the recipe's (regional)."""
    out = {"strategies": {}}
    for strategy in args.compile_strategies.split(","):
        say(f"compile: {strategy} ({COMPILE_STRATEGIES[strategy]})")
        caches = {} if args.tiny else {"TORCHINDUCTOR_CACHE_DIR": str(root / f"inductor-{strategy}"),
                                       "TRITON_CACHE_DIR": str(root / f"triton-{strategy}")}
        for folder in caches.values():
            shutil.rmtree(folder, ignore_errors=True)
        out["strategies"][strategy] = r = run_worker("--_compile", strategy, args, assets, root, env=caches)
        say(f"compile: {strategy}: first shape {r['first_shape_seconds']:.1f} s, step {r['step_seconds'] * 1e3:.0f} ms")
        save(out)
    regional = out["strategies"].get("regional")
    for name, r in out["strategies"].items():
        if regional and name != "regional":
            r["warmup_ratio_to_regional"] = r["first_shape_seconds"] / regional["first_shape_seconds"]
            r["step_ratio_to_regional"] = r["step_seconds"] / regional["step_seconds"]
    save(out)
    return out


# ---- the measurements, one function per section of the report ------------------------------------

def measure_features(cfg, encoder, device, say) -> dict:
    """An encoding epoch against a cached one."""
    records, store, _ = mtl.load_records(cfg)
    shutil.rmtree(Path(cfg.cache_dir) / "features", ignore_errors=True)  # a kept --workdir starts uncached too
    say(f"encoding epoch over {len(records)} JPEGs")
    _, encode_s, _ = run_timed(device, lambda: mtl.encode_records(records, store, encoder, cfg))
    _, first_s, _ = run_timed(device, lambda: mtl.cached_features(cfg, encoder, records, store))  # encode + write
    _, cached_s, _ = run_timed(device, lambda: mtl.cached_features(cfg, encoder, records, store))  # read
    return {"images": len(records), "encode_seconds": encode_s, "first_call_seconds": first_s,
            "cached_seconds": cached_s, "encode_images_per_s": len(records) / encode_s,
            "cached_images_per_s": len(records) / cached_s}


def measure_generation(model, cfg, split, args, device, say) -> dict:
    """Batched generation against one image at a time, before any training (the random LM never emits
    EOS, so every caption runs to MAX_NEW_TOKENS; a few training steps teach it to stop almost at once)."""
    decoding = mtl.decoding_kwargs(cfg)
    n_gen, n_loop = min(args.gen_images, len(split.ids)), min(args.loop_images, len(split.ids))
    say(f"generation: {n_gen} captions in batches of {cfg.eval_batch_size}, {n_loop} one at a time")
    model.eval()
    mtl.generate_captions(model, split.features[:1], cfg)  # warm-up

    def one_at_a_time():
        with torch.no_grad():
            return [model.generate(split.features[i: i + 1], decoding) for i in range(n_loop)]

    batched, batched_s, batched_share = run_timed(device, lambda: mtl.generate_captions(model, split.features[:n_gen], cfg))
    loop, loop_s, loop_share = run_timed(device, one_at_a_time)
    return {"batched_captions": n_gen, "eval_batch_size": cfg.eval_batch_size, "batched_seconds": batched_s,
            "batched_captions_per_s": n_gen / batched_s, "loop_captions": n_loop, "loop_seconds": loop_s,
            "loop_captions_per_s": n_loop / loop_s, "max_new_tokens": cfg.max_new_tokens,
            "others_cpu_share": {"batched": batched_share, "loop": loop_share},
            "mean_generated_words_batched": sum(len(c.split()) for c in batched) / max(1, n_gen),
            "mean_generated_words_loop": sum(len(c[0].split()) for c in loop) / max(1, n_loop)}


LATENCY_TOKENS = 20


def measure_latency(model, encoder, cfg, images: Path, device, say, reps: int) -> dict:
    """--caption's latency per image, as `describe_images` runs it: JPEG decoding and preprocessing, the
    encoder, the adapter and greedy generation of 20 new tokens (the random LM never stops early), at
    batch 1 and 32 (EVAL_BATCH_SIZE); the median of `reps` runs (on CUDA after a warm-up one)."""
    paths = sorted(str(p) for p in (images / "img").glob("*.jpg"))
    out = {}
    model.eval()
    for wanted in (1, 32):
        batch = min(wanted, len(paths))
        run_cfg = dataclasses.replace(cfg, max_new_tokens=LATENCY_TOKENS, decoding="greedy", eval_batch_size=batch)

        def caption():
            return [mtl.generate_captions(model, features, run_cfg, desc="latency")
                    for _, _, features in mtl.encode_image_files(paths[:batch], encoder, batch)]

        if device.type == "cuda":
            caption()  # CUDA's lazy start-up costs, and the allocator's first blocks
        runs = [run_timed(device, caption)[1:] for _ in range(reps)]
        seconds = statistics.median(wall for wall, _ in runs)
        say(f"latency at batch {batch}: {seconds * 1e3 / batch:.0f} ms per image")
        out[str(wanted)] = {"batch": batch, "seconds": seconds, "ms_per_image": seconds * 1e3 / batch,
                            "new_tokens": LATENCY_TOKENS, "reps": reps, "others_cpu_share": [o for _, o in runs]}
    return out


def accumulated_gradients(recipe: Recipe, micro_batches: list) -> tuple[float, torch.Tensor]:
    """The mean loss over the micro-batches and the trainable weights' accumulated gradients (flattened,
    fp32), as a GRAD_ACCUM step builds them before the optimizer step; the gradients are then cleared."""
    m, total = recipe.model, 0.0
    m.train()
    with recipe_mode(recipe):
        for features, caps, prompts in micro_batches:
            loss = m(features, caps, prompts) / len(micro_batches)
            loss.backward()
            total += loss.item()
    grads = torch.cat([p.grad.float().flatten() for p in m.parameters() if p.requires_grad])
    m.zero_grad(set_to_none=True)
    return total, grads


def measure_equality(recipes: list[Recipe], micro_batches: list) -> dict:
    """Each compiled recipe against eager from the same initial weights, before any step: the loss and the
    gradients accumulated over two micro-batches (where a CUDA graph's memory pool could overwrite a kept
    gradient), as relative differences. Passes within 2% (loss) and 5% (gradient norm): bf16 rounding."""
    eager = next(r for r in recipes if r.name.startswith("eager"))
    loss, grads = accumulated_gradients(eager, micro_batches)
    out = {}
    for r in (r for r in recipes if r.fast):
        fast_loss, fast_grads = accumulated_gradients(r, micro_batches)
        loss_diff = abs(fast_loss - loss) / abs(loss)
        grad_diff = ((fast_grads - grads).norm() / grads.norm()).item()
        out[r.name] = {"loss_rel_diff": loss_diff, "grad_rel_diff": grad_diff, "micro_batches": len(micro_batches),
                       "equal": loss_diff <= 0.02 and grad_diff <= 0.05}
    return out


def measure_training(recipes: list[Recipe], steps: dict[bool, list], shape, cfg, args, device, say) -> dict:
    """Alternate the recipes step by step on the same batches; rates from the median timed step."""
    times = {r.name: [] for r in recipes}
    peak = 0.0
    for i in range(args.warmup + args.steps):
        peak = max(peak, matmul_peak(device, bursts=2))  # re-measured throughout: a busy machine lowers both
        line = []
        for r in recipes:
            enqueue, wall, others = timed_step(r, steps[r.pixels][i], device)
            if i >= args.warmup:
                times[r.name].append((enqueue, wall, others))
            line.append(f"{r.name} {wall:.3f} s")
        say(f"  step {i + 1}/{args.warmup + args.steps}{' (warm-up)' if i < args.warmup else ''}: "
            f"{', '.join(line)}; load average {os.getloadavg()[0]:.1f}")
    peak = max(peak, matmul_peak(device))
    timed = steps[False][args.warmup:]
    caps = [[c for _, cs, _ in mb for c in cs] for mb in timed]
    out = {"matmul_peak_flops": peak, "matmul_peak_kind": PEAK_LABEL.get(device.type, "matmul"),
           "useful_flops_per_step": sum(useful_flops(shape, len(c), cfg.top_k) for cs in caps for c in cs) / len(caps),
           "mean_caption_tokens": sum(len(c) for cs in caps for c in cs) / sum(map(len, caps)), "recipes": {}}
    for r in recipes:
        per_step = [(len(cs), sum(map(len, cs)), sum(useful_flops(shape, len(c), cfg.top_k) for c in cs), w)
                    for cs, (_, w, _) in zip(caps, times[r.name])]
        med = lambda k: statistics.median(x[k] / x[3] for x in per_step)  # noqa: E731
        enqueue = statistics.median(e for e, _, _ in times[r.name])
        wall = statistics.median(w for _, w, _ in times[r.name])
        say(f"profiling one {r.name} step")
        out["recipes"][r.name] = {
            "step_seconds": [w for _, w, _ in times[r.name]], "samples_per_s": med(0), "useful_tokens_per_s": med(1),
            "useful_flops_per_s": med(2), "useful_flops_share_of_peak": med(2) / peak,
            "cpu_enqueue_seconds": enqueue, "wall_seconds": wall, "enqueue_share_of_wall": enqueue / wall,
            "others_cpu_share": [o for _, _, o in times[r.name]], "compile_warmup_seconds": r.warmup_seconds,
            "graphs_compiled": r.graphs, **launch_profile(r, steps[r.pixels][-1], device)}
    prefix = shape["visual_tokens"] + shape["prompt_tokens"]
    useful = sum(prefix + len(c) - 1 for cs in caps for c in cs)
    out["useful_position_share"] = useful / sum(len(cs) * (prefix + max(map(len, cs))) for cs in caps)
    out["plain_useful_position_share"] = useful / (sum(map(len, caps)) * (prefix + cfg.max_caption_tokens + 1))
    return out


def measure_memory(recipes: list[Recipe], steps, args, assets, root, device, say) -> dict:
    out = {}
    for r in recipes:
        if device.type == "cuda":
            step = cuda_step_bytes(r, steps[r.pixels][-1], device)
            weights = sum(p.numel() * p.element_size() for p in r.model.parameters())
            out[r.name] = {"step_bytes": step, "total_bytes": weights + optimizer_bytes(r.opt) + step,
                           "method": "CUDA allocator: max_memory_allocated - memory_allocated before the step; "
                                     "total = LM+adapter weights + the recipe's AdamW state + step"}
        elif not r.fast:  # on CPU the compiled recipes' memory is not quoted, and compiling again is slow
            say(f"memory: one {r.name} step in a fresh subprocess")
            out[r.name] = run_memory_worker(r.name, args, assets, root)
    return out


def measure_checkpoints(recipe: Recipe, cfg, root: Path) -> dict:
    """Sizes on disk of a run's newest checkpoint (weights + AdamW + RNG) and of an older one (weights only),
    written by the script's own save_checkpoint after the recipe's steps (its AdamW state exists)."""
    folder = root / "checkpoint-sizes"
    run_cfg = dataclasses.replace(cfg, output_dir_models=str(folder))
    for epoch in (1, 2):
        mtl.save_checkpoint(recipe.model, recipe.opt, run_cfg, epoch, 0, {}, None)
    sizes = {"newest_bytes": mtl.checkpoint_path(run_cfg, 2).stat().st_size,
             "older_bytes": mtl.checkpoint_path(run_cfg, 1).stat().st_size,
             "trainable_parameters": sum(mtl.parameter_counts(recipe.model)[k] for k in ("adapter", "lm"))}
    shutil.rmtree(folder, ignore_errors=True)
    return sizes


FITS_24GB = 22.5 * 2**30  # allocator bytes that fit a 24 GiB card: 1.5 GiB left for the CUDA context and workspaces


def measure_max_batch(assets, root: Path, args, say) -> dict:
    """CUDA, fast path: peak allocated of a worst-case step (every caption MAX_CAPTION_TOKENS + EOS) at two
    batch sizes, the largest batch a 24 GiB card holds by linear extrapolation, checked by running it.
    Each batch size is a model built with that BATCH_SIZE, as a user's run would be."""
    cfg = mtl.load_config(bench_env(assets, root, args))

    def run(batch: int) -> tuple[int, float]:
        _, encoder, m, _ = load_bench(assets, root, args, BATCH_SIZE=batch)
        recipe, device = make_recipe("fast", m, encoder, cfg), m.device
        worst = [m.tokenizer.eos_token_id] * (cfg.max_caption_tokens + 1)
        micro = [(m.to_device(torch.zeros(batch, *m.feature_shape)), [worst] * batch, None)]
        recipe.step(micro)  # AdamW's state
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        for _ in range(3):
            recipe.step(micro)
        sync(device)
        out = torch.cuda.max_memory_allocated(device), 3 * batch / (time.perf_counter() - t)
        del recipe, m, encoder
        gc.collect()
        torch.cuda.empty_cache()
        return out

    probes = {}
    for batch in (cfg.batch_size, 2 * cfg.batch_size):
        say(f"max batch: worst-case step at batch {batch}")
        probes[batch] = run(batch)
    (b1, (p1, _)), (b2, (p2, _)) = sorted(probes.items())
    per_row = (p2 - p1) / (b2 - b1)
    predicted = int((FITS_24GB - (p1 - per_row * b1)) / per_row) // 8 * 8
    if predicted > b2:
        say(f"max batch: checking the predicted {predicted}")
        try:
            probes[predicted] = run(predicted)
        except torch.cuda.OutOfMemoryError:
            probes[predicted] = (math.inf, 0.0)
            gc.collect()
            torch.cuda.empty_cache()
    fitting = [b for b, (peak, _) in probes.items() if peak <= FITS_24GB]
    largest = max(fitting, default=None)
    return {"budget_bytes": FITS_24GB, "bytes_per_row": per_row, "predicted_max_batch": predicted,
            "probes": {b: {"peak_bytes": p, "samples_per_s": s} for b, (p, s) in sorted(probes.items())},
            "largest_fitting_batch": largest,
            "samples_per_s_gain": probes[largest][1] / probes[cfg.batch_size][1] if largest else None}


VARIANTS = {"mlp/top-3": {"ADAPTER": "mlp", "TUNING": "topk", "TOP_K": 3},
            "qformer/top-3": {"ADAPTER": "qformer", "TUNING": "topk", "TOP_K": 3},
            "mlp/LoRA-16": {"ADAPTER": "mlp", "TUNING": "lora", "LORA_RANK": 16}}


def measure_variants(assets, root, args, say, save) -> dict:
    """Trainable parameters, eager step time and step memory of each bridge/tuning variant."""
    out = {}
    for name, overrides in VARIANTS.items():
        say(f"variant {name}: building")
        cfg, encoder, model, split = load_bench(assets, root, args, **overrides)
        device = model.device
        recipe = make_recipe("eager", model, encoder, cfg)
        n = args.warmup + args.steps
        steps = step_batches(model, train_split(split, n * cfg.batch_size * cfg.grad_accum), cfg, n)
        model.train()
        walls = [timed_step(recipe, mb, device)[1] for mb in steps][args.warmup:]
        counts = mtl.parameter_counts(model)
        adapter, lm = counts["adapter"], counts["lm"]
        memory = (cuda_step_bytes(recipe, steps[-1], device) if device.type == "cuda"
                  else run_memory_worker("eager", args, assets, root, overrides)["step_bytes"])
        wall = statistics.median(walls)
        out[name] = {"trainable_adapter": adapter, "trainable_lm": lm, "trainable": adapter + lm,
                     "step_seconds": wall, "samples_per_s": cfg.batch_size / wall, "step_bytes": memory,
                     "checkpoint": measure_checkpoints(recipe, cfg, root)}
        say(f"variant {name}: {adapter + lm:,} trainable, {wall:.3f} s per step, "
            f"{gb(memory)} step memory")
        save(out)
        del cfg, encoder, model, split, recipe, steps
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


E2E_COMPILE = {"eager": "0", "fast": "1", "max": "max"}


def run_e2e(assets, root, args, say, save) -> dict:
    """The script itself, end to end at the real shapes on a Flickr-like image folder: --train (E2E_EPOCHS)
    and --test in each of E2E_MODES (eager: COMPILE=0, fast: COMPILE=1, max: COMPILE=max); the seconds of
    each job and of each epoch's training, the fast path's graph count, the test metrics; logs in OUT/e2e."""
    images = build_images(root / f"e2e-images-{args.e2e_images}", args.e2e_images, seed=1)
    logs = Path(args.out or root) / "e2e"
    out = {}
    for mode in args.e2e_modes.split(","):
        folder = root / f"e2e-{args.e2e_images}x{args.e2e_epochs}" / mode
        shutil.rmtree(folder, ignore_errors=True)
        env = {**os.environ, **bench_env(assets, root, args, DATASET=images, EPOCHS=args.e2e_epochs,
                                         COMPILE=E2E_COMPILE[mode], OUTPUT_DIR_MODELS=folder, VAL_CAPTION_IMAGES=50,
                                         TEST_CAPTION_IMAGES=50, RETRIEVAL_POOL=20, LOG_EVERY=50),
               "HF_HUB_OFFLINE": "1"}
        result = {"compile": E2E_COMPILE[mode], "images": args.e2e_images, "epochs": args.e2e_epochs}
        for job in ("--train", "--test"):
            say(f"e2e {mode}: {job}")
            log_path = logs / f"{mode}{job.replace('--', '_')}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            with open(log_path, "w") as log:
                code = subprocess.run([sys.executable, str(ROOT / "multimodal_transfer_learning.py"), job], env=env,
                                      stdout=log, stderr=subprocess.STDOUT).returncode
            result[f"{job[2:]}_seconds"], result[f"{job[2:]}_exit"] = time.perf_counter() - t, code
        graphs = re.search(r"fast path: (\d+) graphs compiled", (logs / f"{mode}_train.log").read_text())
        result["graphs_after_epoch_1"] = int(graphs.group(1)) if graphs else None
        epochs = sorted(folder.glob("*_clip_top*.pt"), key=lambda p: int(p.name.split("_")[0]))
        result["epoch_train_seconds"] = [torch.load(p, weights_only=True)["metrics"].get("train_seconds")
                                         for p in epochs]
        tests = list(folder.glob("*.test.json"))
        result["test_metrics"] = json.loads(tests[0].read_text())["metrics"] if tests else None
        out[mode] = result
        save(out)
    epoch = {m: r["epoch_train_seconds"] for m, r in out.items()}
    if len(epoch.get("eager", [])) >= 2 and len(epoch.get("fast", [])) >= 2 and None not in epoch["eager"] + epoch["fast"]:
        out["epoch2_speedup"] = epoch["eager"][1] / epoch["fast"][1]
    return out


# ---- memory accounting (the GPU estimate; checked against the CPU measurement) -----------------

def saved_activation_profile(lm_cfg, device: torch.device, autocast_dtype: torch.dtype | None) -> dict:
    """What autograd keeps for the backward pass, measured (not guessed) with saved_tensors_hooks on
    a 2-block Qwen3 of the real widths (tiny vocabulary): bytes per token of a frozen block, per
    token of a trainable block, and the fixed bytes of a trainable block (autocast's bf16 copies of
    its fp32 weights). Parameters are not counted: they exist anyway. The input requires a gradient,
    as the adapter's output does, so frozen blocks keep what their input gradient needs."""
    from transformers import Qwen3ForCausalLM
    d = {**lm_cfg.to_dict(), "num_hidden_layers": 2, "vocab_size": 256}
    d.pop("layer_types", None)
    small = type(lm_cfg)(**d)
    small._attn_implementation = "sdpa"
    weights = autocast_dtype or torch.float32

    def saved(top_k: int, batch: int, seq: int = 48) -> int:
        torch.manual_seed(0)
        lm = Qwen3ForCausalLM(small).to(device, weights).requires_grad_(False)
        for block in lm.model.layers[2 - top_k:] if top_k else []:
            block.float().requires_grad_(True)
        params = {p.untyped_storage().data_ptr() for p in lm.parameters()}
        x = torch.randn(batch, seq, small.hidden_size, device=device, requires_grad=True)
        mask = torch.ones(batch, seq, dtype=torch.long, device=device)
        mask[0, seq // 2:] = 0  # a padded row, as in every real batch
        storages = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                storages[st.data_ptr()] = st.nbytes()
            return t

        ctx = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
            lm.model(inputs_embeds=x.to(weights if not top_k else torch.float32), attention_mask=mask)
        return sum(storages.values())

    seq, b1, b2 = 48, 2, 4
    f1, f2, t1, t2 = saved(0, b1), saved(0, b2), saved(2, b1), saved(2, b2)
    frozen_tok = (f2 - f1) / (2 * (b2 - b1) * seq)
    trainable_tok = (t2 - t1) / (2 * (b2 - b1) * seq)
    trainable_fixed = max(0.0, (t1 - f1) / 2 - (trainable_tok - frozen_tok) * b1 * seq)
    return {"frozen_bytes_per_token": frozen_tok, "trainable_bytes_per_token": trainable_tok,
            "trainable_fixed_bytes": trainable_fixed, "dtype": str(weights).replace("torch.", "")}


def step_memory(profile: dict, layers: int, top_k: int, tokens: int, supervised: int, vocab: int,
                trainable_params: int) -> dict:
    """Growth of memory during one of OUR steps. At the start of the backward pass every saved
    activation is alive, and the supervised-position logits take ~12 bytes per element (fp32 log-
    softmax output, its incoming gradient and the gradient of the logits); the fp32 gradients of the
    trainable weights are allocated a little later, once the logits' buffers are gone."""
    per_token = (layers - top_k) * profile["frozen_bytes_per_token"] + top_k * profile["trainable_bytes_per_token"]
    acts = tokens * per_token + top_k * profile["trainable_fixed_bytes"]
    logits = 12 * supervised * vocab
    grads = 4 * trainable_params
    return {"activations": acts, "logits": logits, "gradients": grads, "step": acts + max(logits, grads)}


def gpu_estimate(profile: dict, shape: dict, top_k: int, batch: int, trainable: int, frozen: int,
                 encoder_params: int, mean_caption_len: float, padded_caption_len: float, max_caption_len: int,
                 peak: float, utilisation: float, pairs: int) -> dict:
    """RTX 4090 ESTIMATE (24 GB, ~165 TFLOP/s dense bf16): bf16 frozen weights, fp32 trainable ones."""
    prefix = shape["visual_tokens"] + shape["prompt_tokens"]
    fixed = 2 * frozen + 2 * encoder_params + 4 * trainable + 8 * trainable   # weights + AdamW m, v
    context = 0.8e9                                                               # CUDA context, cuBLAS workspace
    out = {"fixed_bytes": fixed}
    for name, padded, supervised in (("expected", padded_caption_len, mean_caption_len),
                                     ("worst", max_caption_len, max_caption_len)):
        m = step_memory(profile, shape["layers"], top_k, round(batch * (prefix + padded)), round(batch * supervised),
                        shape["vocab"], trainable)
        out[f"memory_{name}"] = m
        out[f"memory_{name}_bytes"] = fixed + 1.1 * m["step"] + context             # +10% allocator slack
    flops = pairs * useful_flops(shape, mean_caption_len, top_k)
    out.update(epoch_pairs=pairs, epoch_useful_flops=flops, step_useful_flops=batch * flops / pairs,
               peak_flops=peak, utilisation=utilisation, epoch_seconds=flops / (peak * utilisation),
               fits_24gb=out["memory_worst_bytes"] < 24e9)
    return out


def config_shapes(top_k: int):
    """--estimate: the shapes and parameter counts from the configs alone (meta tensors, no weights)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen3Config, Qwen3ForCausalLM
    lm_cfg = Qwen3Config(**QWEN3_0_6B)
    with torch.device("meta"):
        lm = Qwen3ForCausalLM(lm_cfg)
        enc = CLIPVisionModel(CLIPVisionConfig(**CLIP_B32_VISION))
        cfg = mtl.Config()
        adapter = sum(p.numel() for p in mtl.MLPAdapter(CLIP_PROJECTION, cfg.adapter_hidden, cfg.num_visual_tokens,
                                                      lm_cfg.hidden_size).parameters())
    block = sum(p.numel() for p in lm.model.layers[0].parameters())
    prompt = tools.word_tokenizer(WORDS + PROMPT_WORDS + ["."], QWEN3_0_6B["vocab_size"])(cfg.prompt, add_special_tokens=False)["input_ids"]
    shape = {"layers": lm_cfg.num_hidden_layers, "params_per_block": block, "hidden": lm_cfg.hidden_size,
             "vocab": lm_cfg.vocab_size, "adapter_params": adapter, "visual_tokens": cfg.num_visual_tokens,
             "prompt_tokens": len(prompt)}
    trainable = adapter + top_k * block
    frozen = sum(p.numel() for p in lm.parameters()) - top_k * block
    encoder = sum(p.numel() for p in enc.parameters()) + enc.config.hidden_size * CLIP_PROJECTION
    return lm_cfg, shape, trainable, frozen, encoder


def print_estimate(args, device, lm_cfg, shape, trainable, frozen, encoder_params, check=None) -> dict:
    """ESTIMATE, not a measurement: batch 64, TOP_K, RTX 4090 (24 GB, ~165 TFLOP/s dense bf16)."""
    batch, gpu_peak = 64, 165e12
    rnd = random.Random(1)
    lens = [flickr_caption_words(rnd) + 2 for _ in range(batch * 500)]  # words + "." + EOS
    mean_len = sum(lens) / len(lens)
    padded = sum(max(lens[i: i + batch]) for i in range(0, len(lens), batch)) / (len(lens) // batch)
    max_len = mtl.Config().max_caption_tokens + 1
    pairs = round(0.8 * FLICKR30K_IMAGES) * FLICKR_CAPTIONS_PER_IMAGE
    profile = saved_activation_profile(lm_cfg, device if device.type == "cuda" else torch.device("cpu"), torch.bfloat16)
    est = gpu_estimate(profile, shape, args.top_k, batch, trainable, frozen, encoder_params, mean_len, padded, max_len,
                       gpu_peak, args.utilisation, pairs)
    est["profile"] = profile
    e, w = est["memory_expected"], est["memory_worst"]
    minutes = est["epoch_seconds"] / 60
    print(f"\nestimate (NOT a measurement): RTX 4090 (24 GB, ~165 TFLOP/s dense bf16), batch {batch}, "
          f"TOP_K={args.top_k}, bf16 frozen weights, fp32 trainable weights, gradients and AdamW state")
    print(f"estimate: Flickr-like captions: {mean_len:.1f} supervised tokens on average; a batch of {batch} is "
          f"padded to {padded:.1f} caption tokens on average, {max_len} at worst")
    print(f"estimate: saved activations (bf16 autocast, measured on a 2-block model of the real widths): "
          f"{profile['frozen_bytes_per_token'] / 1e3:.0f} KB per token per frozen block, "
          f"{profile['trainable_bytes_per_token'] / 1e3:.0f} KB per trainable block "
          f"+ {profile['trainable_fixed_bytes'] / 1e6:.0f} MB of bf16 weight copies")
    print(f"estimate: memory = {gb(est['fixed_bytes'])} weights + AdamW state, + step {gb(e['step'])} "
          f"(activations {gb(e['activations'])}, logits {gb(e['logits'])}) -> {gb(est['memory_expected_bytes'])} "
          f"typical; {gb(est['memory_worst_bytes'])} if every caption is {max_len} tokens "
          f"(activations {gb(w['activations'])}, logits {gb(w['logits'])}) -> "
          f"{'fits' if est['fits_24gb'] else 'does NOT fit'} in 24 GB")
    print(f"estimate: {est['step_useful_flops'] / 1e12:.2f} useful TFLOP per step of {batch}; one epoch = {pairs:,} "
          f"pairs ({pairs // FLICKR_CAPTIONS_PER_IMAGE:,} train images x 5) = {est['epoch_useful_flops'] / 1e15:.2f} "
          f"PFLOP -> {minutes:.1f} min at an assumed {args.utilisation:.0%} useful-FLOP utilisation "
          f"({minutes * args.utilisation / 0.25:.1f} min at 25%, {minutes * args.utilisation / 0.5:.1f} min at 50%)")
    print("estimate: plus, once, the feature extraction of 31,783 images (CLIP B/32 forward ~4.4 GFLOP/image, "
          "bound by JPEG decoding in NUM_WORKERS processes); every later epoch and run reads the cache")
    if check is not None:
        m = check["memory"]
        print(f"estimate check: the same accounting ({m['profile']['dtype']} profile) predicts "
              f"{gb(m['eager_predicted_step_bytes'])} for the eager step measured above: {gb(m['eager']['step_bytes'])}")
    return est


# ---- the run ----------------------------------------------------------------------------------------

def gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as fh:
        model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "cpu")
    return f"{model}, {os.cpu_count()} logical CPUs"


def recipe_names(args, device) -> list[str]:
    """--liger: eager and fast on a LIGER=1 model, alone: Liger patches Qwen3's RoPE for the whole process,
    so the other recipes' graphs would recompile and eager ones would run Liger's kernels unawares."""
    cuda = device.type == "cuda"
    if args.liger:
        return ["eager+liger", "fast+liger"]
    return ["plain", "eager"] + (["fast"] if cuda or args.fast else []) + (["fast+graphs"] if cuda else [])


def build_recipes(names, model, encoder, cfg, assets, root, args, say) -> list[Recipe]:
    recipes = []
    for name in names:
        m = model
        if name.startswith("fast+graphs"):
            say(f"{name}: building a model of its own")
            m = load_bench(assets, root, args)[2]
        if name.startswith("fast"):
            say(f"{name}: compiling every training and evaluation shape")
        recipe = make_recipe(name, m, encoder, cfg)
        if recipe is None:
            say(f"{name}: compiling failed, the recipe is left out (see the warning above)")
        else:
            recipes.append(recipe)
            if recipe.graphs:
                say(f"{name}: {recipe.graphs} graphs in {recipe.warmup_seconds:.1f} s")
    return recipes


def run_benchmark(args, root: Path, say, R: dict, save) -> dict:
    """The training recipes, generation, latency, features, memory and checkpoints, into R section by section
    (`save` writes R as it stands after each)."""
    say(f"building real-shape random models and {args.images} JPEGs in {root}")
    t = time.perf_counter()
    assets = build_assets(root, args.images, seed=0, tiny=args.tiny)
    build_s = time.perf_counter() - t
    cfg, encoder, model, split = load_bench(assets, root, args, **({"LIGER": 1} if args.liger else {}))
    device, dtype = model.device, model.dtype
    shape = lm_shape(model)
    counts = mtl.parameter_counts(model)
    trainable = counts["adapter"] + counts["lm"]
    total_params = trainable + counts["frozen"]
    encoder_params = sum(p.numel() for p in encoder.parameters())
    R |= {"device": str(device), "device_name": device_name(device), "dtype": str(dtype).replace("torch.", ""),
         "threads": torch.get_num_threads(), "torch": torch.__version__, "cuda": torch.version.cuda,
         "transformers": transformers.__version__, "python": sys.version.split()[0], "batch_size": cfg.batch_size,
         "top_k": cfg.top_k, "timed_steps": args.steps, "warmup_steps": args.warmup, "shape": shape,
         "parameters": {"lm_and_adapter": total_params, "trainable": trainable, "encoder": encoder_params},
         "build_seconds": build_s, "command": " ".join(sys.argv),
         "shapes": "toy shapes (--tiny: the figures mean nothing)" if args.tiny else "Qwen3-0.6B + CLIP ViT-B/32 shapes"}
    say(f"device {device} ({R['device_name']}), {dtype}, {torch.get_num_threads()} threads; "
        f"{total_params / 1e6:.0f}M LM+adapter parameters, {trainable / 1e6:.1f}M trainable")
    save(R)
    if not args.liger:
        R["features"] = measure_features(cfg, encoder, device, say)
        save(R)
        R["generation"] = measure_generation(model, cfg, split, args, device, say)
        save(R)
        R["latency"] = measure_latency(model, encoder, cfg, assets["images"], device, say, 3 if device.type == "cuda" else 1)
        save(R)

    names = recipe_names(args, device)
    say(f"training: {', '.join(names)} alternating, {args.warmup} warm-up + {args.steps} timed steps of {cfg.batch_size}")
    recipes = build_recipes(names, model, encoder, cfg, assets, root, args, say)
    R["compiled"] = {r.name: {"warmup_seconds": r.warmup_seconds, "graphs": r.graphs} for r in recipes if r.fast}
    n = max(2, args.warmup + args.steps)
    train = train_split(split, n * cfg.batch_size * cfg.grad_accum)
    records, store, _ = mtl.load_records(cfg)
    model.train()
    steps = {False: step_batches(model, train, cfg, n),
             True: step_batches(model, pixel_split(train, encoder, store, {r.image_id: r for r in records}), cfg, n)}
    R["equality"] = measure_equality(recipes, [steps[False][0][0], steps[False][1][0]])
    save(R)
    R["train"] = measure_training(recipes, steps, shape, cfg, args, device, say)
    save(R)
    R["memory"] = measure_memory(recipes, steps, args, assets, root, device, say)
    save(R)
    R["checkpoints"] = measure_checkpoints(next(r for r in recipes if r.name.startswith("eager")), cfg, root)

    lm_cfg = model.lm.config
    say("memory accounting: saved-activation profile of a frozen and a trainable block")
    R["memory"]["profile"] = saved_activation_profile(lm_cfg, device, None if dtype == torch.float32 else dtype)
    if device.type == "cpu" and "eager" in R["memory"]:
        m = R["memory"]["eager"]
        prefix = shape["visual_tokens"] + shape["prompt_tokens"]
        predicted = step_memory(R["memory"]["profile"], shape["layers"], cfg.top_k,
                                m["batch"] * (prefix + m["padded_caption_len"]), m["caption_tokens"], shape["vocab"],
                                trainable)
        R["memory"]["eager_predicted"], R["memory"]["eager_predicted_step_bytes"] = predicted, predicted["step"]
    del recipes, steps, model, encoder, split
    gc.collect()
    compare(R)
    print_table(R)
    if device.type == "cpu" and not args.tiny:
        R["estimate"] = print_estimate(args, device, lm_cfg, shape, trainable, total_params - trainable,
                                       encoder_params, check=R)
    return R


def compare(R: dict) -> None:
    """Ratios between recipes and the targets they are held to (CPU and GPU targets differ; a --liger run
    is held only to its equality with eager)."""
    rec, mem = R["train"]["recipes"], R["memory"]
    rate = {k: v["samples_per_s"] for k, v in rec.items()}
    eager = next(k for k in rec if k.startswith("eager"))
    fast, graphs = next((k for k in rec if k.startswith("fast") and "graphs" not in k), None), rec.get("fast+graphs")
    R["useful_flops_share_of_peak"] = rec[eager]["useful_flops_share_of_peak"]
    R["targets"] = {f"{n} equals eager (loss within 2%, gradients 5%)": e["equal"] for n, e in R["equality"].items()}
    if fast:
        R["fast_speedup_vs_eager"] = rate[fast] / rate[eager]
    if graphs and fast:
        R["graphs_speedup_vs_fast"] = rate["fast+graphs"] / rate[fast]
    if "plain" not in rec:
        return
    R["train_speedup_vs_plain"] = rate["eager"] / rate["plain"]
    R["generation_speedup_vs_loop"] = R["generation"]["batched_captions_per_s"] / R["generation"]["loop_captions_per_s"]
    R["cached_epoch_speedup"] = R["features"]["encode_seconds"] / R["features"]["cached_seconds"]
    R["peak_memory_ratio_vs_plain"] = mem["eager"]["step_bytes"] / mem["plain"]["step_bytes"]
    R["total_memory_ratio_vs_plain"] = mem["eager"]["total_bytes"] / mem["plain"]["total_bytes"]
    if not R["device"].startswith("cuda"):
        R["targets"] |= {"train_speedup_vs_plain >= 1.4": R["train_speedup_vs_plain"] >= 1.4,
                         "peak_memory_ratio_vs_plain <= 0.7": R["peak_memory_ratio_vs_plain"] <= 0.7,
                         "useful_flops_share_of_peak >= 0.5": R["useful_flops_share_of_peak"] >= 0.5,
                         "generation_speedup_vs_loop >= 5": R["generation_speedup_vs_loop"] >= 5,
                         "cached_epoch_speedup >= 3": R["cached_epoch_speedup"] >= 3}
        return
    f = rec.get(fast, {})
    R["targets"] |= {"fast path samples/s >= 4x eager": R.get("fast_speedup_vs_eager", 0) >= 4,
                     "fast path useful-FLOP share >= 20%": f.get("useful_flops_share_of_peak", 0) >= 0.2,
                     "fast path <= 800 kernel launches per step": f.get("launches", math.inf) <= 800,
                     "CUDA graphs (COMPILE=max) <= 300 kernel launches per step": (graphs or {}).get("launches",
                                                                                                   math.inf) <= 300,
                     "fast path: every shape compiled in <= 60 s": f.get("compile_warmup_seconds", math.inf) <= 60}
    if "H200" in R["device_name"]:
        R["targets"]["fast path >= 2,000 samples/s on an H200"] = max(rate.get(fast, 0), rate.get("fast+graphs", 0)) >= 2000


def print_table(R: dict) -> None:
    tr, mem, rec = R["train"], R["memory"], R["train"]["recipes"]
    names = list(rec)
    print(f"\n### bench_train.py — {R['device_name']} ({R['device']}, {R['dtype']}, {R['threads']} threads), "
          f"{R['shapes']}, batch {R['batch_size']}, TOP_K={R['top_k']}\n")
    print("| training step | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    rows = [("samples/s", lambda r: f"{r['samples_per_s']:.2f}"),
            ("useful tokens/s (caption+EOS)", lambda r: f"{r['useful_tokens_per_s']:.1f}"),
            (f"useful FLOP share of the {tr['matmul_peak_kind']} peak ({tr['matmul_peak_flops'] / 1e12:.2f} TFLOP/s)",
             lambda r: f"{r['useful_flops_share_of_peak']:.1%}"),
            ("launches per step" if R["device"].startswith("cuda") else "operators dispatched per step",
             lambda r: f"{r['launches']:,}"),
            ("CPU enqueue / wall time per step", lambda r: f"{r['cpu_enqueue_seconds'] * 1e3:.1f} / "
                                                            f"{r['wall_seconds'] * 1e3:.1f} ms"),
            ("compile warm-up of every shape (graphs)",
             lambda r: f"{r['compile_warmup_seconds']:.0f} s ({r['graphs_compiled']})" if r["graphs_compiled"] else "-")]
    for label, cell in rows:
        print(f"| {label} | " + " | ".join(cell(rec[n]) for n in names) + " |")
    print("| step memory (peak growth) | " + " | ".join(gb(mem[n]["step_bytes"]) if n in mem else "-" for n in names) + " |")
    print("| total memory (weights + AdamW + step) | " +
          " | ".join(gb(mem[n]["total_bytes"]) if n in mem else "-" for n in names) + " |")
    print()
    if "train_speedup_vs_plain" in R:
        print(f"eager vs plain: {R['train_speedup_vs_plain']:.2f}x samples/s, {R['peak_memory_ratio_vs_plain']:.2f}x "
              f"step memory, {R['total_memory_ratio_vs_plain']:.2f}x total memory")
    for key, what in (("fast_speedup_vs_eager", "fast path vs eager"), ("graphs_speedup_vs_fast", "CUDA graphs vs fast path")):
        if key in R:
            print(f"{what}: {R[key]:.2f}x samples/s")
    for name, e in R["equality"].items():
        print(f"{name} vs eager over {e['micro_batches']} accumulated micro-batches: loss {e['loss_rel_diff']:.2e}, "
              f"gradients {e['grad_rel_diff']:.2e} relative difference")
    if "generation" in R:
        g, f = R["generation"], R["features"]
        print(f"captions/s: {g['batched_captions_per_s']:.2f} batched ({g['eval_batch_size']}) vs "
              f"{g['loop_captions_per_s']:.3f} one at a time ({R['generation_speedup_vs_loop']:.1f}x); feature epoch: "
              f"{f['cached_images_per_s']:.0f} images/s cached vs {f['encode_images_per_s']:.1f} encoding "
              f"({R['cached_epoch_speedup']:.0f}x)")
        print("--caption latency (JPEG -> caption of 20 tokens, greedy): " + ", ".join(
            f"{x['ms_per_image']:.0f} ms per image at batch {x['batch']}" for x in R["latency"].values()))
    print(f"{tr['useful_flops_per_step'] / 1e9:.0f} useful GFLOP per step, {tr['mean_caption_tokens']:.1f} supervised "
          f"tokens per caption, {tr['useful_position_share']:.0%} of the positions the eager step computes are "
          f"useful (plain: {tr['plain_useful_position_share']:.0%})")
    c = R["checkpoints"]
    print(f"checkpoint of {c['trainable_parameters']:,} trainable parameters: newest of a run (weights + AdamW + RNG) "
          f"{gb(c['newest_bytes'])}, older epochs (weights only) {gb(c['older_bytes'])}")
    busy = [o for r in rec.values() for o in r["others_cpu_share"] if o is not None]
    if R["device"] == "cpu" and busy:
        R["others_cpu_share_max"] = max(busy)
        print(f"other processes used up to {max(busy):.0%} of the CPUs during a timed step")
        if max(busy) > 0.1:
            print("WARNING: the machine was shared while timing; on CPU that slows these timings a lot (OpenMP "
                  "threads spin while a neighbour runs): re-run on a quiet machine for figures to quote")
    print("targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in R["targets"].items()))


def print_max_batch(mb: dict, batch_size: int) -> None:
    probes = ", ".join(f"{b}: {gb(p['peak_bytes'])}, {p['samples_per_s']:.0f} samples/s" for b, p in mb["probes"].items())
    print(f"max batch (fast path, worst-case 49-token captions, 24 GiB card): {mb['largest_fitting_batch']} "
          f"(probes {probes}); samples/s gain over batch {batch_size}: {mb['samples_per_s_gain']:.2f}x"
          if mb["samples_per_s_gain"] else "max batch: none fits")


def print_variants(V: dict) -> None:
    print("\n| variant | trainable parameters (adapter + LM) | step time | samples/s | step memory "
          "| checkpoint newest / older |")
    print("|---|---|---|---|---|---|")
    for name, v in V.items():
        c = v["checkpoint"]
        print(f"| {name} | {v['trainable']:,} ({v['trainable_adapter']:,} + {v['trainable_lm']:,}) | "
              f"{v['step_seconds']:.3f} s | {v['samples_per_s']:.2f} | {gb(v['step_bytes'])} "
              f"| {c['newest_bytes'] / 1e6:,.0f} MB / {c['older_bytes'] / 1e6:,.0f} MB |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON here, each section as soon as it is measured")
    p.add_argument("--out", metavar="DIR", help="--e2e: write the runs' logs here (default: the work folder)")
    p.add_argument("--batch-size", type=int, default=8, help="training batch size of every recipe (default 8)")
    p.add_argument("--steps", type=int, default=4, help="timed training steps per recipe (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps per recipe (default 1)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--top-k", type=int, default=3, help="unfrozen top blocks (default 3)")
    p.add_argument("--eval-batch-size", type=int, default=64, help="batched generation's batch (default 64)")
    p.add_argument("--gen-images", type=int, default=64, help="captions generated in batches (default 64)")
    p.add_argument("--loop-images", type=int, default=4, help="captions generated one at a time (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="generation length; 0 = the script's default")
    p.add_argument("--images", type=int, default=64, help="JPEGs in the encoding epoch (default 64)")
    p.add_argument("--num-workers", type=int, default=2, help="NUM_WORKERS of the encoding epoch (default 2)")
    p.add_argument("--fast", action="store_true", help="on CPU too: time the compiled fast path (slow to compile)")
    p.add_argument("--liger", action="store_true", help="CUDA: only eager and fast with LIGER=1 (Liger patches Qwen3 "
                                                         "for the whole process, so it runs alone)")
    p.add_argument("--max-batch", action="store_true", help="only the largest batch a 24 GiB card holds (CUDA, fast path)")
    p.add_argument("--variants", action="store_true", help="only the cost of mlp/top-3, qformer/top-3, mlp/LoRA-16")
    p.add_argument("--e2e", action="store_true", help="only the end-to-end --train/--test of the script")
    p.add_argument("--e2e-images", type=int, default=1000, help="--e2e: images in the generated folder (default 1000)")
    p.add_argument("--e2e-epochs", type=int, default=2, help="--e2e: EPOCHS of each --train (default 2)")
    p.add_argument("--e2e-modes", default="eager,fast", help="--e2e: eager (COMPILE=0), fast (COMPILE=1) and/or max "
                                                            "(COMPILE=max), comma-separated (default eager,fast)")
    p.add_argument("--compile-strategies", nargs="?", const="whole-stack,regional", metavar="LIST",
                   help=f"only the compile warm-up of each strategy ({', '.join(COMPILE_STRATEGIES)}), each in a fresh "
                        "process with empty caches (default whole-stack,regional)")
    p.add_argument("--workdir", help="keep models and images here (default: a temporary folder, deleted)")
    p.add_argument("--estimate", action="store_true", help="print only the analytic GPU estimate")
    p.add_argument("--utilisation", type=float, default=0.35,
                   help="GPU estimate: assumed useful FLOP/s as a share of the bf16 peak (default 0.35)")
    p.add_argument("--check", action="store_true", help=f"exit {TARGET_MISSED} if a target is missed")
    p.add_argument("--tiny", action="store_true", help="toy widths, and torch.compile with the light aot_eager backend "
                                                        "(dynamo makes the same graphs, no kernels are generated): "
                                                        "checks the benchmark itself quickly, its figures mean nothing")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_compile", help=argparse.SUPPRESS)
    p.add_argument("--_assets", help=argparse.SUPPRESS)
    p.add_argument("--_overrides", help=argparse.SUPPRESS)
    return p.parse_args(argv)


TARGET_MISSED = 3  # --check's exit code when it ran to the end and a target was missed (1: it failed)


def json_writer(path: str | None):
    """save(result): write the result as it stands, replacing the file at once (a run stopped by a time limit
    leaves every section it finished)."""
    def save(result: dict) -> None:
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(f"{path}.tmp")
            tmp.write_text(json.dumps(result, indent=2, default=str))
            tmp.replace(path)
    return save


def run_mode(args, root: Path, say, result: dict, save) -> None:
    """The measurement the flags ask for, into `result`."""
    if args.variants or args.e2e or args.compile_strategies or args.max_batch:
        assets = build_assets(root, args.images, seed=0, tiny=args.tiny)
    if args.compile_strategies:
        result["compile"] = measure_compile(assets, root, args, say, lambda part: save(result | {"compile": part}))
        print(json.dumps(result["compile"], indent=2))
    elif args.max_batch:
        result["max_batch"] = measure_max_batch(assets, root, args, say)
        print_max_batch(result["max_batch"], args.batch_size)
    elif args.variants or args.e2e:
        if args.variants:
            result["variants"] = measure_variants(assets, root, args, say, lambda part: save(result | {"variants": part}))
            print_variants(result["variants"])
        if args.e2e:
            result["e2e"] = run_e2e(assets, root, args, say, lambda part: save(result | {"e2e": part}))
            print(json.dumps(result["e2e"], indent=2))
    else:
        run_benchmark(args, root, say, result, save)


def main(argv=None) -> int:
    args = parse_args(argv)
    mtl.setup_logging("WARNING")
    if args.tiny:  # see --tiny; on CPU inductor's C++ compiles would dwarf the rest of a toy run
        torch.compile = functools.partial(torch.compile, backend="aot_eager")
    if args._worker or args._compile:
        print(json.dumps(memory_worker(args) if args._worker else compile_worker(args)))
        return 0
    if args.estimate:
        device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
        print_estimate(args, device, *config_shapes(args.top_k))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the temporary folder is still removed
    say = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    wall0 = time.perf_counter()
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_train_"))
    root.mkdir(parents=True, exist_ok=True)
    result, save = {"command": " ".join(sys.argv)}, json_writer(args.json)
    try:
        run_mode(args, root, say, result, save)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    result["wall_seconds"] = time.perf_counter() - wall0
    print(f"\nwall time of the benchmark: {result['wall_seconds']:.0f} s")
    save(result)
    if args.json:
        print(f"wrote {args.json}")
    missed = [k for k, ok in result.get("targets", {}).items() if not ok]
    return TARGET_MISSED if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
