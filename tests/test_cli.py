"""End to end, as a user runs it: --train (2 epochs, W&B offline) then --test, in subprocesses."""
import json

import torch

from conftest import run_script


def test_train_then_test_writes_checkpoints_and_results(base_env, tmp_path):
    res = run_script(["--train"], base_env)
    assert res.returncode == 0, res.stderr[-3000:]
    models = tmp_path / "models"
    assert sorted(p.name for p in models.glob("*.pt")) == ["1_clip_top1.pt", "2_clip_top1.pt"]
    ckpt = torch.load(models / "2_clip_top1.pt", weights_only=True)
    keys = set(ckpt["model"])
    assert keys and all(k.startswith(("adapter.", "lm.model.layers.1.")) for k in keys), sorted(keys)
    assert ckpt["epoch"] == 2 and ckpt["config"]["top_k"] == 1 and "loss" in ckpt["metrics"]
    assert "hf_token" not in ckpt["config"] and "wandb_api_key" not in ckpt["config"]

    res = run_script(["--test"], base_env)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((models / "2_clip_top1.test.json").read_text())
    for key in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "Recall@1", "Recall@5", "Precision@1",
                "Precision@5", "loss", "num_images"):
        assert key in result["metrics"], key
    lines = (models / "2_clip_top1.test_captions.jsonl").read_text().splitlines()
    assert len(lines) == result["metrics"]["num_images"] == result["num_test_images"]
    first = json.loads(lines[0])
    assert set(first) == {"image_id", "generated", "references"} and first["references"]
    assert "Recall@1" in res.stdout and "CIDEr" in res.stdout
    assert (models / "results.csv").read_text().count("\n") == 2
