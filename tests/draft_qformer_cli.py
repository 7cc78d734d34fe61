"""DRAFT (to move into test_cli.py / test_checkpoints.py after the reorg): ADAPTER=qformer end to end, as a
user runs it, for both encoders: train, resume exactly, test, caption and --explain; the NaN guard; a
checkpoint of another adapter."""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import draw, make_env, run_script, write_images
from test_reliability import error_lines, explain, parallel, path_without_java, text, wandb_records

import multimodal_transfer_learning as mtl

ENCODERS = {"clip": ("tiny_clip_dir", 32), "vit": ("tiny_vit_dir", 40)}  # fixture, vision hidden size


@pytest.fixture(scope="module")
def qformer_runs(tmp_path_factory, request, tiny_lm_dir):
    """Per encoder: run A (2 epochs, ADAPTER=qformer), then side by side: B = A's epoch 1 resumed to epoch 2,
    A's --test, A's --caption --explain; for CLIP also C = the resume with absurd learning rates (NaN guard)
    and the resume of A's checkpoint with ADAPTER=mlp."""
    root = tmp_path_factory.mktemp("qformer")
    data = root / "images"
    rows = write_images(data, 40)
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    image = root / "photo.png"
    draw("blue", "circle", 64).save(image)
    path = path_without_java(root / "path")
    out = {}

    def env(kind: str, name: str, **overrides) -> dict[str, str]:
        vision_dir = request.getfixturevalue(ENCODERS[kind][0])
        return make_env(root / kind / name, tiny_lm_dir, vision_dir, data, PATH=path, VISION_ENCODER=kind,
                        ADAPTER="qformer", QFORMER_LAYERS="2", **overrides)

    envs = {(kind, name): env(kind, name, **extra) for kind in ENCODERS
            for name, extra in (("A", {}), ("B", {}), ("C", {"LR_ADAPTER": "1e30", "LR_QWEN": "1e30"}))}
    trained = parallel({kind: (lambda kind=kind: run_script(["--train"], envs[kind, "A"])) for kind in ENCODERS})
    for kind, res in trained.items():
        assert res.returncode == 0, explain(res)
    jobs = {}
    for kind in ENCODERS:
        models = root / kind / "A" / "models"
        ckpt1 = models / f"1_{kind}_qformer_top1.pt"
        for name in ("B", "C"):
            (root / kind / name / "models").mkdir(parents=True)
            shutil.copy(ckpt1, root / kind / name / "models" / ckpt1.name)
        jobs[kind, "resume"] = lambda kind=kind: run_script(["--train", "--resume"], envs[kind, "B"])
        jobs[kind, "test"] = lambda kind=kind: run_script(["--test"], envs[kind, "A"])
        jobs[kind, "explain"] = lambda kind=kind: run_script(["--caption", "--explain", str(image), str(root / "none.png")],
                                                             envs[kind, "A"])
    jobs["clip", "nan"] = lambda: run_script(["--train", "--resume"], envs["clip", "C"])
    ckpt1 = root / "clip" / "A" / "models" / "1_clip_qformer_top1.pt"
    jobs["clip", "as mlp"] = lambda: run_script(["--train", "--resume", "--checkpoint", str(ckpt1)],
                                                {**envs["clip", "A"], "ADAPTER": "mlp"})
    out = {**{(kind, "train"): res for kind, res in trained.items()}, **parallel(jobs)}
    return {"root": root, "image": image, "runs": out}


