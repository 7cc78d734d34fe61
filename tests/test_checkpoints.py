"""Checkpoints: a save that fails midway (full disk, Ctrl-C, an unpicklable object) never leaves a
truncated file nor replaces a good one, a completed save reads back whole, a checkpoint holds the
trainable weights and the public config only and the last one of a configuration is found, and
nothing the script loads with torch.load can run code (weights_only=True everywhere); the run's
per-epoch history beside its checkpoints keeps earlier epochs across a resume."""
from __future__ import annotations

import ast
import dataclasses
import errno
import json
import os
from pathlib import Path

import pytest
import torch

import multimodal_transfer_learning as mtl
from conftest import HF_FAKE, SCRIPT, leftover_temp_files, lora_names_and_shapes


class _DiskFullAfter:
    """A real file that accepts `limit` bytes and then fails as a full disk (or a Ctrl-C) would."""

    def __init__(self, fh, limit: int, exc: BaseException):
        self.fh, self.limit, self.exc, self.written = fh, limit, exc, 0

    def write(self, data):
        data = bytes(data)
        if self.written + len(data) > self.limit:
            part = data[: self.limit - self.written]
            self.fh.write(part)
            self.fh.flush()
            self.written += len(part)
            raise self.exc
        self.written += len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


@pytest.mark.parametrize("old", [False, True], ids=["new file", "overwrite"])
@pytest.mark.parametrize("failure", ["disk full mid-write", "Ctrl-C mid-write", "pickling error"])
def test_interrupted_save_never_leaves_a_truncated_file(tmp_path, monkeypatch, failure, old):
    path = tmp_path / "ckpts" / "1_clip_top1.pt"
    before = None
    if old:
        mtl.atomic_save({"format": 1, "model": {"w": torch.ones(3)}}, path)
        before = path.read_bytes()
    payload = {"format": 1, "model": {"w": torch.randn(20_000)}}
    opened = []
    if failure == "pickling error":
        payload["bad"] = _Unpicklable()
    else:
        exc = OSError(errno.ENOSPC, "No space left on device") if failure.startswith("disk") else KeyboardInterrupt()

        class OsWithFailingFiles:  # only the script's own `os` sees it
            def __getattr__(self, name):
                return getattr(os, name)

            def fdopen(self, fd, *args, **kwargs):
                opened.append(_DiskFullAfter(os.fdopen(fd, *args, **kwargs), 10_000, exc))
                return opened[-1]
        monkeypatch.setattr(mtl, "os", OsWithFailingFiles())
    with pytest.raises(BaseException) as raised:
        mtl.atomic_save(payload, path)
    if failure.startswith("disk"):  # one clear line for the user, not a traceback
        assert isinstance(raised.value, mtl.UserError) and "could not write" in str(raised.value)
    else:
        assert not isinstance(raised.value, mtl.UserError)
    if opened:
        assert opened[0].written == 10_000  # the failure really came mid-write
    if old:
        assert path.read_bytes() == before
        assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.ones(3))
    else:
        assert not path.exists()
    assert leftover_temp_files(path.parent) == [], os.listdir(path.parent)


def test_a_completed_save_is_complete(tmp_path):
    path = tmp_path / "2_clip_top1.pt"
    obj = {"format": 1, "model": {"w": torch.randn(1000)}, "epoch": 2}
    mtl.atomic_save(obj, path)
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], obj["model"]["w"])
    assert leftover_temp_files(tmp_path) == []


