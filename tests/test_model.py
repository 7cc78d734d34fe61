"""Model: adapter shapes for both encoders, labels supervise only caption + EOS, exactly the top
K blocks train, and frozen weights stay bit-identical through optimizer steps."""
import pytest
import torch

import multimodal_transfer_learning as mtl
from conftest import lora_names_and_shapes


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
    embeds, mask, labels = model.build_inputs(torch.randn(2, 24), caps)
    prefix = 3 + len(model.prompt_ids)
    assert embeds.shape[:2] == mask.shape == labels.shape == (2, prefix + max(map(len, caps)))
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


def test_optimizer_steps_change_only_trainable_weights(tiny_model):
    cfg, _, model = tiny_model(top_k=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = mtl.make_optimizer(model, cfg)
    caps = model.tokenize_captions(["a red circle", "the square is blue", "a photo of a green circle"])
    for _ in range(3):
        model.loss(torch.randn(3, 24), caps).backward()
        opt.step()
        opt.zero_grad()
    trainable = set(model.trainable_names())
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    assert {g["name"] for g in opt.param_groups} == {"adapter", "lm"}
    assert [g["base_lr"] for g in opt.param_groups] == [cfg.lr_adapter, cfg.lr_qwen]


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [mtl.get_lr_scale(s, 100, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.01


# ---- TUNING=lora ----

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
        hidden = m.decode_eager(m.embed(feats, ids), torch.ones(len(feats), m.adapter.num_tokens + ids.shape[1]))
        return m.lm.get_output_embeddings()(hidden[:, -1])

    ids = torch.tensor(model.prompt_ids).repeat(len(feats), 1)
    assert not torch.allclose(next_logits(model, ids), next_logits(frozen, ids), atol=1e-3)
    for _ in range(3):  # the slow way: the whole sequence again at every step
        ids = torch.cat([ids, next_logits(model, ids).argmax(-1, keepdim=True)], dim=1)
    eos = model.tokenizer.eos_token
    expected = [model.tokenizer.decode(row[len(model.prompt_ids):]).split(eos)[0].strip() for row in ids.tolist()]
    greedy = dict(max_new_tokens=3, do_sample=False, num_beams=1)
    assert model.generate(feats, greedy) == expected
    assert frozen.generate(feats, greedy) != expected
