"""Model: adapter shapes for both encoders, labels supervise only caption + EOS, exactly the top
K blocks train, and frozen weights stay bit-identical through optimizer steps."""
import pytest
import torch

import multimodal_transfer_learning as mtl


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