def test_saved_files_follow_the_umask_like_any_file(tmp_path):
    old = os.umask(0o022)
    try:
        mtl.atomic_save({"format": 1}, tmp_path / "a.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == 0o644  # readable by the group and others, as `touch` makes it


def test_torch_load_is_always_weights_only():
    loads = []
    for node in ast.walk(ast.parse(SCRIPT.read_text())):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
            loads.append(node.lineno)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            assert kw.get("weights_only") == "True", f"line {node.lineno}: torch.load without weights_only=True"
    assert len(loads) >= 2  # the feature cache and the checkpoints


def test_a_checkpoint_holds_the_trainable_weights_and_public_config_and_the_last_one_is_found(tiny_model):
    cfg, _, model = tiny_model(top_k=1, hf_token=HF_FAKE)
    opt = mtl.make_optimizer(model, cfg)
    paths = [mtl.save_checkpoint(model, opt, cfg, epoch, 10 * epoch, {"loss": 1 / epoch}, "run-xyz")
             for epoch in (1, 2, 10)]
    assert [p.name for p in paths] == ["1_clip_top1.pt", "2_clip_top1.pt", "10_clip_top1.pt"]
    assert leftover_temp_files(paths[0].parent) == []
    ckpt = torch.load(paths[1], weights_only=True)
    trainable = set(model.trainable_names())
    assert set(ckpt["model"]) == trainable  # not the frozen LM, not the encoder
    state = model.state_dict()
    assert all(torch.equal(ckpt["model"][k], state[k]) for k in trainable)
    assert (ckpt["format"], ckpt["epoch"], ckpt["step"], ckpt["metrics"], ckpt["wandb_run_id"]) == \
        (1, 2, 20, {"loss": 0.5}, "run-xyz")
    assert ckpt["config"] == cfg.public() and "hf_token" not in ckpt["config"]
    assert HF_FAKE.encode() not in paths[1].read_bytes()
    # The last checkpoint of this configuration is the highest epoch (10, not "2" > "10" as text);
    # another configuration's checkpoints are not candidates.
    (paths[0].parent / "99_vit_top2.pt").write_bytes(b"")
    assert mtl.find_last_checkpoint(cfg) == paths[2]


# ---------------------------------------------------------------------------------------------
# The run's history ({run}.history.jsonl beside its checkpoints)
# ---------------------------------------------------------------------------------------------

def epoch_metrics(epoch: int) -> dict:
    return {"loss": 3.0 - epoch / 10, "train_loss": 3.5 - epoch / 10, "train_seconds": 1.5, "CIDEr": epoch / 10,
            "METEOR": None, "num_images": 4}


def test_history_keeps_earlier_epochs_and_an_epoch_done_again_replaces_the_later_ones(config_from_env):
    cfg = config_from_env(top_k=1)
    images = {"train": 32, "val": 4, "test": 4}
    for epoch in (1, 2, 3):
        mtl.record_epoch(cfg, epoch, 10 * epoch, epoch_metrics(epoch), images)
    path = mtl.history_path(cfg.output_dir_models, cfg.run_name)
    assert path.name == "clip_top1.history.jsonl" and path.parent == Path(cfg.output_dir_models)
    first = path.read_text().splitlines()[0]
    assert json.loads(first) == {"epoch": 1, "step": 10, "train_loss": 3.4, "train_seconds": 1.5, "val_loss": 2.9,
                                 "images": images, "val_metrics": {"CIDEr": 0.1, "METEOR": None, "num_images": 4}}
    # resumed from epoch 1's checkpoint after a crash: epoch 2 is trained again and epoch 3 never was
    mtl.record_epoch(cfg, 2, 20, {**epoch_metrics(2), "loss": 1.0}, images)
    rows = mtl.read_history(path)
    assert [(r["epoch"], r["val_loss"]) for r in rows] == [(1, 2.9), (2, 1.0)]
    assert path.read_text().splitlines()[0] == first
    assert leftover_temp_files(path.parent) == []


def test_a_broken_history_line_is_named_with_its_file_and_line(tmp_path):
    path = tmp_path / "clip_top1.history.jsonl"
    path.write_text('{"epoch": 1, "val_loss": 2.0}\n{"epoch": 2, "val_lo\n')
    with pytest.raises(mtl.UserError, match=r"clip_top1.history.jsonl:2 is not a history line"):
        mtl.read_history(path)


def test_training_writes_one_history_line_per_epoch_that_matches_its_checkpoint(trained):
    models = trained["A"] / "models"
    rows = [json.loads(line) for line in (models / "clip_top1.history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        ckpt = torch.load(models / f"{r['epoch']}_clip_top1.pt", weights_only=True)
        assert r["step"] == ckpt["step"] and r["val_loss"] == ckpt["metrics"]["loss"]
        assert r["train_loss"] == ckpt["metrics"]["train_loss"]
        assert r["val_metrics"]["CIDEr"] == ckpt["metrics"]["CIDEr"] and r["val_metrics"]["METEOR"] is None
        assert r["images"] == {"train": 32, "val": 4, "test": 4}


# TUNING=lora
# ---------------------------------------------------------------------------------------------

def checkpoint_after_one_step(tiny_model, folder, **settings):
    """(model, path): a tiny model of these settings after one optimizer step, and its newest checkpoint."""
    cfg, _, model = tiny_model(output_dir_models=folder, **settings)
    opt = mtl.make_optimizer(model, cfg)
    caps = model.tokenize_captions(["a red circle", "the square is blue"])
    mtl.train_step(model, opt, [(torch.randn(2, 24), caps, None)], cfg.grad_clip)
    return model, mtl.save_checkpoint(model, opt, cfg, 1, 1, {"loss": 1.0}, None)


def stored_tensor_bytes(path) -> int:
    """Bytes of the tensors a checkpoint stores: its weights and the optimizer's moments."""
    ckpt = torch.load(path, weights_only=True)
    tensors = list(ckpt["model"].values()) + [t for s in ckpt["optimizer"]["state"].values() for t in s.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


def test_a_lora_checkpoint_holds_the_adapter_and_lora_weights_only_and_rebuilds_the_model(tiny_model, tmp_path):
    model, path = checkpoint_after_one_step(tiny_model, tmp_path, tuning="lora", lora_rank=1)
    assert path.name == "1_clip_lora1.pt"
    stored = torch.load(path, weights_only=True)["model"]
    adapter = {n for n, _ in model.adapter.named_parameters(prefix="adapter")}
    assert set(stored) == adapter | set(lora_names_and_shapes(rank=1))  # no frozen LM weight
    again = tiny_model(tuning="lora", lora_rank=1)[2]
    mtl.load_weights(again, {"model": stored})
    trained = model.state_dict()
    assert all(torch.equal(p, trained[n]) for n, p in again.state_dict().items())


def test_a_lora_checkpoint_is_at_most_a_fifth_of_a_top_k_one(tiny_model, tmp_path):
    """On the same fixtures, after one step: LORA_RANK=1 against TOP_K=1 (the fixtures' default, one of the
    tiny LM's two blocks); rank 1 of width 32 is the nearest the tiny LM gets to the recipe's 16 of 1024.
    Compared are the stored tensors (weights and optimizer moments): at this size the file's fixed content
    (config, RNG state, one zip record per tensor: tens of KB) outweighs them."""
    _, lora = checkpoint_after_one_step(tiny_model, tmp_path / "lora", tuning="lora", lora_rank=1)
    _, top_k = checkpoint_after_one_step(tiny_model, tmp_path / "topk", top_k=1)
    ratio = stored_tensor_bytes(lora) / stored_tensor_bytes(top_k)
    assert ratio <= 1 / 5, ratio


@pytest.mark.parametrize("variant,ignored,shaping", [
    ({"tuning": "lora", "lora_rank": 1}, {"top_k": 2, "qformer_layers": 3}, {"lora_alpha": 4}),
    ({"adapter": "qformer"}, {"adapter_hidden": 8, "lora_rank": 2}, {"qformer_layers": 1}),
    ({"top_k": 1}, {"lora_rank": 4, "lora_dropout": 0.2}, {"top_k": 2}),
])
def test_resume_ignores_the_settings_its_variant_does_not_use(tiny_model, variant, ignored, shaping):
    """TOP_K under LoRA, LoRA's settings under top-K and the other adapter's settings do not shape the
    model: changing them does not block --resume; a setting that does is named."""
    cfg, _, model = tiny_model(**variant)
    path = mtl.save_checkpoint(model, mtl.make_optimizer(model, cfg), cfg, 1, 10, {"loss": 1.0}, None)
    assert mtl.checkpoint_to_resume(dataclasses.replace(cfg, **ignored), str(path))[0] == path
    with pytest.raises(mtl.UserError) as e:
        mtl.checkpoint_to_resume(dataclasses.replace(cfg, **shaping), str(path))
    (key, value), = shaping.items()
    assert f"{key.upper()}={value!r}" in str(e.value) and "restore them to resume" in str(e.value)


# ---------------------------------------------------------------------------------------------
# ADAPTER=qformer
# ---------------------------------------------------------------------------------------------

def test_a_qformer_checkpoint_is_named_for_its_variant_and_not_taken_for_an_mlp_run(tiny_model):
    cfg, _, model = tiny_model(top_k=1, adapter="qformer")
    path = mtl.save_checkpoint(model, mtl.make_optimizer(model, cfg), cfg, 3, 30, {"loss": 1.0}, None)
    assert path.name == "3_clip_qformer_top1.pt"
    assert set(torch.load(path, weights_only=True)["model"]) == set(model.trainable_names())
    assert mtl.find_last_checkpoint(cfg) == path
    with pytest.raises(mtl.UserError) as e:
        mtl.find_last_checkpoint(dataclasses.replace(cfg, adapter="mlp"))
    message = str(e.value)
    assert "\n" not in message and "no checkpoint {epoch}_clip_top1.pt" in message
    assert "3_clip_qformer_top1.pt (ADAPTER=qformer)" in message and "--checkpoint" in message


@pytest.mark.parametrize("change,needle", [
    ({"adapter": "mlp"}, "it lacks 4 trainable weights (e.g. adapter.net.0.bias)"),   # the MLP's 2 layers
    ({"num_visual_tokens": 3}, "adapter.queries is (2, 32) in it, (3, 32) in the model"),
    ({"qformer_layers": 1}, "it holds 18 weights the model has not (e.g. adapter.blocks.1."),  # a whole block
], ids=["mlp model", "more queries", "fewer layers"])
def test_weights_that_do_not_fit_the_model_are_named_in_one_line(tiny_model, change, needle):
    """A checkpoint whose stored settings no longer match its weights (edited by hand, or the models at
    VISION_MODEL/LM_MODEL replaced since): one line naming the first weight that does not fit."""
    cfg, _, model = tiny_model(top_k=1, adapter="qformer")
    ckpt = torch.load(mtl.save_checkpoint(model, mtl.make_optimizer(model, cfg), cfg, 1, 0, {}, None), weights_only=True)
    _, _, other = tiny_model(**{"top_k": 1, "adapter": "qformer", **change})
    with pytest.raises(mtl.UserError) as e:
        mtl.load_weights(other, ckpt)
    message = str(e.value)
    assert "\n" not in message and message.startswith("the checkpoint does not fit the model") and needle in message