def wandb_config(run_file: Path) -> dict:
    """The config an offline W&B run recorded: {key: value}."""
    config = {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        items = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        config.update({item.key: json.loads(item.value_json) for item in items})
    return config


def checkpoint(runs, kind, name, epoch) -> dict:
    return torch.load(runs["root"] / kind / name / "models" / f"{epoch}_{kind}_qformer_top1.pt", weights_only=True)


@pytest.mark.parametrize("kind", ENCODERS)
def test_qformer_trains_and_its_checkpoints_carry_the_variant(qformer_runs, kind):
    res = qformer_runs["runs"][kind, "train"]
    width = ENCODERS[kind][1]
    assert f"adapter: qformer, 2 queries x 2 layers cross-attending 17 patch tokens of width {width}" in text(res)
    models = qformer_runs["root"] / kind / "A" / "models"
    assert sorted(p.name for p in models.glob("*.pt")) == [f"1_{kind}_qformer_top1.pt", f"2_{kind}_qformer_top1.pt"]
    ckpt = checkpoint(qformer_runs, kind, "A", 2)
    assert ckpt["config"]["adapter"] == "qformer" and ckpt["config"]["qformer_layers"] == 2
    keys = set(ckpt["model"])
    assert {"adapter.queries", "adapter.blocks.1.cross_attention.in_proj_weight", "adapter.projection.weight"} <= keys
    assert all(k.startswith(("adapter.", "lm.model.layers.1.")) for k in keys), sorted(keys)
    first = checkpoint(qformer_runs, kind, "A", 1)
    assert not torch.equal(first["model"]["adapter.queries"], ckpt["model"]["adapter.queries"])  # it trained
    assert "optimizer" in ckpt and "optimizer" not in first  # only the newest keeps the resume state
    configs = [wandb_config(f) for f in (qformer_runs["root"] / kind / "A" / "wandb").rglob("run-*.wandb")]
    assert len(configs) == 2  # --train and --test
    assert all((c["adapter"], c["qformer_layers"], c["vision_encoder"]) == ("qformer", 2, kind) for c in configs)


@pytest.mark.parametrize("kind", ENCODERS)
def test_qformer_resumes_to_the_weights_of_an_uninterrupted_run(qformer_runs, kind):
    res = qformer_runs["runs"][kind, "resume"]
    assert res.returncode == 0, explain(res)
    assert "resuming from" in text(res) and "epoch 1/2" not in text(res)
    a2, b2 = checkpoint(qformer_runs, kind, "A", 2), checkpoint(qformer_runs, kind, "B", 2)
    assert set(a2["model"]) == set(b2["model"]) and b2["step"] == a2["step"]
    diff = max((a2["model"][k] - b2["model"][k]).abs().max().item() for k in a2["model"])
    assert diff <= 1e-6, f"max weight difference {diff}"


@pytest.mark.parametrize("kind", ENCODERS)
def test_qformer_checkpoint_tests_and_records_its_variant(qformer_runs, kind):
    res = qformer_runs["runs"][kind, "test"]
    assert res.returncode == 0, explain(res)
    models = qformer_runs["root"] / kind / "A" / "models"
    result = json.loads((models / f"2_{kind}_qformer_top1.test.json").read_text())
    assert result["config"]["adapter"] == "qformer" and {"CIDEr", "Recall@1", "loss"} <= set(result["metrics"])
    with open(models / "results.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["checkpoint"] == f"2_{kind}_qformer_top1.pt" and row["adapter"] == "qformer"
    assert row["qformer_layers"] == "2" and row["vision_encoder"] == kind


@pytest.mark.parametrize("kind", ENCODERS)
def test_qformer_captions_and_explains_where_its_queries_look(qformer_runs, kind):
    res = qformer_runs["runs"][kind, "explain"]
    assert res.returncode == 1, explain(res)  # one of the two images does not exist
    (line,) = res.stdout.splitlines()
    path, caption = line.split("\t")
    assert path == str(qformer_runs["image"]) and caption
    picture = qformer_runs["root"] / kind / "A" / "models" / f"2_{kind}_qformer_top1.explain" / "photo.png"
    assert f"where the queries look -> {picture}" in text(res)
    with Image.open(picture) as png:
        assert png.format == "PNG" and png.size == (448, 20 + 224 + 112)  # 2 queries: one row of small panels
    (error,) = error_lines(res)
    assert "none.png: no such file" in error


def test_the_nan_guard_stops_a_qformer_run_and_keeps_the_last_good_checkpoint(qformer_runs):
    res = qformer_runs["runs"]["clip", "nan"]
    assert res.returncode == 1, explain(res)
    (line,) = error_lines(res)
    assert re.search(r"loss became (nan|inf|-inf) at step \d+ \(epoch 2\)", line), line
    models = qformer_runs["root"] / "clip" / "C" / "models"
    assert [p.name for p in models.glob("*.pt")] == ["1_clip_qformer_top1.pt"]


def test_resuming_a_qformer_checkpoint_with_adapter_mlp_names_the_difference(qformer_runs):
    res = qformer_runs["runs"]["clip", "as mlp"]
    assert res.returncode == 2, explain(res)
    (line,) = error_lines(res)
    assert "ADAPTER='mlp' (checkpoint: 'qformer')" in line and "--resume" in line, line
    assert "Traceback" not in res.stderr


def test_the_last_checkpoint_of_another_adapter_is_not_taken(qformer_runs, config_from_env):
    models = qformer_runs["root"] / "clip" / "A" / "models"
    with pytest.raises(mtl.UserError) as e:
        mtl.find_last_checkpoint(config_from_env(output_dir_models=models, adapter="mlp"))
    assert "no checkpoint {epoch}_clip_top1.pt" in str(e.value)
    assert "2_clip_qformer_top1.pt (ADAPTER=qformer)" in str(e.value)
    found = mtl.find_last_checkpoint(config_from_env(output_dir_models=models, adapter="qformer"))
    assert found.name == "2_clip_qformer_top1.pt"


def test_weights_that_do_not_fit_the_model_are_named_in_one_line(qformer_runs, tiny_model):
    """A Q-Former checkpoint whose stored settings were edited to ADAPTER=mlp: its weights fit no MLP."""
    ckpt = checkpoint(qformer_runs, "clip", "A", 2)
    _, _, mlp_model = tiny_model(top_k=1)
    with pytest.raises(mtl.UserError) as e:
        mtl.load_weights(mlp_model, ckpt)
    assert "\n" not in str(e.value) and "lacks 4 trainable weights (e.g. adapter.net.0.bias)" in str(e.value)
    _, _, wider = tiny_model(top_k=1, adapter="qformer", num_visual_tokens=3)
    with pytest.raises(mtl.UserError) as e:
        mtl.load_weights(wider, ckpt)
    assert "adapter.queries is (2, 32) in it, (3, 32) in the model" in str(e.value)
    _, _, shallower = tiny_model(top_k=1, adapter="qformer", qformer_layers=1)
    with pytest.raises(mtl.UserError) as e:
        mtl.load_weights(shallower, ckpt)
    assert "holds 18 weights the model has not (e.g. adapter.blocks.1." in str(e.value)
