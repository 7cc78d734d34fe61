"""The speed and memory optimisations change nothing but cost: the label-positions-only loss, dynamic
padding, the feature cache (and when it is rebuilt), the precision policy. Tiny real-architecture
models from conftest; no timing here (benchmarks/bench_train.py measures the speed)."""
from __future__ import annotations

import json
import shutil

import torch
from PIL import Image

import multimodal_transfer_learning as mtl
from conftest import draw

CAPTIONS = ["a red circle", "a photo of a big blue square on a gray background", "the shape",
            "a small green circle on the gray background", "a yellow square"]


def batch(model, encoder, n=len(CAPTIONS), seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, encoder.dim, generator=g)
    caps = model.tokenize_captions(CAPTIONS[:n])
    assert len({len(c) for c in caps}) > 1, "the batch must need padding"
    return features, caps


def full_logits_loss(model, embeds, mask, labels):
    """What `model(..., labels=...)` gives: logits over batch x sequence x vocabulary."""
    out = model.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    assert out.logits.shape[:2] == embeds.shape[:2]
    return out.loss


# ---- the loss at label positions only -----------------------------------------------------------

def test_label_positions_loss_equals_the_full_logits_loss(tiny_model):
    cfg, encoder, model = tiny_model(TOP_K=2)
    assert model.dtype == torch.float32
    model.train()
    features, caps = batch(model, encoder)
    ours = model.loss(features, caps)
    embeds, mask, labels = model.build_inputs(features, caps)
    full = full_logits_loss(model, embeds, mask, labels)
    assert abs(ours.item() - full.item()) < 1e-5, (ours.item(), full.item())

    # the gradients agree too (the adapter and the unfrozen blocks learn the same thing)
    params = [p for p in model.parameters() if p.requires_grad]
    g_ours = torch.autograd.grad(model.loss(features, caps), params)
    embeds, mask, labels = model.build_inputs(features, caps)
    g_full = torch.autograd.grad(full_logits_loss(model, embeds, mask, labels), params)
    for a, b in zip(g_ours, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_lm_head_runs_only_at_supervised_positions(tiny_model):
    _, encoder, model = tiny_model()
    features, caps = batch(model, encoder)
    seen = []
    handle = model.lm.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    try:
        model.loss(features, caps)
    finally:
        handle.remove()
    supervised = sum(len(c) for c in caps)  # caption tokens + EOS of every row
    assert seen == [(supervised, model.lm.config.vocab_size)]
    embeds, _, _ = model.build_inputs(features, caps)
    assert supervised < embeds.shape[0] * embeds.shape[1]  # fewer rows than batch x sequence


def test_per_caption_likelihoods_are_the_full_logits_ones(tiny_model):
    """Retrieval scores (mean log-likelihood per caption) from the label-positions path."""
    _, encoder, model = tiny_model()
    model.eval()
    features, caps = batch(model, encoder)
    ours = model.caption_log_likelihood(features, caps)
    embeds, mask, labels = model.build_inputs(features, caps)
    with torch.no_grad():
        logits = model.lm(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1]
    targets = labels[:, 1:]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    expected = (logp * (targets != -100)).sum(1) / (targets != -100).sum(1)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


# ---- dynamic padding ----------------------------------------------------------------------------

def test_dynamic_padding_gives_the_fixed_padding_loss(tiny_model):
    cfg, encoder, model = tiny_model(TOP_K=1)
    features, caps = batch(model, encoder)
    ours = model.loss(features, caps)
    embeds, mask, labels = model.build_inputs(features, caps)
    longest = max(len(c) for c in caps)
    assert embeds.shape[1] == model.adapter.num_tokens + len(model.prompt_ids) + longest  # padded to the batch only
    fixed = model.build_inputs(features, caps, pad_to=cfg.max_caption_tokens + 1)
    assert fixed[0].shape[1] > embeds.shape[1]
    assert torch.equal(fixed[2][:, : labels.shape[1]], labels) and (fixed[2][:, labels.shape[1]:] == -100).all()
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


# ---- precision policy ----------------------------------------------------------------------------

def test_bf16_keeps_frozen_weights_in_bf16_and_trainable_ones_in_fp32(tiny_model):
    _, encoder, model = tiny_model(DTYPE="bf16", TOP_K=1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.lm.parameters() if not p.requires_grad]
    assert trainable and frozen
    assert all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.bfloat16 for p in encoder.parameters())
    features, caps = batch(model, encoder)
    loss = model.loss(features, caps)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)


