"""Export and the Hugging Face Hub: --export writes the trained parts of run A's checkpoint (see
`trained` in conftest.py: 2 epochs on 40 images, tested, fake HF_TOKEN planted) as model.safetensors,
config.json and a model card; --test, --caption and --ask accept the folder as --checkpoint and give
what the checkpoint gives; --push-to-hub without network or with a rejected token fails in one line
and keeps the export whole."""
from __future__ import annotations

import http.server
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import multimodal_transfer_learning as mtl
import workflow_tools as tools
from conftest import HF_FAKE, draw, error_lines, explain, parallel, run_script, text


@pytest.fixture(scope="module")
def exported(trained, shared_env):
    """Run A's last checkpoint exported (HF_TOKEN still planted), then run from the export and from the
    checkpoint: --caption (both), --ask (with bad paths), and --test of the export into another folder."""
    root, env = shared_env
    folder = root / "export"
    images = folder / "images"
    images.mkdir(parents=True)
    good = []
    for colour, shape in (("red", "circle"), ("blue", "square"), ("yellow", "circle")):
        draw(colour, shape).save(images / f"{colour}.png")
        good.append(str(images / f"{colour}.png"))
    (images / "notes.png").write_text("not an image")
    export = folder / "captioner"
    ckpt = trained["A"] / "models" / "2_clip_top1.pt"
    res = {"export": run_script(["--export", str(export)], trained["env_a"])}
    assert res["export"].returncode == 0, explain(res["export"])
    ask = [good[0], str(images / "missing.png"), good[1], str(images / "notes.png"), good[2]]
    elsewhere = env("export-test")
    res.update(parallel({
        "caption ckpt": lambda: run_script(["--caption", *good, "--checkpoint", str(ckpt)], trained["env_a"]),
        "caption export": lambda: run_script(["--caption", *good, "--checkpoint", str(export)], trained["env_a"]),
        "ask": lambda: run_script(["--ask", "What colour is the shape?", *ask, "--checkpoint", str(export)],
                                  {**trained["env_a"], "LOG_LEVEL": "INFO"}),
        "test export": lambda: run_script(["--test", "--checkpoint", str(export)], elsewhere),
    }))
    return {"folder": export, "ckpt": ckpt, "good": good, "ask paths": ask, **res}


def test_export_holds_the_checkpoints_trained_weights_and_config_without_secrets(exported):
    folder, ckpt = exported["folder"], torch.load(exported["ckpt"], weights_only=True)
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
    tensors = load_file(folder / "model.safetensors")
    assert tensors.keys() == ckpt["model"].keys()
    assert all(torch.equal(tensors[k], ckpt["model"][k]) for k in tensors)
    info = json.loads((folder / "config.json").read_text())
    assert info["format"] == "multimodal_transfer_learning export" and info["epoch"] == 2
    assert info["config"] == ckpt["config"]  # everything the model is rebuilt from (no secrets in either)
    for key in ("vision_encoder", "vision_model", "lm_model", "adapter", "num_visual_tokens", "tuning", "top_k",
                "prompt", "decoding", "max_new_tokens"):
        assert key in info["config"], key
    assert info["images"] == {"train": 32, "val": 4, "test": 4}
    for p in folder.iterdir():
        data = p.read_bytes()
        assert HF_FAKE.encode() not in data and b"hf_token" not in data, p
    assert HF_FAKE not in text(exported["export"])


def test_model_card_gives_the_test_metrics_with_split_and_pool_sizes_settings_and_usage(exported, trained):
    card = (exported["folder"] / "README.md").read_text()
    tested = json.loads((trained["A"] / "models" / "2_clip_top1.test.json").read_text())["metrics"]
    assert card.startswith("---\n") and "pipeline_tag: image-to-text" in card
    assert f"| CIDEr | {tested['CIDEr']:.4f} |" in card and f"| BLEU-4 | {tested['BLEU-4']:.4f} |" in card
    assert "| METEOR | missing |" in card  # these runs have no Java: missing, never 0
    assert "Test split: 4 images" in card and "pool of 3 images" in card
    assert "32 train, 4 validation and 4 test images" in card
    assert "| TOP_K | `1` |" in card and "| EPOCHS | `2` |" in card
    for heading in ("## Metrics", "## Training settings", "## Intended use and limitations", "## Usage"):
        assert heading in card, heading
    assert "--caption --checkpoint DIR" in card and "local folders" in card  # the tiny models are local


