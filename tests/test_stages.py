"""Staged training and other test sets: INIT_FROM starts a run from another run's adapter (and the LM weights
both train), FREEZE_ADAPTER trains the LM part only, a sweep's INIT_FROM=@stem orders its stages, skips
finished ones and refuses unknown stems and cycles before anything trains; TEST_DATASET evaluates every image
of another source, under its own result files, and says so in results.csv."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import multimodal_transfer_learning as mtl
from conftest import error_lines, explain, run_script, text, weights, write_image_folder


def save_source(tiny_model, folder: Path, **settings) -> Path:
    """A checkpoint of a tiny model whose trained weights are re-drawn, so that they differ from any fresh
    model's: what INIT_FROM carries over is then visible."""
    cfg, _, model = tiny_model(output_dir_models=folder, **settings)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g))
    return mtl.save_checkpoint(model, mtl.make_optimizer(model, cfg), cfg, 2, 20, {"loss": 1.0}, None)


def block_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


@pytest.mark.parametrize("source_k, target_k", [(1, 2), (2, 1)])
def test_init_from_carries_exactly_what_it_says_and_the_rest_is_a_fresh_seeded_init(tiny_model, tmp_path,
                                                                                    source_k, target_k):
    """Source top-1 -> target top-2: the adapter and block 1 come from the source, block 0 starts as pretrained.
    Source top-2 -> target top-1: block 0, which the target does not train, is left out (its checkpoints
    could not hold it)."""
    source = save_source(tiny_model, tmp_path / "source", top_k=source_k)
    saved = weights(source)
    _, _, fresh = tiny_model(top_k=target_k)
    cfg, _, model = tiny_model(top_k=target_k, init_from=source)
    mtl.start_from(model, cfg)
    top = {1} if target_k == 1 else {0, 1}
    expected = {n for n in saved if n.startswith("adapter.") or block_of(n) in top}
    assert expected and any(n.startswith("adapter.") for n in expected)
    assert any(block_of(n) is not None for n in expected)
    fresh_state = fresh.state_dict()
    for name, value in model.state_dict().items():
        if name in expected:
            assert torch.equal(value, saved[name]), f"{name} was not carried over"
            assert not torch.equal(value, fresh_state[name])
        else:
            assert torch.equal(value, fresh_state[name]), f"{name} is not its fresh seeded value"
    if source_k > target_k:
        left_out = {n for n in saved if block_of(n) == 0}
        assert left_out and not expected & left_out


def test_init_from_an_export_folder_carries_the_same_tensors(tiny_model, tmp_path):
    import workflow_tools as tools
    source = save_source(tiny_model, tmp_path / "source", top_k=1)
    tools.export_checkpoint(source, mtl.read_checkpoint(source), tmp_path / "export")
    cfg, _, model = tiny_model(top_k=1, init_from=tmp_path / "export")
    mtl.start_from(model, cfg)
    for name, value in weights(source).items():
        assert torch.equal(model.state_dict()[name], value), name


@pytest.mark.parametrize("change, named", [({"num_visual_tokens": 3}, "NUM_VISUAL_TOKENS=3 (checkpoint: 2)"),
                                          ({"adapter_hidden": 8}, "ADAPTER_HIDDEN=8 (checkpoint: 16)"),
                                          ({"adapter": "qformer"}, "ADAPTER='qformer' (checkpoint: 'mlp')")])
def test_a_source_of_another_adapter_shape_is_refused_naming_the_difference(tiny_model, tmp_path, change, named):
    source = save_source(tiny_model, tmp_path / "source", top_k=1)
    cfg, _, model = tiny_model(top_k=1, init_from=source, **change)
    with pytest.raises(mtl.UserError) as e:
        mtl.start_from(model, cfg)
    assert e.value.exit_code == 2 and named in str(e.value), str(e.value)


def test_a_missing_source_or_an_unresolved_stem_is_a_configuration_error(tiny_model, tmp_path):
    for value, says in ((tmp_path / "nope.pt", "no such checkpoint or export folder"),
                        ("@stage1", "@stem is for the variant files of a --sweep")):
        cfg, _, model = tiny_model(init_from=value)
        with pytest.raises(mtl.UserError, match=says) as e:
            mtl.start_from(model, cfg)
        assert e.value.exit_code == 2


