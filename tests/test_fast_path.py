"""The fast path's promises: the decoder runs without an attention mask where rows are right-padded
(and keeps it where a pad precedes a token), with the same losses and weights as the masked decoder
over an epoch; COMPILE=max is accepted on CPU and compiles as COMPILE=1 does, counting its graphs
after the first epoch; a backward pass that fails to compile falls back to eager in one warning line
and the run finishes. (The compiled losses against eager and the number of graphs per length bucket
are checked in test_training.py.)"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import multimodal_transfer_learning as mtl
from conftest import ROOT, SCRIPT, explain, parallel, text
from test_model import batch, full_logits_loss, reference_inputs


def attention_masks_seen(model) -> tuple[list, object]:
    """The attention_mask each call of the first decoder block receives, and the hook's handle."""
    seen = []
    block = mtl.decoder_blocks(model.lm)[0]
    return seen, block.register_forward_pre_hook(lambda m, args, kw: seen.append(kw.get("attention_mask")),
                                                 with_kwargs=True)


def masked_step(model, opt, micro_batch, grad_clip: float) -> float:
    """The masked reference, inputs built by hand: the LM given the padding mask, with full logits."""
    features, caps, _ = micro_batch
    loss = full_logits_loss(model, *reference_inputs(model, features, caps))
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def test_the_maskless_decoder_equals_the_masked_one_over_an_epoch(tiny_model):
    """fp32, one epoch of the fixture (14 steps with padded batches): every step's loss and the trained
    weights equal those of the decoder that is given the padding mask."""
    cfg, encoder, ours = tiny_model(TOP_K=1, BATCH_SIZE=7)
    _, _, masked = tiny_model(TOP_K=1, BATCH_SIZE=7)  # the same SEED: the same initial weights
    splits, _, _ = mtl.prepare_data(cfg, mtl.load_records(cfg), encoder, ours)
    steps = list(mtl.optimizer_steps(ours, splits["train"], cfg, 1))
    opts = mtl.make_optimizer(ours, cfg), mtl.make_optimizer(masked, cfg)
    ours.train(), masked.train()
    seen, hook = attention_masks_seen(ours)
    reference, _ = attention_masks_seen(masked)
    losses = [(mtl.train_step(ours, opts[0], micro, cfg.grad_clip).item(),
               masked_step(masked, opts[1], micro[0], cfg.grad_clip)) for micro in steps]
    hook.remove()
    assert len(losses) == 14 and all(m is None for m in seen) and all(m is not None for m in reference)
    for a, b in losses:
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5), losses
    trained = dict(masked.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, trained[name], rtol=1e-5, atol=1e-5, msg=name)


def test_a_pad_before_a_token_keeps_the_attention_mask(tiny_model, monkeypatch):
    """Should a layout put pads before real tokens (here between the visual tokens and the text, as
    sequences with several images might), the decoder gets the mask: the per-token losses are the
    masked LM's, which differ from what the decoder gives without the mask."""
    _, encoder, model = tiny_model()
    features, caps = batch(model, encoder)
    right_padded = model.layout

    def pads_first(*args):
        ids, mask, labels, places = right_padded(*args)
        V = model.adapter.num_tokens
        for b in range(len(ids)):  # roll each row's text so that its pads come right after the visual tokens
            pads = int((mask[b] == 0).sum())
            ids[b, V:], mask[b, V:], labels[b, V:] = (t[b, V:].roll(pads) for t in (ids, mask, labels))
        return ids, mask, labels, places

    monkeypatch.setattr(model, "layout", pads_first)
    model.eval()
    with torch.no_grad():
        ours = model.token_losses(features, caps)[0]
        ids, mask, labels, places = model.layout(caps)
        assert (mask[:, 1:] > mask[:, :-1]).any()  # some pad precedes a token
        embeds = model.embed(features, ids, places)
        logits = model.lm(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1]
        targets = labels[:, 1:]
        expected = torch.nn.functional.cross_entropy(logits[targets != -100], targets[targets != -100], reduction="none")
        unmasked = model.lm.get_output_embeddings()(model.run_blocks(embeds, None)[:, :-1][targets != -100])
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, torch.nn.functional.cross_entropy(unmasked, targets[targets != -100],
                                                                      reduction="none"), atol=1e-3)


# Runs --train with an inductor pass that refuses every backward graph (the only graphs whose inputs
# include incoming gradients, "tangents"): forward graphs compile, the backward compile fails.
FAILING_BACKWARD = """
import sys
import torch._inductor.config
sys.path.insert(0, sys.argv[1])
import multimodal_transfer_learning as mtl

def refuse_backward(graph):
    if any(node.op == "placeholder" and node.name.startswith("tangents") for node in graph.nodes):
        raise RuntimeError("no kernels for this backward graph")

torch._inductor.config.post_grad_custom_pre_pass = refuse_backward
sys.exit(mtl.main(["--train"]))
"""

# The shapes of test_training.py's compiled-losses test (TOP_K=1, 7 rows): inductor's caches then serve
# both, which keeps the suite's compile time flat.
COMPILED = {"TOP_K": "1", "BATCH_SIZE": "7", "EVAL_BATCH_SIZE": "7", "EPOCHS": "1"}


@pytest.fixture(scope="module")
def compiled_runs(shared_env) -> dict:
    """One-epoch --train runs side by side: with a backward that fails to compile (COMPILE=1), and COMPILE=max."""
    _, env = shared_env
    envs = {"failing backward": env("failing-backward", COMPILE="1", **COMPILED), "max": env("max", COMPILE="max", **COMPILED)}
    commands = {"failing backward": ["-c", FAILING_BACKWARD, str(ROOT)], "max": [str(SCRIPT), "--train"]}
    runs = parallel({name: lambda name=name: subprocess.run([sys.executable, *commands[name]], env=envs[name], text=True,
                                                            capture_output=True, timeout=600)
                     for name in envs})
    return {name: (runs[name], Path(envs[name]["OUTPUT_DIR_MODELS"])) for name in envs}


def test_a_backward_that_fails_to_compile_falls_back_in_one_line_and_the_run_finishes(compiled_runs):
    res, models = compiled_runs["failing backward"]
    assert res.returncode == 0, explain(res)
    failed = [line for line in text(res).splitlines() if "torch.compile failed" in line]
    assert len(failed) == 1 and "no kernels for this backward graph" in failed[0] and "continuing eager" in failed[0]
    assert "Traceback" not in res.stderr and "graphs compiled" not in res.stderr  # eager from then on
    assert (models / "1_clip_top1.pt").is_file()


def test_compile_max_on_cpu_compiles_as_1_does_and_counts_its_graphs_after_the_first_epoch(compiled_runs):
    """On CPU CUDA graphs do not exist: one line says so and the fast path runs without them. The fixture's
    captions all fall in the shortest length bucket: a frozen and a trained block, for training and for
    validation, make 4 graphs."""
    res, models = compiled_runs["max"]
    assert res.returncode == 0, explain(res)
    out = text(res)
    assert "COMPILE=max: CUDA graphs need a CUDA GPU, so on cpu it compiles as COMPILE=1 does" in out
    assert "fast path: 4 graphs compiled for training and validation so far" in out, out[-3000:]
    assert "torch.compile failed" not in out and (models / "1_clip_top1.pt").is_file()