def test_an_export_captions_exactly_like_its_checkpoint(exported):
    from_ckpt, from_export = exported["caption ckpt"], exported["caption export"]
    assert from_ckpt.returncode == 0, explain(from_ckpt)
    assert from_export.returncode == 0, explain(from_export)
    assert [line.split("\t")[0] for line in from_export.stdout.splitlines()] == exported["good"]
    assert from_export.stdout == from_ckpt.stdout


def test_test_of_an_export_gives_the_checkpoints_test_metrics(exported, trained):
    res = exported["test export"]
    assert res.returncode == 0, explain(res)
    folder = exported["folder"]
    got = json.loads(Path(f"{folder}.test.json").read_text())  # beside the folder: the export stays as made
    want = json.loads((trained["A"] / "models" / "2_clip_top1.test.json").read_text())
    assert got["metrics"] == want["metrics"] and got["epoch"] == 2
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]


def test_ask_answers_every_readable_image_and_names_each_bad_one(exported):
    res = exported["ask"]
    assert res.returncode == 1, explain(res)
    lines = res.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == exported["good"]
    assert all(line.count("\t") == 1 for line in lines)
    errors = error_lines(res)
    assert len(errors) == 2 and "Traceback" not in res.stderr
    assert exported["ask paths"][1] in errors[0] and "no such file" in errors[0]
    assert exported["ask paths"][3] in errors[1] and "cannot read image" in errors[1]


def greedy_answer(m, image: Path, prompt: str, max_new_tokens: int) -> str:
    """The answer a plain greedy loop gives, built from the parts alone: [the adapter's visual tokens][the
    prompt's token embeddings], then the LM's most likely token appended again and again, recomputed from
    scratch each step, until EOS, a token holding a newline, or max_new_tokens."""
    tok, lm = m.model.tokenizer, m.model.lm
    with torch.no_grad():
        visual = m.model.adapter(m.encoder(m.encoder.preprocess(Image.open(image))[None]).to(m.device))
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        answer = []
        for _ in range(max_new_tokens):
            text = lm.get_input_embeddings()(torch.tensor([ids + answer], device=m.device))
            nxt = int(lm(inputs_embeds=torch.cat([visual, text], 1)).logits[0, -1].argmax())
            if nxt == tok.eos_token_id or "\n" in tok.decode([nxt]):
                break
            answer.append(nxt)
    return tok.decode(answer, skip_special_tokens=True).strip()


def test_ask_answers_with_the_question_in_the_prompt_as_a_greedy_loop_does(exported, trained):
    """--ask's answer of each image is what greedy decoding after "Question: {question} Answer:" gives; the
    caption prompt gives other words, so an --ask that ignored the question would fail here."""
    m = mtl.load_trained(mtl.load_config(trained["env_a"]), str(exported["folder"]))
    question, limit = "What colour is the shape?", m.cfg.qa_max_new_tokens
    asked = dict(line.split("\t") for line in exported["ask"].stdout.splitlines())
    expected = {path: greedy_answer(m, Path(path), f"Question: {question} Answer:", limit) for path in exported["good"]}
    assert asked == expected
    assert any(greedy_answer(m, Path(p), m.cfg.prompt, limit) != expected[p] for p in exported["good"])


