"""Training: every (image, caption) pair is visited once per epoch, the optimizer changes only the
trainable weights with one learning rate per group on a warm-up + cosine schedule, a non-finite loss
or non-finite weights stop the run with the last good checkpoint kept, --resume continues to the
same weights as an uninterrupted run (and refuses another model configuration), and the same SEED
gives bit-identical checkpoints.

Resume, NaN guard and determinism read the shared runs of conftest.py (`trained`): run A, resumed
here from its epoch-1 checkpoint."""
from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest
import torch

import multimodal_transfer_learning as mtl
from conftest import (error_lines, explain, parallel, qformer_checkpoint, run_fast_path_script, run_script, text,
                      wandb_runs, weights)


def test_training_iterates_over_every_caption_pair(tiny_model, image_folder):
    cfg, encoder, model = tiny_model()
    splits, by_id, _ = mtl.prepare_data(cfg, mtl.load_records(cfg), encoder, model)
    train = splits["train"]
    assert len(train.pairs) == sum(len(by_id[i].captions) for i in train.ids) == 3 * len(train.ids)
    seen = [p for feats, caps, _ in mtl.batches(train, 7, mtl.epoch_order(len(train.pairs), 0, 1)) for p in caps]
    assert sorted(map(tuple, seen)) == sorted(tuple(c) for _, c in train.pairs)



def test_prompts_give_each_pair_one_of_them_reproducibly_and_the_batches_carry_them(tiny_model):
    """PROMPTS (what --ask relies on to not overfit one prompt): one prompt drawn per training pair, a
    function of SEED and the epoch; evaluation keeps PROMPT."""
    cfg, _, model = tiny_model(prompts="caption : ; a picture of the shape :", batch_size=8)
    tok = model.tokenizer
    wanted = [tok("caption :", add_special_tokens=False)["input_ids"],
              tok("a picture of the shape :", add_special_tokens=False)["input_ids"]]
    assert model.train_prompt_ids == wanted and model.prompt_ids == tok("caption:", add_special_tokens=False)["input_ids"]
    drawn = mtl.epoch_prompts(model, 200, seed=42, epoch=1)
    assert drawn == mtl.epoch_prompts(model, 200, seed=42, epoch=1) != mtl.epoch_prompts(model, 200, seed=42, epoch=2)
    assert 60 <= drawn.count(wanted[0]) <= 140 and drawn.count(wanted[0]) + drawn.count(wanted[1]) == 200
    split = mtl.Split(ids=[str(i) for i in range(20)], features=torch.randn(20, 24), references=[],
                      pairs=[(i, model.tokenize_captions(["a red circle"])[0]) for i in range(20)])
    steps = list(mtl.optimizer_steps(model, split, cfg, epoch=1))
    carried = [p for step in steps for _, _, prompts in step for p in prompts]
    order = mtl.epoch_order(20, cfg.seed, 1)
    assert carried == [mtl.epoch_prompts(model, 20, cfg.seed, 1)[i] for i in order]
    _, _, none_model = tiny_model()
    assert mtl.epoch_prompts(none_model, 20, 42, 1) is None


def test_a_splits_features_are_gathered_per_batch_in_fp32():
    """FeatureRows: a split's rows of a (memory-mapped, fp16) table, copied only when a batch asks."""
    table = torch.arange(5 * 3 * 2, dtype=torch.float16).reshape(5, 3, 2)
    rows = mtl.FeatureRows([table[i] for i in (4, 0, 2)])
    assert len(rows) == 3 and len(rows.first(2)) == 2
    torch.testing.assert_close(rows[[2, 0]], table[[2, 4]].float(), rtol=0, atol=0)
    torch.testing.assert_close(rows[1:], table[[0, 2]].float(), rtol=0, atol=0)
    torch.testing.assert_close(rows.first(2)[0:2], table[[4, 0]].float(), rtol=0, atol=0)
    assert rows[1].dtype == rows[[1]].dtype == torch.float32 and rows[1].shape == (3, 2)
    assert table[0, 0, 0] == 0 and rows[1].data_ptr() != table[0].data_ptr()  # a copy: the table stays untouched

