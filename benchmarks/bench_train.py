#!/usr/bin/env python3
"""Speed and memory benchmark of multimodal_transfer_learning.py at the REAL model shapes.

    python benchmarks/bench_train.py [--json PATH] [--batch-size 8] [--steps N] [--device auto]
    python benchmarks/bench_train.py --estimate          # only the (analytic) GPU estimate, no measurement

Offline and download-free: it builds Qwen3-0.6B-Base (vocab 151,936, hidden 1024, MLP 3072,
28 layers, 16 query / 8 KV heads of 128, tied embeddings, rope_theta 1e6) and CLIP ViT-B/32's
vision tower (hidden 768, 12 layers, 12 heads, MLP 3072, 224 px, patch 32, projection 512) from
their configs with random weights, saves them with a small word-level tokenizer and the CLIP image
processor, and loads them through the script's own code path (`mtl.load_config` + `mtl.build_model`),
so what is measured is what users run. Random weights cost exactly as much compute as trained ones.

What is compared, at equal batch size, in one run:

* training step. OURS = `mtl.train_epoch` itself on cached features (-> `Captioner.loss` ->
  backward -> gradient clipping -> AdamW, TOP_K=3), called on a one-batch split per step. PLAIN =
  what one writes first: the frozen encoder runs every step on pixel tensors (already decoded and
  preprocessed, which flatters PLAIN), captions padded to a fixed MAX_CAPTION_TOKENS+1, and
  `lm(inputs_embeds, attention_mask, labels)` computing logits over batch x sequence x vocabulary,
  then the same clipping and AdamW. Same model object, same pairs in the same order, one optimizer
  each. The two alternate step by step (so a neighbour's burst on a shared machine hits both), the
  warm-up steps are not timed, and rates are taken from the median timed step. On CPU the run
  also records how much CPU time OTHER processes used meanwhile (/proc/stat minus this process)
  and warns when it exceeds 10% of the machine: spin-waiting OpenMP threads crawl as soon as
  anything else runs, so such timings say little.
* peak memory of one training step, after a warm-up step (3 with --compile) so the AdamW state
  exists: each variant runs in a fresh subprocess. On CUDA: allocator peak minus what was allocated
  before the step. On CPU: the kernel's resident-set high-water mark (VmHWM) is reset by writing "5"
  to /proc/self/clear_refs right before the step and read after it; growth = VmHWM - VmRSS at the
  reset. The subprocess runs with MALLOC_MMAP_THRESHOLD_=65536 so glibc hands every freed tensor
  back to the OS at once (otherwise memory freed by the warm-up step is reused silently and the
  growth is under-counted). "step" = that growth (activations, gradients, logits, temporaries);
  "total" = the absolute high-water mark, weights included.
* generation: `mtl.generate_captions` (batched by EVAL_BATCH_SIZE, KV cache) against a loop that
  calls `Captioner.generate` one image at a time, both greedy with the script's decoding defaults.
  With random weights no caption stops early, so both generate MAX_NEW_TOKENS tokens per caption
  (measured before training, which would teach the random LM to stop at once). A trained model
  favours the loop somewhat: each single caption stops at its own EOS (~15 tokens on Flickr)
  while a batch runs until its longest caption ends; the prefill (23 positions) costs both alike.
* feature extraction: an encoding epoch (`mtl.encode_images` over N JPEGs of 500x375, Flickr's usual
  size) against a cached epoch (`mtl.cached_features` called a second time: path + read).

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
counted. Achieved useful FLOP/s = F summed over the timed pairs / time; its share is taken of the
device's matmul peak measured in the same run (best of several fp32 2048x2048 matmul bursts on CPU,
bf16 8192x8192 on CUDA), so a slow or busy machine lowers both.

GPU estimate (printed as "estimate", never as a measurement; `--estimate` prints it alone):
memory = frozen weights in bf16 + trainable weights, their fp32 gradients and AdamW moments
+ saved activations (bytes per token of a frozen and of a trainable block, measured with
saved_tensors_hooks on a 2-block model of the real widths under bf16 autocast) + ~12 bytes per
supervised-position logit + CUDA context; the same accounting in fp32 is printed next to the CPU
step measured in the run, as a check. Epoch time = pairs x F / (165 TFLOP/s x an assumed share).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import multimodal_transfer_learning as mtl  # noqa: E402

# ---- the real shapes --------------------------------------------------------------------------
QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                  rope_theta=1_000_000.0, max_position_embeddings=32768, rms_norm_eps=1e-6)
CLIP_B32_VISION = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       image_size=224, patch_size=32)
CLIP_PROJECTION = 512
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

def build_assets(root: Path, num_images: int, seed: int) -> dict[str, Path]:
    """Real-shape random Qwen3 + CLIP saved like hub checkpoints, and a Flickr-like image folder."""
    from PIL import Image, ImageDraw, ImageFilter
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast, Qwen3Config, \
        Qwen3ForCausalLM
    lm_dir, clip_dir, images = root / "qwen3-0.6b-random", root / "clip-vit-b32-random", root / "images"
    torch.manual_seed(seed)
    if not (lm_dir / "config.json").is_file():
        vocab = {"<|endoftext|>": 0, "<unk>": 1}
        for w in WORDS + PROMPT_WORDS + ["."]:
            vocab.setdefault(w, len(vocab))
        # fill the rest so that every id the LM can emit decodes to one word, as with Qwen's own vocabulary
        vocab.update({f"w{i}": i for i in range(len(vocab), QWEN3_0_6B["vocab_size"])})
        assert max(vocab.values()) < QWEN3_0_6B["vocab_size"]
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Whitespace()  # "image:" -> "image", ":"
        tok.decoder = decoders.WordPiece(prefix="##")
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>")
        fast.save_pretrained(lm_dir)
        cfg = Qwen3Config(**QWEN3_0_6B, eos_token_id=0, bos_token_id=None, pad_token_id=None)
        Qwen3ForCausalLM(cfg).save_pretrained(lm_dir)
    if not (clip_dir / "config.json").is_file():
        # The script keeps only the vision tower and the projection; a tiny text tower saves disk and time.
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                    vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        CLIPModel(CLIPConfig(text_config=text, vision_config=CLIP_B32_VISION,
                             projection_dim=CLIP_PROJECTION)).save_pretrained(clip_dir)
        CLIPImageProcessor().save_pretrained(clip_dir)  # the real CLIP preprocessing: 224 crop, CLIP mean/std
    if not (images / "metadata.jsonl").is_file():
        rnd = random.Random(seed)
        (images / "img").mkdir(parents=True, exist_ok=True)
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
            image.save(images / name, quality=90)
            rows.append({"file_name": name, "captions": captions[i * 5: i * 5 + 5]})
        (images / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"lm": lm_dir, "clip": clip_dir, "images": images}


def bench_env(assets: dict, root: Path, args) -> dict[str, str]:
    env = {"LM_MODEL": str(assets["lm"]), "VISION_MODEL": str(assets["clip"]), "VISION_ENCODER": "clip",
           "DATASET": str(assets["images"]), "TOP_K": str(args.top_k), "BATCH_SIZE": str(args.batch_size),
           "EVAL_BATCH_SIZE": str(args.eval_batch_size), "DEVICE": args.device, "DTYPE": "auto", "EPOCHS": "1",
           "CACHE_DIR": str(root / "cache"), "OUTPUT_DIR_MODELS": str(root / "models"), "WANDB_MODE": "disabled",
           "LOG_EVERY": "1000000", "NUM_WORKERS": str(args.num_workers), "COMPILE": "1" if args.compile else "0",
           "SEED": "42"}
    if args.max_new_tokens:
        env["MAX_NEW_TOKENS"] = str(args.max_new_tokens)
    return env


# ---- measurement helpers -----------------------------------------------------------------------

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


class _NoRun:
    """train_epoch logs to a W&B run; the benchmark has none."""

    def log(self, *a, **k):
        pass


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


def pair_batches(split: "mtl.Split", batch_size: int, seed: int):
    """The batches train_epoch will form in epoch 1: [(rows, caption ids)]."""
    order = mtl.epoch_order(len(split.pairs), seed, 1)
    out = []
    for start in range(0, len(order), batch_size):
        chosen = [split.pairs[i] for i in order[start: start + batch_size]]
        out.append(([r for r, _ in chosen], [c for _, c in chosen]))
    return out


def train_split(split: "mtl.Split", num_pairs: int) -> "mtl.Split":
    """The first num_pairs pairs of a split (cycled if the split is smaller)."""
    pairs = [split.pairs[i % len(split.pairs)] for i in range(num_pairs)]
    return mtl.Split(split.ids, split.features, split.references, pairs)


def ours_step(model, cfg, opt, split, rows: list[int], caps: list[list[int]], step: int) -> None:
    """One optimizer step of OUR recipe, run by mtl.train_epoch itself on a one-batch split."""
    one = mtl.Split(split.ids, split.features, split.references, list(zip(rows, caps)))
    # many nominal epochs, or the schedule of a one-step "epoch" would set the learning rate to 0 (same compute)
    run_cfg = dataclasses.replace(cfg, batch_size=len(caps), epochs=1000)
    mtl.train_epoch(model, opt, one, run_cfg, 1, {"step": step}, _NoRun())


def plain_step(model, encoder, opt, params, pixels, caps, max_len: int, grad_clip: float) -> float:
    """The first recipe one writes: encode pixels every step, fixed padding, full-vocabulary logits."""
    with model.autocast():
        embeds, mask, labels = model.build_inputs(encoder(pixels), caps, pad_to=max_len)
        out = model.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    out.loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()


def time_training(model, encoder, cfg, split, batches, pixels, warmup: int, steps: int, device, say):
    """Alternate OUR step and the PLAIN step on the same batches, so that a busy machine slows both
    alike. Returns the timed (post-warm-up) step durations of each and the best matmul peak seen
    between steps (the peak is re-measured throughout for the same reason)."""
    opt_ours, opt_plain = mtl.make_optimizer(model, cfg), mtl.make_optimizer(model, cfg)
    params = [p for g in opt_plain.param_groups for p in g["params"]]
    ours, plain, peak, share = [], [], 0.0, {"ours": [], "plain": []}
    for i, (rows, caps) in enumerate(batches[: warmup + steps]):
        peak = max(peak, matmul_peak(device, bursts=2))
        _, t_ours, o_ours = run_timed(device, lambda: ours_step(model, cfg, opt_ours, split, rows, caps, i))
        model.train()
        max_len = cfg.max_caption_tokens + 1
        _, t_plain, o_plain = run_timed(device, lambda: plain_step(model, encoder, opt_plain, params, pixels[rows],
                                                                   caps, max_len, cfg.grad_clip))
        say(f"  step {i + 1}/{warmup + steps}{' (warm-up)' if i < warmup else ''}: ours {t_ours:.2f} s, "
            f"plain {t_plain:.2f} s; load average {os.getloadavg()[0]:.1f}")
        if i >= warmup:
            ours.append(t_ours)
            plain.append(t_plain)
            share["ours"].append(o_ours)
            share["plain"].append(o_plain)
    del opt_ours, opt_plain
    return ours, plain, peak, share


def proc_status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


# ---- the memory worker (a fresh subprocess per variant) ----------------------------------------

def memory_worker(args) -> dict:
    """Build the model, run a warm-up step, then measure one step's peak. Prints JSON."""
    root = Path(args.workdir)
    cfg = mtl.load_config(bench_env(json.loads(args._assets), root, args))
    device, dtype = mtl.resolve_device(cfg)
    encoder, model = mtl.build_model(cfg, device, dtype)
    records, store, _ = mtl.load_records(cfg)
    feats, _ = mtl.cached_features(cfg, encoder, records, store)
    split = mtl.make_split([r.image_id for r in records], feats, {r.image_id: r for r in records}, model)
    warm = 3 if cfg.compile else 1  # compiled blocks recompile once for dynamic shapes
    batches = pair_batches(train_split(split, (warm + 1) * cfg.batch_size), cfg.batch_size, cfg.seed)
    opt = mtl.make_optimizer(model, cfg)
    params = [p for g in opt.param_groups for p in g["params"]]
    if args._worker == "plain":
        by_id = {r.image_id: r for r in records}
        pixels = torch.stack([encoder.preprocess(store.open(by_id[i].ref)) for i in split.ids])

        def step(rows, caps):
            plain_step(model, encoder, opt, params, pixels[rows], caps, cfg.max_caption_tokens + 1, cfg.grad_clip)
    else:
        def step(rows, caps):
            ours_step(model, cfg, opt, split, rows, caps, 0)
    model.train()
    for b in batches[:warm]:  # warm-up: creates the AdamW state and the one-off buffers
        step(*b)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(*batches[warm])
        torch.cuda.synchronize(device)
        total = torch.cuda.max_memory_allocated(device)
        how = "CUDA allocator: max_memory_allocated - memory_allocated before the step"
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = proc_status()["VmRSS"]
        step(*batches[warm])
        total = proc_status()["VmHWM"]
        how = "CPU: VmHWM after resetting it via /proc/self/clear_refs, minus VmRSS at the reset"
    tokens = sum(len(c) for c in batches[warm][1])
    max_len = cfg.max_caption_tokens + 1 if args._worker == "plain" else max(len(c) for c in batches[warm][1])
    return {"step_bytes": total - base, "total_bytes": total, "before_bytes": base, "method": how,
            "caption_tokens": tokens, "padded_caption_len": max_len, "batch": len(batches[warm][1])}


