"""Adapter and language model: adapter shapes for both encoders, a tokenizer without pad or BOS,
labels that supervise only caption + EOS, exactly the top K blocks (and the adapter) trainable, the
loss computed at label positions only and unchanged by padding, the precision policy, the attention
kernel, the fixed shapes of the compiled fast path, and remote code only when TRUST_REMOTE_CODE says so."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch

import multimodal_transfer_learning as mtl
from conftest import ROOT, SCRIPT, lora_names_and_shapes

CAPTIONS = ["a red circle", "a photo of a big blue square on a gray background", "the shape",
            "a small green circle on the gray background", "a yellow square"]


def batch(model, encoder, n=len(CAPTIONS), seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, encoder.dim, generator=g)
    caps = model.tokenize_captions(CAPTIONS[:n])
    assert len({len(c) for c in caps}) > 1, "the batch must need padding"
    return features, caps


def reference_inputs(model, features, caps, text_length: int = 0):
    """[visual][prompt][caption + EOS][pad] built here by hand, not by the model's own input code: input
    embeddings, attention mask and labels, the text right-padded to the longest row (or `text_length`)."""
    V, prompt, pad = model.adapter.num_tokens, model.prompt_ids, model.tokenizer.pad_token_id
    L = max(text_length, *(len(prompt) + len(c) for c in caps))
    visual, table = model.adapter(features), model.lm.get_input_embeddings()
    mask = torch.zeros(len(caps), V + L, dtype=torch.long)
    labels = torch.full((len(caps), V + L), -100)
    rows = []
    for b, c in enumerate(caps):
        rows.append(torch.cat([visual[b], table(torch.tensor(prompt + c + [pad] * (L - len(prompt) - len(c))))]))
        mask[b, : V + len(prompt) + len(c)] = 1
        labels[b, V + len(prompt): V + len(prompt) + len(c)] = torch.tensor(c)
    return torch.stack(rows), mask, labels


def full_logits_loss(model, embeds, mask, labels):
    """What `model(..., labels=...)` gives: logits over batch x sequence x vocabulary."""
    out = model.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    assert out.logits.shape[:2] == embeds.shape[:2]
    return out.loss


# ---------------------------------------------------------------------------------------------
# Building the captioner
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("encoder_kind", ["clip", "vit"])
def test_adapter_output_shape_for_both_encoders(tiny_model, tiny_vit_dir, encoder_kind):
    extra = {"vision_model": tiny_vit_dir} if encoder_kind == "vit" else {}
    cfg, encoder, model = tiny_model(vision_encoder=encoder_kind, num_visual_tokens=5, **extra)
    expected_dim = 24 if encoder_kind == "clip" else 40  # CLIP: projection_dim; ViT: hidden size (CLS)
    pixels = torch.stack([encoder.preprocess(mtl.Image.new("RGB", (60, 40), "red"))] * 3)
    feats = encoder(pixels)
    assert feats.shape == (3, expected_dim) and encoder.dim == expected_dim
    assert model.adapter(feats).shape == (3, 5, model.lm.config.hidden_size)
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training


def test_tokenizer_without_pad_or_bos_is_handled(tiny_model):
    _, _, model = tiny_model()
    tok = model.tokenizer
    assert tok.bos_token_id is None and tok.pad_token_id == tok.eos_token_id  # pad borrowed from EOS
    ids = model.tokenize_captions(["a red circle"])[0]
    assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
    assert model.prompt_ids == tok("caption:", add_special_tokens=False)["input_ids"]


def test_labels_supervise_only_caption_and_eos(tiny_model):
    cfg, _, model = tiny_model(num_visual_tokens=3)
    caps = model.tokenize_captions(["a red circle", "a photo of a big blue square"])
    ids, mask, labels, places = model.layout(caps)  # what every loss is computed from
    prefix = 3 + len(model.prompt_ids)
    assert ids.shape == mask.shape == labels.shape == (2, prefix + max(map(len, caps)))
    assert places.tolist() == [[0, 0], [1, 0]]  # each row's visual tokens first
    for row, c in enumerate(caps):
        assert (labels[row, :prefix] == -100).all()                       # visual + prompt
        assert labels[row, prefix: prefix + len(c)].tolist() == c         # caption + EOS
        assert (labels[row, prefix + len(c):] == -100).all()              # padding
        assert mask[row].sum() == prefix + len(c) and (mask[row, prefix + len(c):] == 0).all()


@pytest.mark.parametrize("top_k", [0, 1, 2])
def test_exactly_the_top_k_blocks_and_the_adapter_train(tiny_model, top_k):
    _, _, model = tiny_model(top_k=top_k)
    trainable = set(model.trainable_names())
    assert {n for n in trainable if n.startswith("adapter.")} == {n for n, _ in model.adapter.named_parameters(prefix="adapter")}
    lm_trainable = {n.split(".")[3] for n in trainable if n.startswith("lm.")}
    assert lm_trainable == {str(i) for i in range(2 - top_k, 2)}
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trainable)
    assert not model.lm.get_input_embeddings().weight.requires_grad  # embeddings and tied head stay frozen


# ---------------------------------------------------------------------------------------------
# The loss at label positions only
# ---------------------------------------------------------------------------------------------

def test_label_positions_loss_equals_the_full_logits_loss(tiny_model):
    cfg, encoder, model = tiny_model(TOP_K=2)
    assert model.dtype == torch.float32
    model.train()
    features, caps = batch(model, encoder)
    ours = model(features, caps)
    full = full_logits_loss(model, *reference_inputs(model, features, caps))
    assert abs(ours.item() - full.item()) < 1e-5, (ours.item(), full.item())

    # the gradients agree too (the adapter and the unfrozen blocks learn the same thing)
    params = [p for p in model.parameters() if p.requires_grad]
    g_ours = torch.autograd.grad(model(features, caps), params)
    g_full = torch.autograd.grad(full_logits_loss(model, *reference_inputs(model, features, caps)), params)
    for a, b in zip(g_ours, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_lm_head_runs_only_at_supervised_positions(tiny_model):
    _, encoder, model = tiny_model()
    features, caps = batch(model, encoder)
    seen = []
    handle = model.lm.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    try:
        model(features, caps)
    finally:
        handle.remove()
    supervised = sum(len(c) for c in caps)  # caption tokens + EOS of every row
    assert seen == [(supervised, model.lm.config.vocab_size)]
    assert supervised < len(caps) * model.layout(caps)[1].shape[1]  # fewer rows than batch x sequence


def test_per_caption_likelihoods_are_the_full_logits_ones(tiny_model):
    """Retrieval scores (mean log-likelihood per caption) from the label-positions path."""
    _, encoder, model = tiny_model()
    model.eval()
    features, caps = batch(model, encoder)
    ours = model.caption_log_likelihood(features, caps)
    with torch.no_grad():
        embeds, mask, labels = reference_inputs(model, features, caps)
        logits = model.lm(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1]
    targets = labels[:, 1:]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    expected = (logp * (targets != -100)).sum(1) / (targets != -100).sum(1)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Dynamic padding
# ---------------------------------------------------------------------------------------------

def test_dynamic_padding_gives_the_fixed_padding_loss(tiny_model):
    cfg, encoder, model = tiny_model(TOP_K=1)
    features, caps = batch(model, encoder)
    ours = model(features, caps)
    longest = max(len(c) for c in caps)
    assert model.layout(caps)[0].shape[1] == model.adapter.num_tokens + len(model.prompt_ids) + longest  # the batch's
    fixed = reference_inputs(model, features, caps, text_length=len(model.prompt_ids) + cfg.max_caption_tokens + 1)
    assert fixed[0].shape[1] > model.adapter.num_tokens + len(model.prompt_ids) + longest
    assert abs(ours.item() - full_logits_loss(model, *fixed).item()) < 1e-5


def test_a_caption_scores_the_same_alone_and_in_any_padded_batch(tiny_model):
    _, encoder, model = tiny_model()
    model.eval()
    features, caps = batch(model, encoder)
    together = model.caption_log_likelihood(features, caps)
    alone = torch.cat([model.caption_log_likelihood(features[i: i + 1], [caps[i]]) for i in range(len(caps))])
    reversed_ = model.caption_log_likelihood(features.flip(0), caps[::-1]).flip(0)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(together, reversed_, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------

def test_dtype_auto_is_fp32_on_cpu(tmp_path):
    cfg = mtl.load_config({"DEVICE": "cpu", "OUTPUT_DIR_MODELS": str(tmp_path / "m"), "CACHE_DIR": str(tmp_path / "c")})
    assert mtl.resolve_device(cfg) == (mtl.torch.device("cpu"), mtl.torch.float32)
    cfg = mtl.load_config({"DEVICE": "cpu", "DTYPE": "bf16", "OUTPUT_DIR_MODELS": str(tmp_path / "m"),
                           "CACHE_DIR": str(tmp_path / "c")})
    assert mtl.resolve_device(cfg)[1] == mtl.torch.bfloat16


def test_bf16_keeps_frozen_weights_in_bf16_and_trainable_ones_in_fp32(tiny_model):
    _, encoder, model = tiny_model(DTYPE="bf16", TOP_K=1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.lm.parameters() if not p.requires_grad]
    assert trainable and frozen
    assert all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.bfloat16 for p in encoder.parameters())
    features, caps = batch(model, encoder)
    loss = model(features, caps)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)


def test_bf16_loss_is_close_to_the_fp32_loss(tiny_model):
    """bf16 frozen weights and activations move each token's loss by ~1e-3 here (measured: 1.5e-3 at most,
    the mean by 2e-5 relative). A loss computed in bf16 instead of fp32 would round each token's loss (~3)
    to bf16's step of 1/64 there, up to 8e-3: these bounds catch it, where a 2% tolerance would not."""
    _, encoder, fp32 = tiny_model(DTYPE="fp32")
    _, _, bf16 = tiny_model(DTYPE="bf16")
    bf16.adapter.load_state_dict(fp32.adapter.state_dict())
    features, caps = batch(fp32, encoder)
    a, b = fp32.token_losses(features, caps)[0], bf16.token_losses(features, caps)[0]
    assert b.dtype == torch.float32 and (a - b).abs().max() < 4e-3, (a - b).abs().max()
    assert abs(a.mean() - b.mean()) < 2e-4 * a.mean(), (a.mean(), b.mean())


