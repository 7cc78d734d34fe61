"""Data: every accepted source gives one record per image with all its captions; the split is by
image, disjoint, complete, 80/10/10 and a function of the ids and SEED only; bad records (missing,
undecodable, caption-less) are skipped and reported, and too many stop the run. The feature cache
holds what the encoder gives and is rebuilt exactly when the encoder, its preprocessing or the
images change."""
from __future__ import annotations

import csv
import io
import json
import random
import re
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

import multimodal_transfer_learning as mtl
from conftest import draw, error_lines, explain, parallel, run_script, text, write_images


def _ids(n):
    return [f"{i:05d}.jpg" for i in range(n)]


# ---------------------------------------------------------------------------------------------
# The split
# ---------------------------------------------------------------------------------------------

def test_split_is_by_image_disjoint_complete_and_80_10_10():
    ids = _ids(1000)
    split = mtl.split_by_image(ids, seed=42)
    train, val, test = (set(split[k]) for k in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(ids)
    assert (len(train), len(val), len(test)) == (800, 100, 100)


def test_split_depends_on_the_set_of_ids_and_seed_only():
    ids = _ids(317)
    shuffled = random.Random(7).sample(ids, len(ids))
    assert mtl.split_by_image(ids, 42) == mtl.split_by_image(shuffled + ids[:5], 42)  # order and duplicates
    assert mtl.split_by_image(ids, 42)["test"] != mtl.split_by_image(ids, 43)["test"]
    sizes = [len(v) for v in mtl.split_by_image(ids, 1).values()]
    assert sum(sizes) == 317 and abs(sizes[0] - 0.8 * 317) <= 1 and abs(sizes[1] - 0.1 * 317) <= 1


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------

def test_image_folder_with_jsonl_groups_captions_per_image(config_from_env, image_folder):
    records, store, no_caption = mtl.load_records(config_from_env(dataset=image_folder))
    assert len(records) == 40 and no_caption == []
    assert all(len(r.captions) == 3 for r in records)
    assert store.open(records[0].ref).mode == "RGB"


def test_image_folder_with_csv_one_row_per_caption(config_from_env, tmp_path):
    folder = tmp_path / "csvset"
    rows = write_images(folder, 6)
    with open(folder / "metadata.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["file_name", "caption"])
        w.writeheader()
        for r in rows:
            for c in r["captions"]:
                w.writerow({"file_name": r["file_name"], "caption": c})
    records, _, _ = mtl.load_records(config_from_env(dataset=folder))
    assert [len(r.captions) for r in records] == [3] * 6
    assert records[0].captions == rows[0]["captions"]


def test_karpathy_json_needs_image_dir_and_reads_sentences(config_from_env, karpathy_json):
    with pytest.raises(mtl.UserError) as e:
        mtl.load_records(config_from_env(dataset=karpathy_json, image_dir=""))
    assert "IMAGE_DIR" in str(e.value)
    records, store, _ = mtl.load_records(config_from_env(dataset=karpathy_json,
                                                         image_dir=karpathy_json.parent / "kimages"))
    assert len(records) == 30 and all(len(r.captions) == 3 for r in records)
    assert store.open(records[3].ref).size == (48, 48)


def test_hub_dataset_with_list_or_string_captions(config_from_env, tmp_path, monkeypatch):
    """A datasets.Dataset of the hub's layout (image, caption list, filename), served by load_dataset."""
    images = [draw("red", "circle"), draw("blue", "square"), draw("green", "circle")]
    table = {"image": images, "caption": [["a red circle", "red round"], ["a blue square"], ["  "]],
             "filename": ["1.jpg", "2.jpg", "3.jpg"]}
    path = tmp_path / "hub"
    datasets.Dataset.from_dict(table, features=datasets.Features({
        "image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string")),
        "filename": datasets.Value("string")})).save_to_disk(path)
    asked = []

    def load_dataset(name, split=None, token=None, **kw):  # the hub's answer for this one dataset
        asked.append((name, split, token))
        return datasets.load_from_disk(path)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    records, store, no_caption = mtl.load_records(config_from_env(dataset="someone/flickr-like",
                                                                  dataset_split="train", hf_token="hf_abcdef"))
    assert asked == [("someone/flickr-like", "train", "hf_abcdef")]
    assert [r.image_id for r in records] == ["1.jpg", "2.jpg"] and no_caption == ["3.jpg"]
    assert records[0].captions == ["a red circle", "red round"]
    assert store.open(records[1].ref).getpixel((24, 24)) == (30, 60, 220)
    with pytest.raises(mtl.UserError) as e:
        mtl.load_records(config_from_env(dataset="someone/flickr-like", caption_column="sentences"))
    assert "CAPTION_COLUMN" in str(e.value) and e.value.exit_code == 2