def run_memory_worker(variant: str, args, assets: dict, root: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", variant, "--_assets",
           json.dumps({k: str(v) for k, v in assets.items()}), "--workdir", str(root),
           "--batch-size", str(args.batch_size), "--eval-batch-size", str(args.eval_batch_size),
           "--device", args.device, "--top-k", str(args.top_k), "--num-workers", str(args.num_workers)]
    if args.compile:
        cmd.append("--compile")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker {variant} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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


# ---- the main run ------------------------------------------------------------------------------

def gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON here")
    p.add_argument("--batch-size", type=int, default=8, help="training batch size of both recipes (default 8)")
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
    p.add_argument("--compile", action="store_true", help="COMPILE=1 (CUDA)")
    p.add_argument("--workdir", help="keep models and images here (default: a temporary folder, deleted)")
    p.add_argument("--estimate", action="store_true", help="print only the analytic GPU estimate")
    p.add_argument("--utilisation", type=float, default=0.35,
                   help="GPU estimate: assumed useful FLOP/s as a share of the bf16 peak (default 0.35)")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_assets", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    mtl.setup_logging("WARNING")
    if args.compile:
        args.warmup = max(args.warmup, 3)  # compiled blocks recompile once for dynamic shapes
    if args._worker:
        print(json.dumps(memory_worker(args)))
        return 0
    if args.estimate:
        device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
        print_estimate(args, device, *config_shapes(args.top_k))
        return 0

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the temporary folder is still removed
    wall0 = time.perf_counter()
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_train_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        result = run_benchmark(args, root)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    result["wall_seconds"] = time.perf_counter() - wall0
    print(f"\nwall time of the benchmark: {result['wall_seconds']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


def run_benchmark(args, root: Path) -> dict:
    say = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    say(f"building real-shape random models and {args.images} JPEGs in {root}")
    t = time.perf_counter()
    assets = build_assets(root, args.images, seed=0)
    build_s = time.perf_counter() - t
    cfg = mtl.load_config(bench_env(assets, root, args))
    device, dtype = mtl.resolve_device(cfg)
    encoder, model = mtl.build_model(cfg, device, dtype)
    shape = lm_shape(model)
    total_params, trainable = mtl.count_parameters(model)
    encoder_params = sum(p.numel() for p in encoder.parameters())
    R = {"device": str(device), "device_name": device_name(device), "dtype": str(dtype).replace("torch.", ""),
         "threads": torch.get_num_threads(), "torch": torch.__version__, "batch_size": cfg.batch_size,
         "top_k": cfg.top_k, "timed_steps": args.steps, "warmup_steps": args.warmup, "shape": shape,
         "parameters": {"lm_and_adapter": total_params, "trainable": trainable, "encoder": encoder_params},
         "build_seconds": build_s}
    say(f"device {device} ({R['device_name']}), {dtype}, {torch.get_num_threads()} threads; "
        f"{total_params / 1e6:.0f}M LM+adapter parameters, {trainable / 1e6:.1f}M trainable")

    peak = matmul_peak(device)

    # -- feature extraction: an encoding epoch vs a cached epoch --
    records, store, _ = mtl.load_records(cfg)
    shutil.rmtree(Path(cfg.cache_dir) / "features", ignore_errors=True)  # a kept --workdir starts uncached too
    say(f"encoding epoch over {len(records)} JPEGs")
    t = time.perf_counter()
    mtl.encode_images(records, store, encoder, cfg)
    sync(device)
    encode_s = time.perf_counter() - t
    t = time.perf_counter()
    mtl.cached_features(cfg, encoder, records, store)  # first call: encode + write the cache
    first_s = time.perf_counter() - t
    t = time.perf_counter()
    feats, _ = mtl.cached_features(cfg, encoder, records, store)  # second call: read
    cached_s = time.perf_counter() - t
    R["features"] = {"images": len(records), "encode_seconds": encode_s, "first_call_seconds": first_s,
                     "cached_seconds": cached_s, "encode_images_per_s": len(records) / encode_s,
                     "cached_images_per_s": len(records) / cached_s}

    split = mtl.make_split([r.image_id for r in records], feats, {r.image_id: r for r in records}, model)
    by_id = {r.image_id: r for r in records}
    pixels = torch.stack([encoder.preprocess(store.open(by_id[i].ref)) for i in split.ids])  # rows of split
    n_pairs = (args.warmup + args.steps) * cfg.batch_size
    batches = pair_batches(train_split(split, n_pairs), cfg.batch_size, cfg.seed)
    timed = batches[args.warmup: args.warmup + args.steps]
    timed_pairs = sum(len(c) for _, c in timed)
    timed_tokens = sum(len(x) for _, c in timed for x in c)
    timed_flops = sum(useful_flops(shape, len(x), cfg.top_k) for _, c in timed for x in c)

    # -- generation: batched vs one image at a time (before training: the random LM never emits EOS, so
    #    every caption runs to MAX_NEW_TOKENS; a few training steps teach it to stop almost at once) --
    decoding = mtl.decoding_kwargs(cfg)
    n_gen, n_loop = min(args.gen_images, len(split.ids)), min(args.loop_images, len(split.ids))
    say(f"generation: {n_gen} captions in batches of {cfg.eval_batch_size}, {n_loop} one at a time")
    model.eval()
    mtl.generate_captions(model, split.features[:1], cfg)  # warm-up
    def one_at_a_time():
        with torch.no_grad():
            return [model.generate(split.features[i: i + 1], decoding) for i in range(n_loop)]

    batched_caps, batched_s, batched_share = run_timed(
        device, lambda: mtl.generate_captions(model, split.features[:n_gen], cfg))
    loop_caps, loop_s, loop_share = run_timed(device, one_at_a_time)
    R["generation"] = {"batched_captions": n_gen, "eval_batch_size": cfg.eval_batch_size, "batched_seconds": batched_s,
                       "batched_captions_per_s": n_gen / batched_s, "loop_captions": n_loop, "loop_seconds": loop_s,
                       "loop_captions_per_s": n_loop / loop_s, "max_new_tokens": cfg.max_new_tokens,
                       "others_cpu_share": {"batched": batched_share, "loop": loop_share},
                       "mean_generated_words_batched": sum(len(c.split()) for c in batched_caps) / max(1, n_gen),
                       "mean_generated_words_loop": sum(len(c[0].split()) for c in loop_caps) / max(1, n_loop)}

    # -- training: ours vs plain, same pairs in the same order, alternating step by step --
    say(f"training: ours and plain alternating, {args.warmup} warm-up + {args.steps} timed steps of {cfg.batch_size}")
    ours, plain, peak2, cpu_share = time_training(model, encoder, cfg, split, batches, pixels, args.warmup, args.steps,
                                                  device, say)
    peak = max(peak, peak2, matmul_peak(device))
    R["matmul_peak_flops"], R["matmul_peak_kind"] = peak, PEAK_LABEL.get(device.type, "matmul")
    R["train"] = {}
    for name, times in (("ours", ours), ("plain", plain)):
        # rates per timed step, then the median step: robust to a neighbour's burst on a shared machine
        per_step = [(len(c), sum(map(len, c)), sum(useful_flops(shape, len(x), cfg.top_k) for x in c), dt)
                    for (_, c), dt in zip(timed, times)]
        med = lambda k: statistics.median(x[k] / x[3] for x in per_step)  # noqa: E731
        R["train"][name] = {"step_seconds": times, "samples_per_s": med(0), "useful_tokens_per_s": med(1),
                            "useful_flops_per_s": med(2), "useful_flops_share_of_peak": med(2) / peak,
                            "mean_samples_per_s": timed_pairs / sum(times), "others_cpu_share": cpu_share[name]}
    R["train"]["useful_flops_per_step"] = timed_flops / len(timed)
    R["train"]["mean_caption_tokens"] = timed_tokens / timed_pairs
    prefix = shape["visual_tokens"] + shape["prompt_tokens"]
    # positions the decoder computes (dynamic padding) vs those that matter (T of the docstring)
    computed = sum(len(c) * (prefix + max(map(len, c))) for _, c in timed)
    R["train"]["useful_position_share"] = sum(prefix + len(x) - 1 for _, c in timed for x in c) / computed
    R["train"]["plain_useful_position_share"] = sum(prefix + len(x) - 1 for _, c in timed for x in c) / (
        timed_pairs * (prefix + cfg.max_caption_tokens + 1))

    # -- memory: fresh subprocesses, after this process lets go of its copy of the model --
    lm_cfg = model.lm.config
    frozen_params = total_params - trainable
    del model, encoder, split, feats, pixels
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    R["memory"] = {}
    for variant in ("ours", "plain"):
        say(f"memory: one {variant} step in a fresh subprocess")
        R["memory"][variant] = run_memory_worker(variant, args, assets, root)
    m_ours, m_plain = R["memory"]["ours"], R["memory"]["plain"]
    # the memory accounting of the GPU estimate, applied to the step just measured, as a check
    say("memory accounting: saved-activation profile of a frozen and a trainable block")
    profile = saved_activation_profile(lm_cfg, device, None if dtype == torch.float32 else dtype)
    prefix = shape["visual_tokens"] + shape["prompt_tokens"]
    predicted = step_memory(profile, shape["layers"], cfg.top_k,
                            m_ours["batch"] * (prefix + m_ours["padded_caption_len"]), m_ours["caption_tokens"],
                            shape["vocab"], trainable)
    R["memory"]["profile"], R["memory"]["ours_predicted"] = profile, predicted
    R["memory"]["ours_predicted_step_bytes"] = predicted["step"]

    g, tr = R["generation"], R["train"]
    R["train_speedup_vs_plain"] = tr["ours"]["samples_per_s"] / tr["plain"]["samples_per_s"]
    R["peak_memory_ratio_vs_plain"] = m_ours["step_bytes"] / m_plain["step_bytes"]
    R["total_memory_ratio_vs_plain"] = m_ours["total_bytes"] / m_plain["total_bytes"]
    R["useful_flops_share_of_peak"] = tr["ours"]["useful_flops_share_of_peak"]
    R["generation_speedup_vs_loop"] = g["batched_captions_per_s"] / g["loop_captions_per_s"]
    R["cached_epoch_speedup"] = R["features"]["encode_seconds"] / R["features"]["cached_seconds"]
    R["targets"] = {"train_speedup_vs_plain >= 1.4": R["train_speedup_vs_plain"] >= 1.4,
                    "peak_memory_ratio_vs_plain <= 0.7": R["peak_memory_ratio_vs_plain"] <= 0.7,
                    "useful_flops_share_of_peak >= 0.5": R["useful_flops_share_of_peak"] >= 0.5,
                    "generation_speedup_vs_loop >= 5": R["generation_speedup_vs_loop"] >= 5,
                    "cached_epoch_speedup >= 3": R["cached_epoch_speedup"] >= 3}
    print_table(R)
    R["estimate"] = print_estimate(args, device, lm_cfg, shape, trainable, frozen_params, encoder_params, check=R)
    return R


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as fh:
        model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "cpu")
    return f"{model}, {os.cpu_count()} logical CPUs"