def test_optimizer_steps_change_only_trainable_weights(tiny_model):
    cfg, _, model = tiny_model(top_k=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = mtl.make_optimizer(model, cfg)
    caps = model.tokenize_captions(["a red circle", "the square is blue", "a photo of a green circle"])
    for _ in range(3):
        model(torch.randn(3, 24), caps).backward()
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


def gradients_at_step(model, opt) -> list[dict[str, torch.Tensor]]:
    """Record the gradients the optimizer sees each time it steps."""
    seen, step = [], opt.step

    def recording_step(*args, **kwargs):
        seen.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)
    opt.step = recording_step
    return seen


def test_each_step_averages_the_micro_batches_it_holds_including_a_short_last_one(tiny_model):
    """GRAD_ACCUM=2 over 3 micro-batches: the first step's gradient is the mean of two micro-batch
    gradients, the last step's is its one micro-batch's gradient (not half of it)."""
    cfg, encoder, model = tiny_model(BATCH_SIZE=4, GRAD_ACCUM=2, GRAD_CLIP=0)
    captions = ["a red circle", "the square is blue", "a photo of a green circle", "a big yellow square"] * 3
    pairs = list(zip(range(12), model.tokenize_captions(captions)))
    split = mtl.Split([f"i{n}" for n in range(12)], torch.randn(12, encoder.dim, generator=torch.Generator().manual_seed(0)),
                      [[c] for c in captions], pairs)
    steps = list(mtl.optimizer_steps(model, split, cfg, 1))
    assert [len(s) for s in steps] == [2, 1]

    def gradient(micro_batch) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(*micro_batch).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    g1, g2, g3 = gradient(steps[0][0]), gradient(steps[0][1]), gradient(steps[1][0])
    model.zero_grad(set_to_none=True)
    opt = mtl.make_optimizer(model, cfg)
    seen = gradients_at_step(model, opt)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    mtl.train_step(model, opt, steps[1], cfg.grad_clip)   # the short step first, on the untouched weights
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state[n])
    mtl.train_step(model, opt, steps[0], cfg.grad_clip)
    assert set(seen[0]) == set(g3) and set(seen[1]) == set(g1)
    for n in g3:
        torch.testing.assert_close(seen[0][n], g3[n], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(seen[1][n], (g1[n] + g2[n]) / 2, rtol=1e-5, atol=1e-7)


def test_compiled_fast_path_gives_the_eager_losses_over_an_epoch(tiny_model):
    """COMPILE=1 on CPU (inductor): the same losses as eager, step by step, within 1e-4 relative."""
    cfg, encoder, eager = tiny_model(TOP_K=1, BATCH_SIZE=7)
    _, _, fast = tiny_model(TOP_K=1, BATCH_SIZE=7)  # the same SEED: the same initial weights
    splits, _, _ = mtl.prepare_data(cfg, mtl.load_records(cfg), encoder, eager)
    fast.use_fast_path(training=True)
    assert fast.fixed_shapes  # it compiled, it did not fall back
    losses = {}
    for name, model in (("eager", eager), ("fast", fast)):
        opt = mtl.make_optimizer(model, cfg)
        model.train()
        losses[name] = [mtl.train_step(model, opt, micro, cfg.grad_clip).item()
                        for micro in mtl.optimizer_steps(model, splits["train"], cfg, 1)]
    assert len(losses["eager"]) == 14  # 32 train images x 3 captions, 7 per step: the last one holds 5 (padded)
    for a, b in zip(losses["eager"], losses["fast"]):
        assert b == pytest.approx(a, rel=1e-4), losses


def test_where_compiling_fails_the_run_warns_once_and_trains_eager(base_env, tmp_path):
    """COMPILE=1 on a setup where inductor cannot build its kernels (no C++ compiler at CXX, a fresh
    inductor cache so nothing compiled earlier is reused): one warning line, then the run trains,
    validates and saves its checkpoint as usual."""
    env = {**base_env, "COMPILE": "1", "CXX": str(tmp_path / "no-such-compiler"), "EPOCHS": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    res = run_script(["--train"], env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("torch.compile failed") == 1, res.stderr[-3000:]
    assert "continuing eager" in res.stderr and "Traceback" not in res.stderr
    assert (Path(env["OUTPUT_DIR_MODELS"]) / "1_clip_top1.pt").is_file()


def test_fast_path_compiles_4_block_graphs_per_length_bucket_for_caption_lengths_1_to_48(base_env):
    """Counted from TORCH_LOGS=recompiles, training and evaluation shapes for every caption length: per
    length bucket a frozen and a trained block, each in training and in evaluation. Dynamo decides the
    graphs (guards on shapes, grad mode and requires_grad); the backend only turns each graph into
    kernels, so the light aot_eager backend stands in for inductor here (the loss equality above runs
    inductor itself)."""
    stderr, buckets = run_fast_path_script({**base_env, "MAX_CAPTION_TOKENS": "47", "BATCH_SIZE": "4",
                                            "EVAL_BATCH_SIZE": "8"})
    recompiles = stderr.count("Recompiling function")
    assert buckets == mtl.LENGTH_BUCKETS and recompiles + 1 == 4 * buckets, (recompiles, buckets)
    assert "torch.compile failed" not in stderr  # more graphs than dynamo's default limit of 8, none ran eager


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [mtl.get_lr_scale(s, 100, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.01


# ---------------------------------------------------------------------------------------------
# Runs resumed from run A's epoch-1 checkpoint
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resumed(trained, shared_env):
    """Runs that start from epoch 1 of A's configuration (D's checkpoint: the newest of its run, so it keeps
    the optimizer state): B = resumed to epoch 2; C = the same with absurd learning rates (the NaN guard);
    plus resumes that must refuse or find nothing to do."""
    root, env = shared_env
    ckpt1 = trained["D"] / "models" / "1_clip_top1.pt"
    for name in ("B", "C"):
        (root / name / "models").mkdir(parents=True)
        shutil.copy(ckpt1, root / name / "models" / ckpt1.name)
    env_b, env_c = env("B"), env("C", LR_ADAPTER="1e30", LR_QWEN="1e30")
    env_a = trained["env_a"]
    jobs = {
        "B run": lambda: run_script(["--train", "--resume"], env_b),
        "C run": lambda: run_script(["--train", "--resume"], env_c),
        "finished": lambda: run_script(["--train", "--resume"], env_a),
        "other TOP_K": lambda: run_script(["--train", "--resume", "--checkpoint", str(ckpt1)], {**env_a, "TOP_K": "2"}),
        "older epoch": lambda: run_script(["--train", "--resume", "--checkpoint",
                                           str(trained["A"] / "models" / "1_clip_top1.pt")], env_a),
        "other NUM_VISUAL_TOKENS": lambda: run_script(["--train", "--resume"], {**env_a, "NUM_VISUAL_TOKENS": "3",
                                                                                 "EPOCHS": "3"}),
    }
    return {"B": root / "B", "C": root / "C", "ckpt1_sha": hashlib.sha256(ckpt1.read_bytes()).hexdigest(),
            **parallel(jobs)}


# ---------------------------------------------------------------------------------------------
# Numerical guard
# ---------------------------------------------------------------------------------------------

def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(resumed):
    res = resumed["C run"]
    assert res.returncode == 1, explain(res)
    out = text(res)
    assert "LR_ADAPTER=1e+30 (checkpoint: 0.001)" in out  # the new learning rate applies, and it is said so
    (line,) = error_lines(res)
    assert re.search(r"loss became (nan|inf|-inf) at step \d+ \(epoch 2\)", line), line
    models = resumed["C"] / "models"
    assert sorted(p.name for p in models.glob("*.pt")) == ["1_clip_top1.pt"]
    assert hashlib.sha256((models / "1_clip_top1.pt").read_bytes()).hexdigest() == resumed["ckpt1_sha"]
    assert all(torch.isfinite(w).all() for w in weights(models / "1_clip_top1.pt").values())
    runs = wandb_runs(resumed["C"] / "wandb")
    assert [r["exit_code"] for rs in runs.values() for r in rs] == [1], runs


def test_the_nan_guard_stops_a_qformer_run_and_keeps_its_last_good_checkpoint(qformer_runs):
    res = qformer_runs["clip", "nan"]
    assert res.returncode == 1, explain(res)
    (line,) = error_lines(res)
    assert re.search(r"loss became (nan|inf|-inf) at step \d+ \(epoch 2\)", line), line
    models = qformer_runs["root"] / "clip" / "C" / "models"
    assert [p.name for p in models.glob("*.pt")] == ["1_clip_qformer_top1.pt"]
    assert all(torch.isfinite(w).all() for w in weights(models / "1_clip_qformer_top1.pt").values())


@pytest.mark.parametrize("tuning,overflowing", [("topk", "adapter.net.0.weight"), ("lora", "lora_B")])
def test_non_finite_weights_after_a_finite_loss_are_never_checkpointed(tiny_model, tuning, overflowing):
    """The last step of an epoch can have a finite loss but non-finite gradients (an overflow): the epoch
    must not end as if all were well, or its checkpoint would hold NaN weights. The weight guard watches
    the adapter, and the LoRA matrices as it watches blocks."""
    cfg, encoder, model = tiny_model(batch_size=64, tuning=tuning)
    captions = ["a red circle", "a blue square", "the circle is green", "a photo of a yellow square"]
    pairs = list(zip(range(4), model.tokenize_captions(captions)))
    split = mtl.Split([f"i{n}" for n in range(4)], torch.randn(4, encoder.dim), [[c] for c in captions], pairs)
    opt = mtl.make_optimizer(model, cfg)
    for name, p in model.named_parameters():
        if overflowing in name:
            p.register_hook(lambda g: g * float("inf"))  # its gradient overflows, the loss stays finite
    with pytest.raises(mtl.UserError) as err:
        mtl.train_epoch(model, opt, split, cfg, 1, {"step": 0}, mtl.NoRun())
    assert re.search(rf"weights became non-finite \([^)]*{overflowing}[^)]*\) by step 1", str(err.value)), str(err.value)


# ---------------------------------------------------------------------------------------------
# Exact resume
# ---------------------------------------------------------------------------------------------

def test_resume_gives_the_same_weights_as_an_uninterrupted_run(trained, resumed):
    res = resumed["B run"]
    assert res.returncode == 0, explain(res)
    assert "resuming from" in text(res) and "epoch 2/2" in text(res) and "epoch 1/2" not in text(res)
    d1 = torch.load(trained["D"] / "models" / "1_clip_top1.pt", weights_only=True)
    a2 = torch.load(trained["A"] / "models" / "2_clip_top1.pt", weights_only=True)
    b2 = torch.load(resumed["B"] / "models" / "2_clip_top1.pt", weights_only=True)
    assert set(a2["model"]) == set(b2["model"])
    diff = max((a2["model"][k] - b2["model"][k]).abs().max().item() for k in a2["model"])
    assert diff <= 1e-6, f"max weight difference {diff}"
    assert not torch.equal(d1["model"]["adapter.net.0.weight"], b2["model"]["adapter.net.0.weight"])  # it trained
    assert b2["step"] == a2["step"] and b2["epoch"] == 2
    for (ka, sa), (kb, sb) in zip(sorted(a2["optimizer"]["state"].items()), sorted(b2["optimizer"]["state"].items())):
        for name in sa:
            assert torch.allclose(torch.as_tensor(sa[name]), torch.as_tensor(sb[name]), atol=1e-6), (ka, name)
    assert b2["metrics"]["loss"] == pytest.approx(a2["metrics"]["loss"], abs=1e-6)
    # the same W&B run continues
    assert b2["wandb_run_id"] == d1["wandb_run_id"]
    runs = wandb_runs(resumed["B"] / "wandb")
    assert list(runs) == [d1["wandb_run_id"]], runs


def test_resuming_a_finished_run_says_so(resumed, trained):
    res = resumed["finished"]
    assert res.returncode == 0, explain(res)
    assert "nothing to resume" in text(res)
    assert sorted(p.name for p in (trained["A"] / "models").glob("*.pt")) == ["1_clip_top1.pt", "2_clip_top1.pt"]


@pytest.mark.parametrize("case,needle", [("other TOP_K", "TOP_K=2 (checkpoint: 1)"),
                                         ("other NUM_VISUAL_TOKENS", "NUM_VISUAL_TOKENS=3 (checkpoint: 2)")])
def test_resume_with_another_model_configuration_names_the_difference(resumed, case, needle):
    res = resumed[case]
    assert res.returncode == 2, explain(res)
    (line,) = error_lines(res)
    assert needle in line and "--resume" in line, line


@pytest.mark.parametrize("kind", ["clip", "vit"])
def test_qformer_resumes_to_the_weights_of_an_uninterrupted_run(qformer_runs, kind):
    res = qformer_runs[kind, "resume"]
    assert res.returncode == 0, explain(res)
    assert "resuming from" in text(res) and "epoch 1/2" not in text(res)
    a1, a2, d2 = (qformer_checkpoint(qformer_runs, kind, name, epoch) for name, epoch in (("A", 1), ("A", 2), ("D", 2)))
    assert set(a2["model"]) == set(d2["model"]) and d2["step"] == a2["step"]
    diff = max((a2["model"][k] - d2["model"][k]).abs().max().item() for k in a2["model"])
    assert diff <= 1e-6, f"max weight difference {diff}"
    assert not torch.equal(a1["model"]["adapter.queries"], d2["model"]["adapter.queries"])  # it trained


def test_resuming_a_qformer_checkpoint_with_adapter_mlp_names_the_difference(qformer_runs):
    res = qformer_runs["clip", "as mlp"]
    assert res.returncode == 2, explain(res)
    (line,) = error_lines(res)
    assert "ADAPTER='mlp' (checkpoint: 'qformer')" in line and "--resume" in line, line


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------

def test_same_seed_gives_bit_identical_checkpoints(trained):
    name = "1_clip_top1.pt"  # D stopped after epoch 1 (its epoch 2 is compared through the resume above)
    a, d = weights(trained["A"] / "models" / name), weights(trained["D"] / "models" / name)
    assert set(a) == set(d) and a
    different = [k for k in a if not torch.equal(a[k], d[k])]
    assert not different, f"{name}: {different}"


def test_only_the_newest_checkpoint_keeps_the_resume_state(trained, resumed):
    """Older epochs keep their weights (enough for --test) but not AdamW's moments, which would double them."""
    older = torch.load(trained["A"] / "models" / "1_clip_top1.pt", weights_only=True)
    newest = torch.load(trained["A"] / "models" / "2_clip_top1.pt", weights_only=True)
    assert "optimizer" not in older and "rng" not in older and older["model"] and older["epoch"] == 1
    assert "optimizer" in newest and "rng" in newest
    assert set(older["model"]) == set(newest["model"])
    res = resumed["older epoch"]
    assert res.returncode == 2, explain(res)
    (line,) = error_lines(res)
    assert "1_clip_top1.pt keeps only weights" in line and "newest checkpoint" in line, line
