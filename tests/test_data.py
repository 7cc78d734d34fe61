"""Data: every accepted source gives one record per image with all its captions, and the split is
by image, disjoint, complete, 80/10/10 and a function of the ids and SEED only."""
import csv
import random

import datasets
import pytest

import multimodal_transfer_learning as mtl
from conftest import draw, write_images


def _ids(n):
    return [f"{i:05d}.jpg" for i in range(n)]


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
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.load_from_disk(path))
    records, store, no_caption = mtl.load_records(config_from_env(dataset="someone/flickr-like"))
    assert [r.image_id for r in records] == ["1.jpg", "2.jpg"] and no_caption == ["3.jpg"]
    assert records[0].captions == ["a red circle", "red round"]
    assert store.open(records[1].ref).getpixel((24, 24)) == (30, 60, 220)
    with pytest.raises(mtl.UserError) as e:
        mtl.load_records(config_from_env(dataset="someone/flickr-like", caption_column="sentences"))
    assert "CAPTION_COLUMN" in str(e.value) and e.value.exit_code == 2


def test_training_iterates_over_every_caption_pair(tiny_model, image_folder):
    cfg, encoder, model = tiny_model()
    splits, by_id, _ = mtl.prepare_data(cfg, encoder, model)
    train = splits["train"]
    assert len(train.pairs) == sum(len(by_id[i].captions) for i in train.ids) == 3 * len(train.ids)
    seen = [p for feats, caps in mtl.batches(train, 7, mtl.epoch_order(len(train.pairs), 0, 1)) for p in caps]
    assert sorted(map(tuple, seen)) == sorted(tuple(c) for _, c in train.pairs)