def test_export_replaces_an_earlier_export_and_never_overwrites_another_folder(trained, tmp_path, monkeypatch):
    ckpt_path = trained["A"] / "models" / "1_clip_top1.pt"
    ckpt = mtl.read_checkpoint(ckpt_path)
    folder = tmp_path / "out"
    tools.export_checkpoint(ckpt_path, ckpt, folder)
    assert json.loads((folder / "config.json").read_text())["epoch"] == 1
    # no test run of epoch 1: the card says its numbers are validation numbers
    assert "not been tested yet" in (folder / "README.md").read_text()

    later = mtl.read_checkpoint(trained["A"] / "models" / "2_clip_top1.pt")
    tools.export_checkpoint(trained["A"] / "models" / "2_clip_top1.pt", later, folder)
    assert json.loads((folder / "config.json").read_text())["epoch"] == 2
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp or old folder left beside it

    def broken_card(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tools, "model_card", broken_card)
    with pytest.raises(mtl.UserError, match="No space left"):
        tools.export_checkpoint(ckpt_path, ckpt, folder)
    assert json.loads((folder / "config.json").read_text())["epoch"] == 2  # the earlier export is intact
    assert sorted(os.listdir(tmp_path)) == ["out"]

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(mtl.UserError, match="not an export") as e:
        tools.export_checkpoint(ckpt_path, ckpt, mine)
    assert e.value.exit_code == 2 and os.listdir(mine) == ["notes.txt"]



def test_a_lora_export_rebuilds_the_same_model(tiny_model, tmp_path):
    """Every variant exports its trainable state dict as it is: LoRA weights round-trip too."""
    cfg, _, model = tiny_model(output_dir_models=tmp_path, tuning="lora", lora_rank=2)
    opt = mtl.make_optimizer(model, cfg)
    mtl.train_step(model, opt, [(torch.randn(2, 24), model.tokenize_captions(["a red circle", "a blue square"]),
                                 None)], cfg.grad_clip)
    path = mtl.save_checkpoint(model, opt, cfg, 1, 1, {"loss": 1.0}, None)
    tools.export_checkpoint(path, mtl.read_checkpoint(path), tmp_path / "lora-export")
    exported = mtl.read_checkpoint(tmp_path / "lora-export")
    assert exported["config"]["tuning"] == "lora" and any("lora_" in k for k in exported["model"])
    again = tiny_model(tuning="lora", lora_rank=2)[2]
    mtl.load_weights(again, exported)
    trained = model.state_dict()
    assert all(torch.equal(p, trained[n]) for n, p in again.state_dict().items())
    assert "LoRA (rank 2)" in (tmp_path / "lora-export" / "README.md").read_text()

def test_a_folder_that_is_not_an_export_is_refused_as_checkpoint(tmp_path):
    with pytest.raises(mtl.UserError, match="must be an export written by --export"):
        mtl.read_checkpoint(tmp_path)


@pytest.mark.parametrize("network", ["HF_HUB_OFFLINE=1", "unreachable endpoint"])
def test_push_to_hub_without_network_is_one_line_and_leaves_the_export_complete(trained, tmp_path, network):
    env = {**trained["env_a"], "LOG_LEVEL": "INFO"}  # DEBUG would add the traceback
    if network == "unreachable endpoint":
        del env["HF_HUB_OFFLINE"]
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    folder = tmp_path / "captioner"
    res = run_script(["--export", str(folder), "--push-to-hub", "someone/captioner", "--private"], env)
    assert res.returncode == 1, explain(res)
    (line,) = error_lines(res)
    assert "upload failed" in line and "unreachable" in line and "someone/captioner" in line, line
    assert "Traceback" not in res.stderr and HF_FAKE not in text(res)
    assert sorted(os.listdir(tmp_path)) == ["captioner"]
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
    assert mtl.read_checkpoint(folder)["epoch"] == 2


class _RejectEverything(http.server.BaseHTTPRequestHandler):
    """A hub that answers every request as huggingface.co answers a bad token."""

    def _reject(self):
        body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _reject

    def log_message(self, *args):
        pass


def test_push_to_hub_with_a_rejected_token_is_one_line_that_says_so(trained, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RejectEverything)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {k: v for k, v in trained["env_a"].items() if k != "HF_HUB_OFFLINE"}
        env.update(LOG_LEVEL="INFO", HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}")
        folder = tmp_path / "captioner"
        res = run_script(["--export", str(folder), "--push-to-hub", "someone/captioner"], env)
    finally:
        server.shutdown()
    assert res.returncode == 1, explain(res)
    (line,) = error_lines(res)
    assert "rejected" in line and "HF_TOKEN" in line and "write token" in line, line
    assert HF_FAKE not in text(res) and "Traceback" not in res.stderr
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