def test_freeze_adapter_leaves_the_adapter_bit_identical_after_an_epoch(tiny_model, tmp_path):
    cfg, encoder, model = tiny_model(top_k=1, freeze_adapter=1, batch_size=2, output_dir_models=tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    captions = ["a red circle", "a blue square", "the circle is green", "a photo of a yellow square"] * 2
    pairs = list(zip(range(8), model.tokenize_captions(captions)))
    split = mtl.Split([f"i{n}" for n in range(8)], torch.randn(8, encoder.dim), [[c] for c in captions], pairs)
    opt = mtl.make_optimizer(model, cfg)
    assert [g["name"] for g in opt.param_groups] == ["lm"]
    mtl.train_epoch(model, opt, split, cfg, 1, {"step": 0}, mtl.NoRun())
    for name, p in model.named_parameters():
        if name.startswith("adapter."):
            assert torch.equal(p, before[name]), f"{name} changed"
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if block_of(n) == 1)
    # the checkpoint still holds the adapter: --test must rebuild the model as it was trained
    saved = torch.load(mtl.save_checkpoint(model, opt, cfg, 1, 4, {}, None), weights_only=True)
    assert {n for n in saved["model"] if n.startswith("adapter.")} == {n for n in before if n.startswith("adapter.")}


def test_freeze_adapter_with_nothing_else_to_train_is_refused(config_from_env):
    with pytest.raises(mtl.UserError, match="FREEZE_ADAPTER=1 with TOP_K=0 trains nothing") as e:
        config_from_env(freeze_adapter=1, top_k=0)
    assert e.value.exit_code == 2


# ---------------------------------------------------------------------------------------------
# Stages in a sweep, and TEST_DATASET on what they trained
# ---------------------------------------------------------------------------------------------