def print_table(R: dict) -> None:
    tr, m, g, f = R["train"], R["memory"], R["generation"], R["features"]
    o, p = tr["ours"], tr["plain"]
    print(f"\n### bench_train.py — {R['device_name']} ({R['device']}, {R['dtype']}, {R['threads']} threads), "
          f"Qwen3-0.6B + CLIP ViT-B/32 shapes, batch {R['batch_size']}, TOP_K={R['top_k']}\n")
    print("| measure | ours | plain / loop / encode | ratio |")
    print("|---|---|---|---|")
    print(f"| training samples/s | {o['samples_per_s']:.2f} | {p['samples_per_s']:.2f} | "
          f"{R['train_speedup_vs_plain']:.2f}x |")
    print(f"| useful tokens/s (caption+EOS) | {o['useful_tokens_per_s']:.1f} | {p['useful_tokens_per_s']:.1f} | |")
    print(f"| useful FLOP/s | {o['useful_flops_per_s'] / 1e9:.1f} G | {p['useful_flops_per_s'] / 1e9:.1f} G | |")
    print(f"| share of {R['matmul_peak_kind']} peak ({R['matmul_peak_flops'] / 1e9:.1f} GFLOP/s) | "
          f"{o['useful_flops_share_of_peak']:.1%} | {p['useful_flops_share_of_peak']:.1%} | |")
    print(f"| step memory (peak growth) | {gb(m['ours']['step_bytes'])} | {gb(m['plain']['step_bytes'])} | "
          f"{R['peak_memory_ratio_vs_plain']:.2f}x |")
    print(f"| total peak memory (weights incl.) | {gb(m['ours']['total_bytes'])} | {gb(m['plain']['total_bytes'])} | "
          f"{R['total_memory_ratio_vs_plain']:.2f}x |")
    print(f"| captions/s (batch {g['eval_batch_size']} vs one at a time) | {g['batched_captions_per_s']:.2f} | "
          f"{g['loop_captions_per_s']:.3f} | {R['generation_speedup_vs_loop']:.1f}x |")
    print(f"| images/s of a feature epoch (cached vs encoding) | {f['cached_images_per_s']:.0f} | "
          f"{f['encode_images_per_s']:.1f} | {R['cached_epoch_speedup']:.0f}x |")
    print(f"\nours: {tr['useful_flops_per_step'] / 1e9:.0f} useful GFLOP per step, "
          f"{tr['mean_caption_tokens']:.1f} supervised tokens per caption, {tr['useful_position_share']:.0%} of the "
          f"computed positions useful (plain: {tr['plain_useful_position_share']:.0%}); step times "
          f"{', '.join(f'{x:.2f}' for x in o['step_seconds'])} s (plain: "
          f"{', '.join(f'{x:.2f}' for x in p['step_seconds'])} s)")
    print(f"memory: {m['ours']['method']}")
    shares = o["others_cpu_share"] + p["others_cpu_share"]
    if shares and None not in shares and g["others_cpu_share"]["batched"] is not None:
        busy = {"training (max step)": max(shares), "batched generation": g["others_cpu_share"]["batched"],
                "generation loop": g["others_cpu_share"]["loop"]}
        R["others_cpu_share"] = busy
        print("other processes used " + ", ".join(f"{v:.0%} of the CPUs during {k}" for k, v in busy.items()))
        if R["device"] == "cpu" and max(busy.values()) > 0.1:
            print("WARNING: the machine was shared while timing; on CPU that slows these timings a lot (OpenMP "
                  "threads spin while a neighbour runs): re-run on a quiet machine for figures to quote")
    print("targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in R["targets"].items()))


def config_shapes(top_k: int):
    """--estimate: the shapes and parameter counts from the configs alone (meta tensors, no weights)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen3Config, Qwen3ForCausalLM
    lm_cfg = Qwen3Config(**QWEN3_0_6B)
    with torch.device("meta"):
        lm = Qwen3ForCausalLM(lm_cfg)
        enc = CLIPVisionModel(CLIPVisionConfig(**CLIP_B32_VISION))
    cfg = mtl.Config()
    block = sum(p.numel() for p in lm.model.layers[0].parameters())
    h, v = cfg.adapter_hidden, cfg.num_visual_tokens
    adapter = CLIP_PROJECTION * h + h + h * v * lm_cfg.hidden_size + v * lm_cfg.hidden_size
    shape = {"layers": lm_cfg.num_hidden_layers, "params_per_block": block, "hidden": lm_cfg.hidden_size,
             "vocab": lm_cfg.vocab_size, "adapter_params": adapter, "visual_tokens": v,
             "prompt_tokens": 7}  # Qwen's tokenizer splits the default PROMPT into 7 tokens
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
              f"{gb(m['ours_predicted_step_bytes'])} for the step measured above: {gb(m['ours']['step_bytes'])}")
    return est


if __name__ == "__main__":
    sys.exit(main())
