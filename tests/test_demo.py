"""The offline demo: deterministic synthetic data whose captions match the pixels, and a shortened
--train/--test/--caption --demo that runs the real pipeline without network or prompts."""
import json
import os

import pytest

import multimodal_transfer_learning as mtl
from conftest import run_script

AREA_SHARE = {"square": 1.0, "circle": 0.785, "triangle": 0.5}  # of the shape's bounding box


@pytest.mark.parametrize("index", range(12))
def test_demo_images_are_deterministic_and_match_their_captions(index):
    image, colour, shape = mtl.demo_sample(index, seed=42)
    again, colour2, shape2 = mtl.demo_sample(index, seed=42)
    assert image.tobytes() == again.tobytes() and (colour, shape) == (colour2, shape2)
    fill = mtl.DEMO_COLOURS[colour]
    painted = [(x, y) for y in range(64) for x in range(64) if image.getpixel((x, y)) == fill]
    xs, ys = [p[0] for p in painted], [p[1] for p in painted]
    box = (max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1)
    share = len(painted) / box
    assert min(AREA_SHARE, key=lambda s: abs(AREA_SHARE[s] - share)) == shape, (shape, share)
    captions = [mtl.demo_caption(t, colour, shape) for t in mtl.DEMO_TEMPLATES]
    assert len(set(captions)) == 5 and all(colour in c and shape in c for c in captions)


def test_other_seed_gives_other_data():
    assert [mtl.demo_sample(i, 1)[1:] for i in range(20)] != [mtl.demo_sample(i, 2)[1:] for i in range(20)]


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