# ---------------------------------------------------------------------------------------------
# Bad records, in a real --train run
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_data(shared_env):
    """40 good images + a missing file, a truncated PNG, a text file named .png and a row whose captions
    are all blank: 4 of 44 bad (9%)."""
    root, env = shared_env
    folder = root / "bad_images"
    rows = write_images(folder, 40)
    png = io.BytesIO()
    draw("red", "square").save(png, format="PNG")
    (folder / "img" / "corrupt.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (folder / "img" / "text.png").write_text("this is not an image\n")
    draw("blue", "circle").save(folder / "img" / "blank.png")
    rows += [{"file_name": "img/missing.png", "captions": ["a red circle"]},
             {"file_name": "img/corrupt.png", "captions": ["a red square"]},
             {"file_name": "img/text.png", "captions": ["a green circle"]},
             {"file_name": "img/blank.png", "captions": ["", "  "]}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env_ok = env("bad_ok", DATASET=folder, MAX_BAD_FRACTION="0.2", EPOCHS="1")
    env_stop = env("bad_stop", DATASET=folder)
    return {"env ok": env_ok, "env stop": env_stop,
            **parallel({"ok": lambda: run_script(["--train"], env_ok), "stop": lambda: run_script(["--train"], env_stop)})}


BAD_IDS = ("img/missing.png", "img/corrupt.png", "img/text.png", "img/blank.png")


def test_bad_records_are_skipped_and_reported_and_training_proceeds(bad_data):
    res = bad_data["ok"]
    assert res.returncode == 0, explain(res)
    out = text(res)
    assert "skipped 4 of 44 images" in out, explain(res)
    for i in BAD_IDS:
        assert i in out, f"{i} not named in the report"
    sizes = re.search(r"data: train (\d+) images / \d+ captions, val (\d+) images / \d+ captions, test (\d+) images", out)
    assert sizes and sum(map(int, sizes.groups())) == 40, sizes  # all 40 good images, and only those, are used
    ckpt = torch.load(Path(bad_data["env ok"]["OUTPUT_DIR_MODELS"]) / "1_clip_top1.pt", weights_only=True)
    assert ckpt["epoch"] == 1


def test_too_much_bad_data_stops_with_a_clear_error(bad_data):
    res = bad_data["stop"]
    assert res.returncode == 1, explain(res)
    (line,) = error_lines(res)
    assert "9.1%" in line and "MAX_BAD_FRACTION=0.05" in line, line
    assert "Traceback" not in res.stderr
    assert not list(Path(bad_data["env stop"]["OUTPUT_DIR_MODELS"]).glob("*.pt"))


# ---------------------------------------------------------------------------------------------
# The feature cache
# ---------------------------------------------------------------------------------------------

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
    fresh, bad = mtl.encode_records(records, store, encoder, cfg)
    assert not bad and blob["ids"] == [r.image_id for r in records]
    torch.testing.assert_close(blob["features"], fresh, rtol=0, atol=0)
    # and each equals the image encoded on its own (batching changes nothing)
    for i in (0, len(records) - 1):
        single = encoder(encoder.preprocess(store.open(records[i].ref))[None])[0]
        torch.testing.assert_close(feats[records[i].image_id], single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["clip", "vit"])
def test_pooled_features_are_clips_image_embedding_or_vits_cls_token(tiny_model, tiny_clip_dir, tiny_vit_dir, kind):
    """What the MLP adapter reads, against transformers' own definitions of it."""
    from transformers import CLIPModel, ViTModel
    folder = tiny_clip_dir if kind == "clip" else tiny_vit_dir
    _, encoder, _ = tiny_model(vision_encoder=kind, vision_model=folder)
    pixels = torch.stack([encoder.preprocess(draw(c, "circle")) for c in ("red", "blue")])
    with torch.no_grad():
        if kind == "clip":
            expected = CLIPModel.from_pretrained(folder).get_image_features(pixel_values=pixels)
            expected = getattr(expected, "pooler_output", expected)  # transformers 5 may wrap it
        else:
            expected = ViTModel.from_pretrained(folder, add_pooling_layer=False)(pixel_values=pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(encoder(pixels), expected, rtol=1e-5, atol=1e-5)


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


def double_the_projection(model_dir: Path):
    """Fine-tuned elsewhere and saved over the same folder: every CLIP embedding doubles."""
    from transformers import CLIPModel
    clip = CLIPModel.from_pretrained(model_dir)
    with torch.no_grad():
        clip.visual_projection.weight.mul_(2)
    clip.save_pretrained(model_dir)


def change_the_normalisation(model_dir: Path):
    conf = model_dir / "preprocessor_config.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "image_mean": [0.5, 0.5, 0.5]}))


@pytest.mark.parametrize("edit", [double_the_projection, change_the_normalisation])
def test_cache_is_rebuilt_when_the_model_folder_changes(tiny_model, tiny_clip_dir, tmp_path, edit):
    model_dir = tmp_path / "my-clip"
    shutil.copytree(tiny_clip_dir, model_dir)
    cfg, encoder, _ = tiny_model(VISION_MODEL=str(model_dir))
    old_path, old_feats, _, _ = cache_call(cfg, encoder)
    edit(model_dir)
    cfg, encoder, _ = tiny_model(VISION_MODEL=str(model_dir))
    new_path, new_feats, _, _ = cache_call(cfg, encoder)
    assert new_path != old_path
    k = next(iter(new_feats))
    if edit is double_the_projection:
        torch.testing.assert_close(new_feats[k], 2 * old_feats[k], rtol=1e-5, atol=1e-6)
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


# ---------------------------------------------------------------------------------------------
# The patch-token cache (ADAPTER=qformer)
# ---------------------------------------------------------------------------------------------

def mapped_files(tensor: torch.Tensor) -> list[str]:
    """The files whose memory mapping holds the tensor's data (Linux: /proc/self/maps)."""
    ptr, found = tensor.data_ptr(), []
    with open("/proc/self/maps") as fh:
        for line in fh:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= ptr < high and len(fields) >= 6:
                found.append(fields[5])
    return found


def test_patch_cache_holds_the_patch_tokens_in_fp16_read_memory_mapped(tiny_model):
    cfg, encoder, _ = tiny_model(adapter="qformer")
    path, feats, records, store = cache_call(cfg, encoder)
    assert sorted(feats) == sorted(r.image_id for r in records)
    assert path.is_dir() and sorted(p.name for p in path.iterdir()) == ["index.json", "tokens.npy"]
    assert json.loads((path / "index.json").read_text())["bad"] == {}
    for record in (records[0], records[-1]):
        row = feats[record.image_id]
        assert row.dtype == torch.float16 and row.shape == (17, 32)  # CLS + 4 x 4 patches, the tower's width
        fresh = encoder(encoder.preprocess(store.open(record.ref))[None])[0]
        torch.testing.assert_close(row, fresh.half(), rtol=0, atol=0)
        assert mapped_files(row) == [str(path / "tokens.npy")]  # a view of the file, not a copy in RAM
    assert (path / "tokens.npy").stat().st_size >= len(records) * 17 * 32 * 2
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp folder left


def test_pooled_and_patch_caches_of_one_encoder_coexist_and_are_reused(tiny_model):
    cfg_mlp, pooled, _ = tiny_model()
    cfg_q, patches, _ = tiny_model(adapter="qformer")
    pooled_path, pooled_feats, _, _ = cache_call(cfg_mlp, pooled)
    patch_path, patch_feats, _, _ = cache_call(cfg_q, patches)
    assert pooled_path != patch_path and pooled_path.is_file() and patch_path.is_dir()
    before = {p: stamp(p) for p in (pooled_path, patch_path / "tokens.npy")}
    again_pooled, again_pooled_feats, _, _ = cache_call(cfg_mlp, pooled)
    again_patch, again_patch_feats, _, _ = cache_call(cfg_q, patches)
    assert (again_pooled, again_patch) == (pooled_path, patch_path)
    assert {p: stamp(p) for p in before} == before  # read, not rewritten
    k = next(iter(pooled_feats))
    assert pooled_feats[k].shape == (24,) and torch.equal(again_pooled_feats[k], pooled_feats[k])
    assert torch.equal(again_patch_feats[k], patch_feats[k])


def test_patch_cache_is_rebuilt_when_an_image_changes(tiny_model, image_folder):
    cfg, encoder, _ = tiny_model(adapter="qformer")
    old_path, old_feats, records, _ = cache_call(cfg, encoder)
    draw("yellow", "circle").rotate(30).save(records[5].ref)
    new_path, new_feats, _, _ = cache_call(cfg, encoder)
    assert new_path != old_path
    assert not torch.equal(new_feats[records[5].image_id], old_feats[records[5].image_id])
    assert torch.equal(new_feats[records[6].image_id], old_feats[records[6].image_id])


def test_patch_cache_refuses_to_start_on_a_disk_without_room(tiny_model, monkeypatch):
    cfg, encoder, _ = tiny_model(adapter="qformer")
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(mtl.shutil, "disk_usage", lambda path: usage._replace(free=1000))  # a nearly full disk
    with pytest.raises(mtl.UserError) as e:
        cache_call(cfg, encoder)
    message = str(e.value)
    assert "\n" not in message and e.value.exit_code == 1
    assert "patch-token cache needs 43.5 kB" in message and "only 1.0 kB is free" in message  # 40 x 17 x 32 x 2
    assert "CACHE_DIR" in message
    assert list((Path(cfg.cache_dir) / "features").iterdir()) == []  # nothing written


def test_an_interrupted_patch_cache_leaves_nothing_and_is_written_whole_next_time(tiny_model, monkeypatch):
    cfg, encoder, _ = tiny_model(adapter="qformer", eval_batch_size=8)
    calls = []
    encode = mtl.VisionEncoder.forward

    def interrupted(self, pixels):
        calls.append(len(pixels))
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of encoding
        return encode(self, pixels)

    monkeypatch.setattr(mtl.VisionEncoder, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache_call(cfg, encoder)
    assert list((Path(cfg.cache_dir) / "features").iterdir()) == []
    monkeypatch.undo()
    path, feats, records, _ = cache_call(cfg, encoder)
    assert len(feats) == len(records) and all(feats[r.image_id].abs().sum() > 0 for r in records)
