"""The offline demo: deterministic synthetic data whose captions match the pixels, and a shortened
--train/--test/--caption --demo that runs the real pipeline without network or prompts."""
import json
import os

import pytest

import multimodal_transfer_learning as mtl
import workflow_tools as tools
from conftest import run_script

AREA_SHARE = {"square": 1.0, "circle": 0.785, "triangle": 0.5}  # of the shape's bounding box


@pytest.mark.parametrize("index", range(12))
def test_demo_images_are_deterministic_and_match_their_captions(index):
    image, colour, shape = tools.demo_sample(index, seed=42)
    again, colour2, shape2 = tools.demo_sample(index, seed=42)
    assert image.tobytes() == again.tobytes() and (colour, shape) == (colour2, shape2)
    fill = tools.DEMO_COLOURS[colour]
    painted = [(x, y) for y in range(64) for x in range(64) if image.getpixel((x, y)) == fill]
    xs, ys = [p[0] for p in painted], [p[1] for p in painted]
    box = (max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1)
    share = len(painted) / box
    assert min(AREA_SHARE, key=lambda s: abs(AREA_SHARE[s] - share)) == shape, (shape, share)
    captions = [tools.demo_caption(t, colour, shape) for t in tools.DEMO_TEMPLATES]
    assert len(set(captions)) == 5 and all(colour in c and shape in c for c in captions)


def test_other_seed_gives_other_data():
    assert [tools.demo_sample(i, 1)[1:] for i in range(20)] != [tools.demo_sample(i, 2)[1:] for i in range(20)]


def test_short_demo_runs_offline_without_prompting(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HF_"))}
    env.update({"HOME": str(tmp_path), "CACHE_DIR": str(tmp_path / "cache"), "EPOCHS": "1", "DEMO_IMAGES": "120",
                "RETRIEVAL_POOL": "5", "HF_TOKEN": "hf_plantedDemoSecret", "OMP_NUM_THREADS": "1",
                "HF_HUB_OFFLINE": "1", "WANDB_DIR": str(tmp_path)})
    res = run_script(["--train", "--demo"], env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stderr
    assert "not logged in, logging offline" in log and "wandb sync" in log   # no prompt with stdin closed
    assert "parameters:" in log and "trainable" in log and "device: cpu" in log
    assert "before training:" in log and "--test --demo" in log
    assert "hf_plantedDemoSecret" not in log + res.stdout
    ckpt = tmp_path / "cache" / "demo" / "checkpoints" / "1_clip_top3.pt"
    assert ckpt.is_file()

    res = run_script(["--test", "--demo"], env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads(ckpt.with_suffix(".test.json").read_text())["metrics"]
    assert metrics["num_images"] == 12 and metrics["retrieval_pool"] == 5

    image = tmp_path / "cache" / "demo" / "shapes-120-seed42" / "images" / "00000.png"
    res = run_script(["--caption", str(image), "--demo"], env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    path, caption = res.stdout.strip().split("\t")
    assert path == str(image) and caption


# ---------------------------------------------------------------------------------------------
# DEMO_TASK=position: where the shape is, which a pooled embedding blurs and patch tokens keep
# ---------------------------------------------------------------------------------------------

PLACE_REGIONS = {  # where the painted pixels' centre must lie in the 64 x 64 image: (x range, y range)
    "on the left": ((0, 26), (22, 42)), "on the right": ((38, 64), (22, 42)),
    "at the top": ((22, 42), (0, 26)), "at the bottom": ((22, 42), (38, 64))}


@pytest.mark.parametrize("index", range(12))
def test_position_images_are_deterministic_and_their_captions_say_where_the_shape_is(index):
    image, colour, shape, place = tools.demo_position_sample(index, seed=42)
    again = tools.demo_position_sample(index, seed=42)
    assert image.tobytes() == again[0].tobytes() and (colour, shape, place) == again[1:]
    fill = tools.DEMO_COLOURS[colour]
    painted = [(x, y) for y in range(64) for x in range(64) if image.getpixel((x, y)) == fill]
    xs, ys = [p[0] for p in painted], [p[1] for p in painted]
    share = len(painted) / ((max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1))
    assert min(AREA_SHARE, key=lambda s: abs(AREA_SHARE[s] - share)) == shape, (shape, share)
    centre = (sum(xs) / len(xs), sum(ys) / len(ys))
    (where,) = [w for w, ((x0, x1), (y0, y1)) in PLACE_REGIONS.items() if x0 <= centre[0] < x1 and y0 <= centre[1] < y1]
    _, captions, _ = tools.demo_item("position", index, 42)
    assert len(set(captions)) == 5 and all(colour in c and shape in c and where in c for c in captions), captions


def test_position_task_uses_every_place_about_equally():
    places = [tools.demo_position_sample(i, seed=7)[3] for i in range(400)]
    assert {p: places.count(p) for p in set(places)}.keys() == {"left", "right", "top", "bottom"}
    assert min(places.count(p) for p in set(places)) >= 70  # 100 expected each


def test_each_demo_task_gets_its_own_data_language_model_and_checkpoints(tmp_path):
    from transformers import AutoTokenizer
    files = {}
    for task in ("shapes", "position"):
        cfg = mtl.load_config({"CACHE_DIR": str(tmp_path / "cache"), "OUTPUT_DIR_MODELS": str(tmp_path / "models"),
                               "DEMO_TASK": task, "DEMO_IMAGES": "8"})
        files[task] = tools.make_demo_files(cfg)
        assert tools.demo_config(cfg, files[task]).dataset == str(tmp_path / "cache" / "demo" / f"{task}-8-seed42")
    assert files["shapes"]["lm_model"] != files["position"]["lm_model"]
    assert files["shapes"]["checkpoints"] != files["position"]["checkpoints"]
    assert files["shapes"]["vision_model"] == files["position"]["vision_model"]  # the same encoder reads both
    caption = "on the left there is a white triangle"
    unknown = {task: AutoTokenizer.from_pretrained(files[task]["lm_model"]).unk_token_id for task in files}
    assert unknown["position"] not in AutoTokenizer.from_pretrained(files["position"]["lm_model"])(caption)["input_ids"]
    assert unknown["shapes"] in AutoTokenizer.from_pretrained(files["shapes"]["lm_model"])(caption)["input_ids"]


def test_position_demo_trains_a_qformer_and_explains_a_caption(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HF_"))}
    env.update({"HOME": str(tmp_path), "CACHE_DIR": str(tmp_path / "cache"), "EPOCHS": "1", "DEMO_IMAGES": "120",
                "RETRIEVAL_POOL": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
                "DEMO_TASK": "position", "ADAPTER": "qformer"})
    res = run_script(["--train", "--demo"], env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "adapter: qformer, 4 queries x 2 layers cross-attending 17 patch tokens of width 64" in res.stderr
    checkpoints = tmp_path / "cache" / "demo" / "checkpoints-position"
    assert [p.name for p in checkpoints.glob("*.pt")] == ["1_clip_qformer_top3.pt"]

    image = tmp_path / "cache" / "demo" / "position-120-seed42" / "images" / "00000.png"
    res = run_script(["--caption", "--explain", "--demo", str(image)], env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith(f"{image}\t")
    picture = checkpoints / "1_clip_qformer_top3.explain" / "00000.png"
    assert f"where the queries look -> {picture}" in res.stderr
    with mtl.Image.open(picture) as png:
        assert png.size == (448, 20 + 224 + 112)  # 4 queries: one row of four small panels