def write(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


@pytest.fixture(scope="module")
def stages(shared_env):
    """The sweep of stage2 (INIT_FROM=@stage1, TOP_K=1, FREEZE_ADAPTER=1) named before stage1 (TOP_K=0), both
    one epoch; the same sweep again; then --test of stage2 on another image folder (TEST_DATASET)."""
    root, env = shared_env
    e = env("stages")
    files = root / "stages" / "variants"
    stage2 = write(files / "stage2.env", "INIT_FROM=@stage1\nTOP_K=1\nFREEZE_ADAPTER=1\nEPOCHS=1\n")
    stage1 = write(files / "stage1.env", "TOP_K=0\nEPOCHS=1\n")
    models = Path(e["OUTPUT_DIR_MODELS"])
    out = {"models": models, "first": run_script(["--sweep", str(stage2), str(stage1)], e, timeout=600)}
    out["stamps"] = {p.name: p.stat().st_mtime_ns for p in models.rglob("*.pt")}
    out["again"] = run_script(["--sweep", str(stage2), str(stage1)], e)
    other = write_image_folder(root / "stages" / "other-images", 7)
    test_env = {**e, "OUTPUT_DIR_MODELS": str(models / "stage2"), "TOP_K": "1", "TEST_DATASET": str(other)}
    out["other"], out["other_test"] = other, run_script(["--test"], test_env)
    return out


def test_a_stage_runs_after_the_variant_it_starts_from_with_that_variants_last_checkpoint(stages):
    res, models = stages["first"], stages["models"]
    assert res.returncode == 0, explain(res)
    log = text(res)
    assert log.index("variant 1 of 2: ") < log.index("stage1: new") < log.index("stage2: new")
    source = models / "stage1" / "1_clip_top0.pt"
    assert f"stage2: INIT_FROM=@stage1 -> {source}" in log
    assert "loaded 4 tensors (adapter 4, LM 0)" in log  # stage 1 trained the adapter alone
    stage2 = torch.load(models / "stage2" / "1_clip_top1.pt", weights_only=True)
    assert stage2["config"]["init_from"] == str(source) and stage2["config"]["freeze_adapter"] is True
    for name, value in weights(source).items():  # the frozen adapter is stage 1's, bit for bit
        assert torch.equal(stage2["model"][name], value), name
    with open(models / "stage2" / "results.csv", newline="") as fh:
        row = next(csv.DictReader(fh))  # the sweep's --test (a TEST_DATASET row follows it)
    assert row["init_from"] == str(source) and row["freeze_adapter"] == "True"


def test_training_ends_with_a_table_of_its_epochs_as_its_history_has_them(stages):
    log = text(stages["first"])
    history = [json.loads(line) for line in (stages["models"] / "stage2" / "clip_top1.history.jsonl").read_text()
               .splitlines()]
    table = log[log.rindex("per epoch:"):].splitlines()[1:2 + len(history)]
    assert table[0].split() == ["epoch", "train", "loss", "val", "loss", "val", "BLEU-4", "val", "CIDEr", "train", "s"]
    for line, h in zip(table[1:], history):
        cells = line.split()
        assert cells == [str(h["epoch"]), f"{h['train_loss']:.4f}", f"{h['val_loss']:.4f}",
                         f"{h['val_metrics']['BLEU-4']:.4f}", f"{h['val_metrics']['CIDEr']:.4f}",
                         f"{h['train_seconds']:.1f}"], line


def test_rerunning_a_staged_sweep_trains_nothing(stages):
    res = stages["again"]
    assert res.returncode == 0, explain(res)
    log = text(res)
    assert "stage1: finished" in log and "stage2: finished" in log and "epoch 1/" not in log
    assert {p.name: p.stat().st_mtime_ns for p in stages["models"].rglob("*.pt")} == stages["stamps"]


def test_a_cycle_or_an_unknown_stem_is_refused_before_anything_trains(shared_env):
    root, env = shared_env
    e = env("stage-errors")
    files = root / "stage-errors" / "variants"
    a, b = write(files / "a.env", "INIT_FROM=@b\n"), write(files / "b.env", "INIT_FROM=@a\n")
    ok, lost = write(files / "ok.env", "TOP_K=0\n"), write(files / "lost.env", "INIT_FROM=@nope\n")
    for args, says in (([ok, a, b], "start from each other (a.env -> b.env -> a.env)"),
                       ([ok, lost], "lost.env has INIT_FROM=@nope, but no variant file of this sweep is named nope.env")):
        res = run_script(["--sweep", *map(str, args)], e)
        assert res.returncode == 2, explain(res)
        (line,) = error_lines(res)
        assert says in line, line
        assert not Path(e["OUTPUT_DIR_MODELS"]).exists()  # nothing trained, not even the valid variant


def test_test_dataset_evaluates_every_image_of_the_other_source_and_says_so(stages):
    res, other = stages["other_test"], stages["other"]
    assert res.returncode == 0, explain(res)
    folder = stages["models"] / "stage2"
    result = json.loads((folder / "1_clip_top1.on-other-images.test.json").read_text())
    assert result["test_dataset"] == str(other) and result["num_test_images"] == 7
    assert result["metrics"]["num_images"] == 7
    rows = [json.loads(line) for line in (folder / "1_clip_top1.on-other-images.test_captions.jsonl").read_text()
            .splitlines()]
    metadata = [json.loads(line) for line in (other / "metadata.jsonl").read_text().splitlines()]
    assert sorted(r["image_id"] for r in rows) == sorted(m["file_name"] for m in metadata)
    assert (folder / "1_clip_top1.test.json").is_file()  # the sweep's in-domain results are still there
    with open(folder / "results.csv", newline="") as fh:
        in_domain, out_of_domain = list(csv.DictReader(fh))
    assert in_domain["test_dataset"] == "" and out_of_domain["test_dataset"] == str(other)
    assert "7 test images of " + str(other) in res.stdout


def test_a_bad_test_dataset_names_the_test_variables(config_from_env, tmp_path):
    cfg = config_from_env(test_dataset=tmp_path / "missing-folder")
    with pytest.raises(mtl.UserError, match=r"^TEST_DATASET=.*missing-folder: no such image folder"):
        mtl.test_source(cfg)
    (tmp_path / "refs.json").write_text('{"images": []}')
    with pytest.raises(mtl.UserError, match="set TEST_IMAGE_DIR") as e:
        mtl.test_source(config_from_env(test_dataset=tmp_path / "refs.json"))
    assert e.value.exit_code == 2


def test_compare_plots_a_stage_after_the_one_it_starts_from_and_links_every_gallery(stages):
    import workflow_tools as tools
    models = stages["models"]
    assert tools.epochs_before(models / "stage2" / "clip_top1.history.jsonl") == 1  # stage 1 trained one epoch
    assert tools.epochs_before(models / "stage1" / "clip_top0.history.jsonl") == 0
    table = tools.compare_runs([models], models / "report")
    lines = [line for line in table.splitlines() if line.startswith("| stage")]
    assert len(lines) == 3  # stage 1, stage 2 on its test split, stage 2 on the other images
    for line in lines:
        link = line.rstrip(" |").rsplit("(", 1)[1].rstrip(")")
        assert (models / "report" / link).resolve().is_file() and link.endswith(".test_gallery.html"), line
    assert any(".on-other-images.test_gallery.html" in line and str(stages["other"]) in line for line in lines)


def test_the_model_card_says_where_a_stage_started_and_on_which_other_test_set_it_was_tested(stages, tmp_path):
    import workflow_tools as tools
    models = stages["models"]
    path = models / "stage2" / "1_clip_top1.pt"
    tools.export_checkpoint(path, mtl.read_checkpoint(path), tmp_path / "export")
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"starting from `{models / 'stage1' / '1_clip_top0.pt'}` (INIT_FROM) with the adapter frozen" in card
    other = json.loads((models / "stage2" / "1_clip_top1.on-other-images.test.json").read_text())["metrics"]
    assert (f"Out of domain (TEST_DATASET): every image of {stages['other']} (7 images): BLEU-4 "
            f"{other['BLEU-4']:.4f}") in card
    assert "| INIT_FROM |" in card and "| FREEZE_ADAPTER | `True` |" in card