# ---------------------------------------------------------------------------------------------
# Attention kernel and the compiled fast path
# ---------------------------------------------------------------------------------------------

def test_the_decoder_attends_through_pytorch_sdpa(tiny_model):
    """Flash / memory-efficient attention come from torch's scaled_dot_product_attention: a training step's
    forward must reach it in every block (not an eager softmax(QK^T)V)."""
    _, encoder, model = tiny_model()
    features, caps = batch(model, encoder)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(features, caps)
    calls = sum(e.count for e in prof.key_averages() if e.key == "aten::scaled_dot_product_attention")
    assert calls == model.lm.config.num_hidden_layers, [e.key for e in prof.key_averages()][:40]


@pytest.mark.parametrize("compile_,device,expected", [("auto", "cpu", False), ("auto", "cuda", True),
                                                      ("1", "cpu", True), ("0", "cuda", False)])
def test_compile_auto_means_the_fast_path_on_cuda_only(config_from_env, compile_, device, expected):
    assert mtl.wants_compile(config_from_env(compile=compile_), mtl.torch.device(device)) is expected


def test_fixed_shapes_pad_to_length_buckets_and_full_batches(tiny_model):
    """The compiled fast path sees at most LENGTH_BUCKETS text lengths per batch size, whatever the
    caption lengths; padding rows and positions are never supervised, and the loss does not move."""
    cfg, encoder, model = tiny_model(BATCH_SIZE=8, EVAL_BATCH_SIZE=16, MAX_CAPTION_TOKENS=48)
    prompt = len(model.prompt_ids)
    longest = prompt + 48 + 1
    assert model.length_buckets[-1] == longest and len(model.length_buckets) <= mtl.LENGTH_BUCKETS
    features, caps = batch(model, encoder)
    eager = model(features, caps).item()
    model.fixed_shapes = True
    shapes = set()
    for training, rows in ((True, 8), (False, 16)):
        model.train(training)
        for n in range(1, 49):  # every caption length (EOS included) the config allows
            ids, mask, labels, _ = model.layout([[7] * n, [7] * max(1, n // 2)])
            shapes.add((training, (ids.shape[0], ids.shape[1] - model.adapter.num_tokens)))
            assert ids.shape[0] == rows and ids.shape[1] >= prompt + n
            assert (labels[2:] == -100).all() and (mask[2:] == 1).all()  # filler rows: attended, never supervised
            assert (labels[0] != -100).sum() == n and (labels[1] != -100).sum() == max(1, n // 2)
    assert len(shapes) <= 2 * mtl.LENGTH_BUCKETS, sorted(shapes)
    assert {s[1][1] for s in shapes} <= set(model.length_buckets)
    model.train()
    assert model(features, caps).item() == pytest.approx(eager, rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 fast path)")
def test_fast_path_bf16_loss_equals_eager_bf16_on_cuda(tiny_model):
    cfg, encoder, model = tiny_model(DEVICE="cuda", DTYPE="bf16", COMPILE="0")
    features, caps = batch(model, encoder)
    model.train()
    eager = model(features, caps).item()
    model.use_fast_path(training=True)
    assert model.fixed_shapes  # it compiled, it did not fall back
    assert model(features, caps).item() == pytest.approx(eager, rel=0.02)


# ---------------------------------------------------------------------------------------------
# Remote code
# ---------------------------------------------------------------------------------------------

def test_remote_code_is_never_hardwired():
    """Every `trust_remote_code=` in the script passes the variable on, never a literal."""
    remote = []
    for node in ast.walk(ast.parse(SCRIPT.read_text())):
        if isinstance(node, ast.Call):
            remote += [(node.lineno, ast.unparse(k.value)) for k in node.keywords if k.arg == "trust_remote_code"]
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
# TUNING=lora
# ---------------------------------------------------------------------------------------------

def test_the_default_recipe_imports_neither_peft_nor_bitsandbytes(config_from_env):
    """Both are optional extras (pip install peft / bitsandbytes): only TUNING=lora and QLORA=1 import them."""
    cfg = config_from_env()
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import multimodal_transfer_learning as mtl\n"
            f"cfg = mtl.Config(**{cfg.public()!r})\n"
            "mtl.build_model(cfg, *mtl.resolve_device(cfg))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('peft', 'bitsandbytes')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_lora_trains_fp32_matrices_on_every_projection_of_every_block_and_nothing_else_of_the_lm(tiny_model):
    cfg, _, model = tiny_model(tuning="lora", lora_rank=4, top_k=2)  # TOP_K is ignored with TUNING=lora
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lm_trainable = {n: tuple(p.shape) for n, p in trainable.items() if n.startswith("lm.")}
    assert lm_trainable == lora_names_and_shapes(rank=4)
    assert set(trainable) - set(lm_trainable) == {n for n, _ in model.adapter.named_parameters(prefix="adapter")}
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert not model.lm.get_input_embeddings().weight.requires_grad
    opt = mtl.make_optimizer(model, cfg)
    groups = {g["name"]: g["params"] for g in opt.param_groups}
    assert {id(p) for p in groups["lm"]} == {id(trainable[n]) for n in lm_trainable}
    assert groups["lm"] and opt.param_groups[1]["base_lr"] == cfg.lr_qwen


def test_lora_on_an_lm_without_those_projections_is_refused_in_one_line():
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=10, n_positions=16,
                                      bos_token_id=0, eos_token_id=0))  # fused c_attn, c_fc, c_proj
    with pytest.raises(mtl.UserError) as err:
        mtl.add_lora(gpt2, mtl.Config(tuning="lora", lm_model="tiny-gpt2"))
    assert err.value.exit_code == 2 and "LM_MODEL=tiny-gpt2 has none of the projections" in str(err.value)
    assert "TUNING=topk" in str(err.value)


def test_lora_matrices_stay_fp32_over_a_bf16_base_and_the_step_runs_under_autocast(tiny_model):
    cfg, _, model = tiny_model(tuning="lora", dtype="bf16")
    q_proj = model.lm.model.layers[0].self_attn.q_proj
    assert q_proj.base_layer.weight.dtype == torch.bfloat16
    assert q_proj.lora_A["default"].weight.dtype == q_proj.lora_B["default"].weight.dtype == torch.float32
    opt = mtl.make_optimizer(model, cfg)
    caps = model.tokenize_captions(["a red circle", "the square is blue"])
    loss = mtl.train_step(model, opt, [(torch.randn(2, 24), caps, None)], cfg.grad_clip)
    assert torch.isfinite(loss) and q_proj.lora_B["default"].weight.abs().sum() > 0  # B starts at zero


def test_lora_starts_as_the_pretrained_lm_with_the_same_adapter_as_top_k(tiny_model):
    """B = 0 at the start, so the untrained LoRA model computes what the frozen LM does; the adapter's
    initialisation does not depend on TUNING."""
    _, _, lora = tiny_model(tuning="lora")
    _, _, frozen = tiny_model(top_k=0)
    assert all(torch.equal(a, b) for a, b in zip(lora.adapter.parameters(), frozen.adapter.parameters()))
    caps = lora.tokenize_captions(["a red circle", "a photo of a big blue square"])
    feats = torch.randn(2, 24)
    with torch.no_grad():
        assert torch.allclose(lora.eval().token_losses(feats, caps)[0], frozen.eval().token_losses(feats, caps)[0],
                              atol=1e-6)


def test_lora_steps_change_only_the_adapter_and_the_lora_matrices(tiny_model):
    cfg, _, model = tiny_model(tuning="lora")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = mtl.make_optimizer(model, cfg)
    caps = model.tokenize_captions(["a red circle", "the square is blue", "a photo of a green circle"])
    for _ in range(3):  # B starts at zero, so A's gradient is zero until B has moved
        mtl.train_step(model, opt, [(torch.randn(3, 24), caps, None)], cfg.grad_clip)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(model.trainable_names())
    assert changed == set(lora_names_and_shapes(cfg.lora_rank)) | {n for n in before if n.startswith("adapter.")}


@torch.no_grad()
def test_generation_goes_through_the_lora_matrices(tiny_model):
    """Greedy generation (KV cache) continues what the training path's logits say, and LoRA changes those."""
    _, _, model = tiny_model(tuning="lora")
    _, _, frozen = tiny_model(top_k=0)
    g = torch.Generator().manual_seed(0)
    for name, p in model.lm.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=g))
    model.eval()
    frozen.eval()
    feats = torch.randn(4, 24, generator=g)

    def next_logits(m, ids):
        laid_out, mask, _, places = m.layout(ids.tolist(), [[]] * len(feats))  # the text as is: all rows one length
        hidden = m.run_blocks(m.embed(feats, laid_out, places), mask)
        return m.lm.get_output_embeddings()(hidden[:, -1])

    ids = torch.tensor(model.prompt_ids).repeat(len(feats), 1)
    assert not torch.allclose(next_logits(model, ids), next_logits(frozen, ids), atol=1e-3)
    for _ in range(3):  # the slow way: the whole sequence again at every step
        ids = torch.cat([ids, next_logits(model, ids).argmax(-1, keepdim=True)], dim=1)
    eos = model.tokenizer.eos_token
    expected = [model.tokenizer.decode(row[len(model.prompt_ids):]).split(eos)[0].replace("<unk>", "").strip()
                for row in ids.tolist()]  # generate drops special tokens (EOS ends a row, <unk> is skipped)
    greedy = dict(max_new_tokens=3, do_sample=False, num_beams=1)
    assert model.generate(feats, greedy) == expected
    assert frozen.generate(feats, greedy) != expected