def test_bf16_loss_is_close_to_the_fp32_loss(tiny_model):
    """bf16 frozen weights round to ~3 significant digits; the loss barely moves."""
    _, encoder, fp32 = tiny_model(DTYPE="fp32")
    _, _, bf16 = tiny_model(DTYPE="bf16")
    bf16.adapter.load_state_dict(fp32.adapter.state_dict())
    features, caps = batch(fp32, encoder)
    a, b = fp32.loss(features, caps).item(), bf16.loss(features, caps).item()
    assert abs(a - b) < 0.02 * abs(a), (a, b)


# ---- the feature cache -----------------------------------------------------------------------------

def cache_call(cfg, encoder):
    records, store, _ = mtl.load_records(cfg)
    path = mtl.feature_cache_path(cfg, encoder, records, store)
    feats, bad = mtl.cached_features(cfg, encoder, records, store)
    return path, feats, records, store


def stamp(path):
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def test_cached_features_equal_freshly_computed_ones(tiny_model):
    cfg, encoder, _ = tiny_model()
    path, feats, records, store = cache_call(cfg, encoder)
    blob = torch.load(path, weights_only=True)
    fresh, bad = mtl.encode_images(records, store, encoder, cfg)
    assert not bad and blob["ids"] == [r.image_id for r in records]
    torch.testing.assert_close(blob["features"], fresh, rtol=0, atol=0)
    # and each equals the image encoded on its own (batching changes nothing)
    for i in (0, len(records) - 1):
        single = encoder(encoder.preprocess(store.open(records[i].ref))[None])[0]
        torch.testing.assert_close(feats[records[i].image_id], single, rtol=1e-5, atol=1e-6)


def test_cache_is_reused_when_nothing_changed(tiny_model):
    cfg, encoder, _ = tiny_model()
    path, feats, _, _ = cache_call(cfg, encoder)
    before = stamp(path)
    again, feats2, _, _ = cache_call(cfg, encoder)
    assert again == path and stamp(path) == before  # read, not rewritten
    assert list(path.parent.iterdir()) == [path]
    _, enc2, _ = tiny_model()  # the same encoder loaded again in another process-like build
    assert cache_call(cfg, enc2)[0] == path and stamp(path) == before
    assert all(torch.equal(feats[k], feats2[k]) for k in feats)


def test_cache_is_rebuilt_for_another_encoder(tiny_model, tiny_vit_dir):
    cfg, encoder, _ = tiny_model()
    clip_path, clip_feats, _, _ = cache_call(cfg, encoder)
    cfg_vit, vit, _ = tiny_model(VISION_ENCODER="vit", VISION_MODEL=str(tiny_vit_dir))
    vit_path, vit_feats, _, _ = cache_call(cfg_vit, vit)
    assert vit_path != clip_path and vit_path.is_file() and clip_path.is_file()
    k = next(iter(vit_feats))
    assert vit_feats[k].shape == (vit.dim,) != clip_feats[k].shape


