"""Generation and the commands that publish it: greedy/beam/sample decoding against a hand-written
decoding loop, --caption on every kind of image file (and bad ones), and what --test writes."""
from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import multimodal_transfer_learning as mtl
from conftest import draw, run_script


def scramble(model, seed: int = 0) -> None:
    """Re-draw the LM's weights large enough that its output depends on the image: the random init
    is nearly the identity and just repeats the last prompt token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.lm.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed" in name else 0.3))


def make_eos_likely(model, factor: float) -> None:
    """Lengthen the EOS embedding (tied to the head), so some captions stop early and some don't."""
    with torch.no_grad():
        model.lm.get_input_embeddings().weight[model.tokenizer.eos_token_id] *= factor


@torch.no_grad()
def manual_greedy(model, features: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding the slow, obvious way: the whole sequence through the LM at every step (no KV
    cache), one image at a time, stopping at EOS. Returns the new token ids without the EOS."""
    eos, rows = model.tokenizer.eos_token_id, []
    for f in features:
        embeds, ids = model.prefix_embeds(f[None]), []
        for _ in range(max_new_tokens):
            nxt = int(model.lm(inputs_embeds=embeds).logits[0, -1].argmax())
            if nxt == eos:
                break
            ids.append(nxt)
            embeds = torch.cat([embeds, model.lm.get_input_embeddings()(torch.tensor([[nxt]]))], dim=1)
        rows.append(ids)
    return rows


@pytest.fixture
def decoder(tiny_model):
    """A tiny captioner whose captions depend on the image and end at different lengths."""
    cfg, encoder, model = tiny_model(PROMPT="caption :", NO_REPEAT_NGRAM=0, MAX_NEW_TOKENS=8, EVAL_BATCH_SIZE=16)
    scramble(model)
    make_eos_likely(model, 1.5)
    model.eval()
    features = torch.randn(12, encoder.dim, generator=torch.Generator().manual_seed(1))
    return cfg, model, features


def test_greedy_generation_matches_a_manual_loop_and_stops_at_eos(decoder):
    cfg, model, features = decoder
    expected = manual_greedy(model, features, cfg.max_new_tokens)
    lengths = [len(ids) for ids in expected]
    # The check means something only if captions end at EOS at different points, some immediately.
    assert min(lengths) < cfg.max_new_tokens and max(lengths) == cfg.max_new_tokens, lengths
    assert len(set(lengths)) >= 3, lengths
    got = mtl.generate_captions(model, features, cfg)
    assert got == [model.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in expected]
    # The returned text is only the new tokens: never the prompt, never EOS or what follows it.
    prompt = model.tokenizer.decode(model.prompt_ids)
    assert prompt == "caption :" and not any(t.startswith("caption :") for t in got)
    assert all(model.tokenizer.eos_token not in t for t in got)


def test_raw_generate_returns_only_new_tokens(decoder):
    """What `Captioner.generate` relies on: HF generate with inputs_embeds returns just the new ids."""
    cfg, model, features = decoder
    prefix = model.prefix_embeds(features)
    out = model.lm.generate(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                            max_new_tokens=cfg.max_new_tokens, do_sample=False,
                            eos_token_id=model.tokenizer.eos_token_id, pad_token_id=model.tokenizer.eos_token_id)
    assert out.shape[1] <= cfg.max_new_tokens
    for row, ids in zip(out.tolist(), manual_greedy(model, features, cfg.max_new_tokens)):
        assert row[: len(ids)] == ids


def test_batch_size_does_not_change_captions(decoder):
    cfg, model, features = decoder
    assert mtl.generate_captions(model, features, dataclasses.replace(cfg, eval_batch_size=5)) == \
        mtl.generate_captions(model, features, cfg)


def test_beam_search_with_one_beam_is_greedy(decoder):
    cfg, model, features = decoder
    greedy = mtl.generate_captions(model, features, cfg)
    one_beam = dataclasses.replace(cfg, decoding="beam", num_beams=1)
    assert mtl.decoding_kwargs(one_beam)["num_beams"] == 1
    assert mtl.generate_captions(model, features, one_beam) == greedy
    beams = mtl.generate_captions(model, features, dataclasses.replace(cfg, decoding="beam", num_beams=3))
    assert len(beams) == len(greedy) and all(isinstance(t, str) for t in beams)


def test_no_repeat_ngram_applies_to_the_caption(decoder):
    cfg, model, features = decoder
    make_eos_likely(model, 1 / 1.5)  # long captions, which the scrambled LM fills with repeats

    def repeated_bigram(text):
        words = text.split()
        return len(set(zip(words, words[1:]))) < len(words) - 1

    assert any(repeated_bigram(t) for t in mtl.generate_captions(model, features, cfg))
    blocked = mtl.generate_captions(model, features, dataclasses.replace(cfg, no_repeat_ngram=2))
    assert not any(repeated_bigram(t) for t in blocked), blocked


def test_sampling_is_reproducible_per_seed_and_leaves_the_global_rng_alone(decoder):
    cfg, model, features = decoder
    sample = dataclasses.replace(cfg, decoding="sample", temperature=1.5, sample_top_k=0, top_p=1.0)
    assert mtl.decoding_kwargs(sample)["do_sample"] is True
    before = torch.get_rng_state()
    first = mtl.generate_captions(model, features, sample)
    assert torch.equal(torch.get_rng_state(), before)  # training's shuffling/dropout RNG untouched
    torch.manual_seed(1234)  # whatever the global RNG holds, SEED decides
    assert mtl.generate_captions(model, features, sample) == first
    other = mtl.generate_captions(model, features, dataclasses.replace(sample, seed=sample.seed + 1))
    assert other != first
    assert first != mtl.generate_captions(model, features, cfg)  # it really sampled


# ---------------------------------------------------------------------------------------------
# --caption, as a user runs it
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def checkpoint(tiny_model):
    """A checkpoint written by the script's own save_checkpoint, no training run needed. Its trainable
    weights (adapter, top block) are re-drawn large, so captions are not all empty."""
    cfg, _, model = tiny_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad and p.dim() == 2):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return mtl.save_checkpoint(model, mtl.make_optimizer(model, cfg), cfg, 1, 0, {"loss": 0.0}, None)


def write_images(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    base = draw("red", "circle", 64)
    paths = {name: folder / name for name in ("rgb.png", "gray.png", "rgba.png", "palette.png", "cmyk.jpg",
                                               "large.jpg")}
    base.save(paths["rgb.png"])
    base.convert("L").save(paths["gray.png"])
    rgba = base.convert("RGBA")
    rgba.putalpha(0)  # fully transparent but for one opaque square
    rgba.paste((0, 0, 255, 255), (0, 0, 32, 32))
    rgba.save(paths["rgba.png"])
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette.save(paths["palette.png"], transparency=0)
    base.convert("CMYK").save(paths["cmyk.jpg"])
    base.resize((5000, 4000)).save(paths["large.jpg"], quality=70)
    return paths


def test_caption_command_on_every_kind_of_image_and_bad_files(base_env, tmp_path, checkpoint):
    images = write_images(tmp_path / "mine")
    assert {Image.open(p).mode for p in images.values()} == {"RGB", "L", "RGBA", "P", "CMYK"}
    missing = tmp_path / "mine" / "missing.jpg"
    not_an_image = tmp_path / "mine" / "notes.jpg"
    not_an_image.write_text("this is not a JPEG\n")
    good = [str(p) for p in images.values()]
    args = [good[0], str(missing), *good[1:3], str(not_an_image), *good[3:]]

    res = run_script(["--caption", *args], base_env)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    lines = res.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == good  # one line per good image, in order
    assert all(line.count("\t") == 1 for line in lines)
    errors = [line for line in res.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 2, res.stderr[-3000:]
    assert str(missing) in errors[0] and "no such file" in errors[0]
    assert str(not_an_image) in errors[1] and "cannot read image" in errors[1]

    res = run_script(["--caption", *good], base_env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout == "".join(lines[i] + "\n" for i in range(len(good)))  # same captions again
    assert "ERROR" not in res.stderr and "no_repeat_ngram_size" not in res.stderr  # no transformers noise


# ---------------------------------------------------------------------------------------------
# --test: what it writes (test_cli.py covers the train -> test flow itself)
# ---------------------------------------------------------------------------------------------

METRIC_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "Recall@1", "Recall@5",
               "Precision@1", "Precision@5", "T2I-Recall@1", "T2I-Recall@5", "loss", "num_images")


def test_test_command_writes_every_metric_and_one_results_row_per_run(base_env, tmp_path, checkpoint,
                                                                        monkeypatch):
    models = tmp_path / "models"
    res = run_script(["--test"], base_env)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((models / "1_clip_top1.test.json").read_text())
    metrics = result["metrics"]
    assert set(METRIC_KEYS) <= set(metrics)
    java = mtl.shutil.which("java") is not None
    assert isinstance(metrics["METEOR"], float) if java else metrics["METEOR"] is None
    n_test = result["num_test_images"]
    assert n_test == 4 and metrics["num_images"] == n_test  # 40 images, 10% test; TEST_CAPTION_IMAGES=0: all
    assert metrics["retrieval_pool"] == min(int(base_env["RETRIEVAL_POOL"]), n_test) == 3
    assert result["decoding"] == {"max_new_tokens": 6, "no_repeat_ngram_size": 3, "do_sample": False, "num_beams": 1}
    assert result["epoch"] == 1 and result["checkpoint"].endswith("1_clip_top1.pt")
    assert "retrieval pool 3" in res.stdout and "T2I-Recall@1" in res.stdout

    rows = [json.loads(line) for line in (models / "1_clip_top1.test_captions.jsonl").read_text().splitlines()]
    assert len(rows) == n_test and len({r["image_id"] for r in rows}) == n_test
    assert all(len(r["references"]) == 3 and isinstance(r["generated"], str) for r in rows)

    # Second run without Java (and beam search): METEOR missing, not 0; the rest recomputable from
    # the captions file; the results table gains an aligned row.
    env = {**base_env, "PATH": str(Path(sys.executable).parent), "DECODING": "beam", "NUM_BEAMS": "2"}
    res = run_script(["--test"], env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("Java not found") == 1
    result = json.loads((models / "1_clip_top1.test.json").read_text())
    assert result["metrics"]["METEOR"] is None and result["decoding"]["num_beams"] == 2
    rows = [json.loads(line) for line in (models / "1_clip_top1.test_captions.jsonl").read_text().splitlines()]
    monkeypatch.setenv("PATH", env["PATH"])
    again = mtl.caption_metrics({r["image_id"]: r["generated"] for r in rows},
                                {r["image_id"]: r["references"] for r in rows})
    for key, value in again.items():
        assert result["metrics"][key] == (pytest.approx(value) if value is not None else None), key

    with open(models / "results.csv", newline="") as fh:
        table = list(csv.reader(fh))
    assert len(table) == 3 and table[0] == list(mtl.RESULT_COLUMNS)
    assert all(len(row) == len(table[0]) for row in table)
    first, second = (dict(zip(table[0], row)) for row in table[1:])
    assert first["decoding"] == "greedy" and second["decoding"] == "beam"
    assert second["METEOR"] == "" and (first["METEOR"] != "") == java
    assert first["retrieval_pool"] == second["retrieval_pool"] == "3"
    assert float(second["CIDEr"]) == pytest.approx(result["metrics"]["CIDEr"])