# ---------------------------------------------------------------------------------------------
# The Q-Former (ADAPTER=qformer)
# ---------------------------------------------------------------------------------------------

# the fixtures' vision towers: CLIP hidden 32, ViT hidden 40; both 32 x 32 images in 8 x 8 patches
PATCH_SHAPES = {"clip": (4 * 4 + 1, 32), "vit": (4 * 4 + 1, 40)}


def hub_patch_tokens(kind: str, model_dir, pixels: torch.Tensor) -> torch.Tensor:
    """The vision tower's final hidden states, straight from transformers."""
    from transformers import CLIPVisionModel, ViTModel
    tower = CLIPVisionModel.from_pretrained(model_dir) if kind == "clip" else ViTModel.from_pretrained(model_dir)
    with torch.no_grad():
        return tower(pixel_values=pixels).last_hidden_state


@pytest.mark.parametrize("encoder_kind", ["clip", "vit"])
def test_qformer_reads_the_encoders_patch_tokens_for_both_encoders(tiny_model, tiny_clip_dir, tiny_vit_dir,
                                                                   encoder_kind):
    model_dir = tiny_vit_dir if encoder_kind == "vit" else tiny_clip_dir
    cfg, encoder, model = tiny_model(vision_encoder=encoder_kind, vision_model=model_dir, adapter="qformer",
                                     num_visual_tokens=5, qformer_layers=3)
    pixels = torch.stack([encoder.preprocess(mtl.Image.new("RGB", (60, 40), c)) for c in ("red", "blue", "white")])
    patches = encoder(pixels)
    assert patches.shape == (3, *PATCH_SHAPES[encoder_kind]) and encoder.feature_shape == PATCH_SHAPES[encoder_kind]
    torch.testing.assert_close(patches, hub_patch_tokens(encoder_kind, model_dir, pixels))
    assert model.feature_shape == PATCH_SHAPES[encoder_kind]
    assert isinstance(model.adapter, mtl.QFormer) and len(model.adapter.blocks) == 3
    assert model.adapter(patches).shape == (3, 5, model.lm.config.hidden_size)
    attention = model.adapter.attention(patches)
    assert attention.shape == (3, 5, PATCH_SHAPES[encoder_kind][0]) and (attention >= 0).all()
    torch.testing.assert_close(attention.sum(-1), torch.ones(3, 5))
    # each image is read on its own: a batch changes nothing
    torch.testing.assert_close(model.adapter(patches[1:2]), model.adapter(patches)[1:2])