def test_cache_is_rebuilt_when_the_model_dir_is_re_saved(tiny_model, tiny_clip_dir, tmp_path):
    from transformers import CLIPModel
    model_dir = tmp_path / "my-clip"
    shutil.copytree(tiny_clip_dir, model_dir)
    cfg, encoder, _ = tiny_model(VISION_MODEL=str(model_dir))
    old_path, old_feats, _, _ = cache_call(cfg, encoder)
    clip = CLIPModel.from_pretrained(model_dir)  # fine-tuned elsewhere and saved over the same folder
    with torch.no_grad():
        clip.visual_projection.weight.mul_(2)
    clip.save_pretrained(model_dir)
    cfg, encoder, _ = tiny_model(VISION_MODEL=str(model_dir))
    new_path, new_feats, _, _ = cache_call(cfg, encoder)
    assert new_path != old_path
    k = next(iter(new_feats))
    torch.testing.assert_close(new_feats[k], 2 * old_feats[k], rtol=1e-5, atol=1e-6)


def test_cache_is_rebuilt_when_the_preprocessing_changes(tiny_model, tiny_clip_dir, tmp_path):
    model_dir = tmp_path / "my-clip"
    shutil.copytree(tiny_clip_dir, model_dir)
    cfg, encoder, _ = tiny_model(VISION_MODEL=str(model_dir))
    old_path, old_feats, _, _ = cache_call(cfg, encoder)
    conf = model_dir / "preprocessor_config.json"
    doc = json.loads(conf.read_text())
    doc["image_mean"] = [0.5, 0.5, 0.5]
    conf.write_text(json.dumps(doc))
    cfg, encoder, _ = tiny_model(VISION_MODEL=str(model_dir))
    new_path, new_feats, _, _ = cache_call(cfg, encoder)
    assert new_path != old_path
    k = next(iter(new_feats))
    assert not torch.allclose(new_feats[k], old_feats[k])


def test_cache_is_rebuilt_when_an_image_changes(tiny_model, image_folder):
    cfg, encoder, _ = tiny_model()
    old_path, old_feats, records, _ = cache_call(cfg, encoder)
    changed = records[3]
    draw("yellow", "circle").transpose(Image.Transpose.FLIP_LEFT_RIGHT).rotate(30).save(changed.ref)
    new_path, new_feats, _, _ = cache_call(cfg, encoder)
    assert new_path != old_path
    assert not torch.allclose(new_feats[changed.image_id], old_feats[changed.image_id])
    others = [r.image_id for r in records if r.image_id != changed.image_id]
    assert all(torch.allclose(new_feats[i], old_feats[i], atol=1e-6) for i in others)


def test_cache_is_rebuilt_when_a_record_is_added(tiny_model, image_folder):
    cfg, encoder, _ = tiny_model()
    old_path, old_feats, _, _ = cache_call(cfg, encoder)
    draw("blue", "circle", size=40).save(image_folder / "img" / "new.png")
    with open(image_folder / "metadata.jsonl", "a") as fh:
        fh.write(json.dumps({"file_name": "img/new.png", "captions": ["a blue circle"]}) + "\n")
    new_path, new_feats, _, _ = cache_call(cfg, encoder)
    assert new_path != old_path
    assert set(new_feats) == set(old_feats) | {"img/new.png"}
    # and the cache of the new dataset is then reused
    before = stamp(new_path)
    assert cache_call(cfg, encoder)[0] == new_path and stamp(new_path) == before


# ---- attention kernel and COMPILE=1 ----------------------------------------------------------------

def test_the_lm_uses_pytorch_sdpa_attention(tiny_model):
    _, _, model = tiny_model()
    assert model.lm.config._attn_implementation == "sdpa"


def test_compile_wraps_exactly_the_unfrozen_blocks(tiny_model):
    """COMPILE=1 compiles each trainable block on its own (the frozen stack stays eager); compiling
    happens lazily at the first call, so building stays fast."""
    _, _, model = tiny_model(COMPILE="1", TOP_K=1)
    blocks = list(mtl.decoder_blocks(model.lm))
    compiled = [getattr(b, "_compiled_call_impl", None) is not None for b in blocks]
    assert compiled == [False] * (len(blocks) - 1) + [True]
    _, _, eager = tiny_model(COMPILE="0", TOP_K=1)
    assert not any(getattr(b, "_compiled_call_impl", None) is not None for b in mtl.decoder_blocks(eager.lm))