def test_qformer_parameters_at_the_real_shapes():
    """16 queries, 2 layers, CLIP B/32 patch tokens (50 x 768), Qwen3-0.6B's width 1024, counted by hand."""
    P, D, V, H = 50, 768, 16, 1024
    attention = 3 * D * D + 3 * D + D * D + D            # packed q/k/v projections + output projection
    mlp = D * 4 * D + 4 * D + 4 * D * D + D
    block = 2 * attention + mlp + 3 * 2 * D              # self- and cross-attention, MLP, three LayerNorms
    # queries, patch norm, patch positions, blocks, out norm, projection
    expected = V * D + 2 * D + P * D + 2 * block + 2 * D + D * H + H
    qformer = mtl.QFormer((P, D), V, 2, H)
    assert sum(p.numel() for p in qformer.parameters()) == expected
    assert all(b.cross_attention.num_heads == 12 for b in qformer.blocks)  # 64-dimensional heads, as BLIP-2's


def test_qformer_trains_with_the_top_blocks_and_nothing_else(tiny_model):
    cfg, encoder, model = tiny_model(adapter="qformer", top_k=1)
    trainable = set(model.trainable_names())
    assert {n for n in trainable if n.startswith("adapter.")} == {n for n, _ in model.adapter.named_parameters(prefix="adapter")}
    assert {n.split(".")[3] for n in trainable if n.startswith("lm.")} == {"1"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = mtl.make_optimizer(model, cfg)
    caps = model.tokenize_captions(["a red circle", "the square is blue", "a photo of a green circle"])
    patches = torch.randn(3, *encoder.feature_shape, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(5):
        loss = model(patches, caps)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n  # every trained weight moved, no frozen one did


@pytest.mark.parametrize("encoder_kind", ["clip", "vit"])
def test_unprocess_shows_what_the_encoder_saw(tiny_model, tiny_vit_dir, encoder_kind):
    extra = {"vision_model": tiny_vit_dir} if encoder_kind == "vit" else {}
    _, encoder, _ = tiny_model(vision_encoder=encoder_kind, **extra)
    image = mtl.Image.new("RGB", (50, 50), (200, 40, 90))
    seen = encoder.unprocess(encoder.preprocess(image))
    assert seen.size == (32, 32)
    assert all(abs(a - b) <= 1 for a, b in zip(seen.getpixel((16, 16)), (200, 40, 90)))
