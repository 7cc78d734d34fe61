"""Evaluation: decoding (greedy against a hand-written decoding loop, beam search, n-gram blocking,
reproducible sampling), caption metrics equal to the COCO toolkit's own numbers with an honest
no-Java fallback (METEOR missing, never 0) and one METEOR JVM for all the calls of a process, retrieval metrics
that match hand-computed answers (ties counted against the model), and retrieval scores that are
mean caption log-likelihoods."""
from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import multimodal_transfer_learning as mtl
import workflow_tools as tools
from conftest import ROOT, prefix_embeds

JAVA = pytest.mark.skipif(not mtl.shutil.which("java"), reason="needs Java (PTB tokenizer, METEOR)")


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

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
        embeds, ids = prefix_embeds(model, f[None]), []
        for _ in range(max_new_tokens):
            nxt = int(model.lm(inputs_embeds=embeds).logits[0, -1].argmax())
            if nxt == eos:
                break
            ids.append(nxt)
            embeds = torch.cat([embeds, model.lm.get_input_embeddings()(torch.tensor([[nxt]]))], dim=1)
        rows.append(ids)
    return rows


@torch.no_grad()
def manual_beam(model, features: torch.Tensor, max_new_tokens: int, num_beams: int,
                length_penalty: float) -> list[list[int]]:
    """Beam search the slow, obvious way, one image at a time, no KV cache: at each step the 2 x beams
    best extensions of the live beams by summed log-probability; an extension that ends in EOS (and
    ranks among the first `num_beams`) is a finished caption, scored sum / length ** length_penalty
    (length counts the EOS); the others fill the next beams. Early stopping: done once `num_beams`
    captions are finished; beams still alive at max_new_tokens are finished as they are. Returns the
    best finished caption's token ids, without the EOS."""
    eos, embed, rows = model.tokenizer.eos_token_id, model.lm.get_input_embeddings(), []
    for f in features:
        prefix = prefix_embeds(model, f[None])
        beams, finished = [(0.0, [])], []  # (summed log-prob, tokens); (score, tokens)
        for _ in range(max_new_tokens):
            candidates = []
            for total, ids in beams:
                embeds = torch.cat([prefix, embed(torch.tensor([ids], dtype=torch.long))], dim=1)
                logp = model.lm(inputs_embeds=embeds).logits[0, -1].float().log_softmax(-1)
                candidates += [(total + logp[t].item(), ids + [t]) for t in range(len(logp))]
            candidates = sorted(candidates, key=lambda c: -c[0])[: 2 * num_beams]
            beams = []
            for rank, (total, ids) in enumerate(candidates):
                if ids[-1] == eos:
                    if rank < num_beams:
                        finished.append((total / len(ids) ** length_penalty, ids[:-1]))
                elif len(beams) < num_beams:
                    beams.append((total, ids))
            finished = sorted(finished, key=lambda c: -c[0])[:num_beams]
            if len(finished) == num_beams:
                break
        else:
            finished += [(total / len(ids) ** length_penalty, ids) for total, ids in beams]
        rows.append(max(finished, key=lambda c: c[0])[1])
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
    prefix = prefix_embeds(model, features)
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


def test_beam_search_matches_a_manual_beam_search(decoder):
    """DECODING=beam gives, for each image, the caption of a hand-written beam search (with the
    width and length penalty of the config), and on this model that is not always the greedy one."""
    cfg, model, features = decoder
    greedy = manual_greedy(model, features, cfg.max_new_tokens)
    for num_beams, length_penalty in ((3, 1.0), (2, 2.0)):
        beam = dataclasses.replace(cfg, decoding="beam", num_beams=num_beams, length_penalty=length_penalty)
        expected = manual_beam(model, features, cfg.max_new_tokens, num_beams, length_penalty)
        assert any(e != g for e, g in zip(expected, greedy)), "beam search is greedy here: the check means nothing"
        got = mtl.generate_captions(model, features, beam)
        assert got == [model.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in expected], beam


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
# Caption metrics
# ---------------------------------------------------------------------------------------------

# Six images, five Flickr30k-style references each: capitals, commas, full stops, hyphens,
# possessives, contractions, quotes, a number.
REFERENCES = {
    "1000092795.jpg": ["Two young guys with shaggy hair look at their hands while hanging out in the yard.",
                       "Two young, White males are outside near many bushes.",
                       "Two men in green shirts are standing in a yard.",
                       "A man in a blue shirt standing in a garden.",
                       "Two friends enjoy time spent together."],
    "10002456.jpg": ["Several men in hard hats are operating a giant pulley system.",
                     "Workers look down from up above on a piece of equipment.",
                     "Two men working on a machine wearing hard hats.",
                     "Four men on top of a tall structure.",
                     "Three men on a large rig."],
    "1000268201.jpg": ["A child in a pink dress is climbing up a set of stairs in an entry way.",
                       "A little girl in a pink dress going into a wooden cabin.",
                       "A little girl climbing the stairs to her playhouse.",
                       "A little girl climbing into a wooden playhouse.",
                       "A girl going into a wooden building."],
    "1000344755.jpg": ["Someone in a blue shirt and hat is standing on stairs and leaning against a window.",
                       "A man in a blue shirt is standing on a ladder cleaning windows.",
                       "A man on a ladder cleans the window of a tall building.",
                       "Man in blue shirt and jeans on ladder cleaning windows",
                       "A man on a ladder cleans a window"],
    "1000366164.jpg": ["Two men, one in a gray shirt, one in a black shirt, standing near a stove.",
                       "Two guy cooking and joking around with the camera.",
                       "Two men in a kitchen cooking food on a stove.",
                       "Two men are at the stove preparing food.",
                       "Two men are cooking a meal."],
    "1001633352.jpg": ["A dog's owner throws a red ball; the dog doesn't catch it!",
                       "A brown dog in a T-shirt runs after a \"red\" ball.",
                       "The dog isn't catching the ball, it's 3.5 feet away.",
                       "A well-trained dog chases its owner's ball across the grass.",
                       "A dog runs on the grass."],
}
PREDICTIONS = {
    "1000092795.jpg": "Two men are standing in a yard.",
    "10002456.jpg": "A group of men in hard hats working on a machine.",
    "1000268201.jpg": "A little girl in a pink dress climbs the stairs.",
    "1000344755.jpg": "A man on a ladder is cleaning a window.",
    "1000366164.jpg": "Two women are cooking in a kitchen!",
    "1001633352.jpg": "A brown dog doesn't catch the red ball.",
}
# One more image whose captions PTB tokenizes unlike the Python fallback ("&", brackets, "U.S."),
# so the comparison with the toolkit proves that the Java tokenizer is the one used.
PTB_REFERENCES = {**REFERENCES, "1003163366.jpg": [
    "A man & a woman (smiling) walk past the U.S. Capitol.",
    "Two tourists (a man & a woman) in Washington, D.C.",
    "A couple walks in front of the U.S. Capitol building.",
    "A man and a woman are walking outside.",
    "People walking near a large white building."]}
PTB_PREDICTIONS = {**PREDICTIONS, "1003163366.jpg": "A man & a woman (tourists) near the U.S. Capitol."}
PERFECT = {k: refs[2] for k, refs in PTB_REFERENCES.items()}  # each prediction is one of its references


def coco_toolkit(prediction_sets: list[dict], references: dict) -> list[dict]:
    """What pycocoevalcap's COCOEvalCap computes (minus SPICE): PTB tokenization, then the scorers.
    One METEOR JVM for all sets; it takes ~7 s to load."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    meteor, results = Meteor(), []
    for preds in prediction_sets:
        gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in references[k]] for k in preds})
        res = PTBTokenizer().tokenize({k: [{"caption": preds[k]}] for k in preds})
        bleu, _ = Bleu(4).compute_score(gts, res)
        results.append({**{f"BLEU-{n + 1}": b for n, b in enumerate(bleu)},
                        "METEOR": meteor.compute_score(gts, res)[0],
                        "ROUGE-L": Rouge().compute_score(gts, res)[0],
                        "CIDEr": Cider().compute_score(gts, res)[0]})
    del meteor  # its __del__ stops the JVM
    return results


def meteor_jvms() -> list[int]:
    """Live child processes of this one that run METEOR (zombies have an empty cmdline)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"meteor" in cmdline:
            found.append(int(stat.parent.name))
    return found


@pytest.fixture
def mtl_log():
    """Records of the script's logger (it does not propagate to the root logger once set up)."""
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    old_level = mtl.log.level
    mtl.log.addHandler(handler)
    mtl.log.setLevel(logging.INFO)
    yield records
    mtl.log.removeHandler(handler)
    mtl.log.setLevel(old_level)


@pytest.fixture
def no_java(tmp_path, monkeypatch, mtl_log):
    """A PATH on which `java` cannot be found, and the once-per-process warning re-armed."""
    empty = tmp_path / "empty_path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(mtl, "_JAVA_WARNED", False)
    assert mtl.shutil.which("java") is None
    return mtl_log


@JAVA
def test_caption_metrics_equal_the_coco_toolkit_and_keep_one_jvm():
    expected, expected_perfect = coco_toolkit([PTB_PREDICTIONS, PERFECT], PTB_REFERENCES)
    got = mtl.caption_metrics(PTB_PREDICTIONS, PTB_REFERENCES)
    jvms = meteor_jvms()
    got_perfect = mtl.caption_metrics(PERFECT, PTB_REFERENCES)
    assert len(jvms) == 1 and meteor_jvms() == jvms, "a second METEOR JVM was started"

    assert list(got) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    for key, value in expected.items():
        assert isinstance(got[key], float) and got[key] == pytest.approx(value, abs=1e-9), key
        assert got_perfect[key] == pytest.approx(expected_perfect[key], abs=1e-9), key
    # The predictions are good but imperfect, so every metric sits strictly between the extremes
    # and the perfect set beats it everywhere.
    for key in expected:
        assert 0 < got[key] < got_perfect[key], key
    # What the toolkit says of a perfect prediction: BLEU-n and ROUGE-L are 1, METEOR is < 1 only by
    # its fragmentation penalty, CIDEr-D is not bounded by 1 (IDF weights over these references).
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert got_perfect[key] == pytest.approx(1.0, abs=1e-6), key
    assert 0.9 < got_perfect["METEOR"] <= 1.0
    assert got_perfect["CIDEr"] > 1


def test_python_fallback_tokenizes_ordinary_captions_like_ptb():
    """Without Java, the numbers stay comparable: on ordinary captions the fallback gives the PTB
    tokens (lower case, punctuation dropped, clitics split, hyphenated words and decimals whole)."""
    ptb = {"A dog's owner throws; the dog doesn't catch!": "a dog 's owner throws the dog does n't catch",
           "A brown dog in a T-shirt runs after a \"red\" ball.": "a brown dog in a t-shirt runs after a red ball",
           "The ball isn't close, it's 3.5 feet away.": "the ball is n't close it 's 3.5 feet away",
           "Two young, White males are outside.": "two young white males are outside",
           "The girls' team can't win...": "the girls team ca n't win",
           "  ": ""}
    for caption, tokens in ptb.items():
        assert mtl._simple_tokenize(caption) == tokens, caption


@JAVA
def test_python_fallback_agrees_with_ptb_on_the_test_captions():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    captions = {k: REFERENCES[k] + [PREDICTIONS[k]] for k in REFERENCES}
    java = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    assert {k: [mtl._simple_tokenize(c) for c in v] for k, v in captions.items()} == java


def test_without_java_meteor_is_missing_and_the_rest_are_numbers(no_java):
    first = mtl.caption_metrics(PREDICTIONS, REFERENCES)
    second = mtl.caption_metrics(PERFECT, PTB_REFERENCES)
    assert first["METEOR"] is None and second["METEOR"] is None  # missing, never 0
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert isinstance(first[key], float) and 0 < first[key] < second[key], key
    assert second["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    warnings = [r.getMessage() for r in no_java if "Java" in r.getMessage()]
    assert len(warnings) == 1 and "METEOR" in warnings[0], warnings  # said once, not per call
    assert "missing" in mtl.format_table(first).split("METEOR")[1].splitlines()[0]


@JAVA
def test_fallback_numbers_equal_java_numbers_on_ordinary_captions(tmp_path, monkeypatch):
    """BLEU, ROUGE-L and CIDEr from the Python fallback equal those on PTB (Java) tokens when the
    tokens agree, so a run without Java is comparable except for the missing METEOR."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in REFERENCES[k]] for k in PREDICTIONS})
    res = PTBTokenizer().tokenize({k: [{"caption": PREDICTIONS[k]}] for k in PREDICTIONS})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    expected = {**{f"BLEU-{n + 1}": b for n, b in enumerate(bleu)}, "ROUGE-L": Rouge().compute_score(gts, res)[0],
                "CIDEr": Cider().compute_score(gts, res)[0]}
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    fallback = mtl.caption_metrics(PREDICTIONS, REFERENCES)
    assert fallback["METEOR"] is None
    for key, value in expected.items():
        assert fallback[key] == pytest.approx(value, abs=1e-9), key


@JAVA
def test_a_dying_meteor_jvm_is_reported_missing_and_never_hangs_the_process(tmp_path):
    """A JVM that cannot start (here: a `java` that fails like one without room for its 2 GB heap)
    yields METEOR = None with a warning, and the process still exits: pycocoevalcap's __del__
    would otherwise wait forever on the lock the failed call left held."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "java").write_text("#!/bin/sh\necho 'Could not reserve enough space for object heap' >&2\nexit 1\n")
    (fake / "java").chmod(0o755)
    code = ("import multimodal_transfer_learning as mtl\n"
            "print('METEOR', mtl._meteor({'1': ['a dog runs']}, {'1': ['a dog runs']}))\n")
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "METEOR None" in res.stdout
    assert "METEOR failed" in res.stderr and "missing" in res.stderr


# ---------------------------------------------------------------------------------------------
# Retrieval metrics on hand-built score matrices
# ---------------------------------------------------------------------------------------------

def owners(*counts: int) -> torch.Tensor:
    """owner vector for images 0..N-1 with counts[i] captions each, captions grouped by image."""
    return torch.tensor([i for i, c in enumerate(counts) for _ in range(c)])


def test_a_model_that_scores_its_own_captions_best_gets_full_marks():
    g = torch.Generator().manual_seed(0)
    owner = owners(2, 3, 1, 2)
    scores = torch.randn(4, len(owner), generator=g) - 10
    scores[owner, torch.arange(len(owner))] = torch.rand(len(owner), generator=g)  # every own caption above every other
    m = mtl.retrieval_metrics(scores, owner)
    assert m["Recall@1"] == m["Precision@1"] == m["T2I-Recall@1"] == 1.0
    assert m["Recall@5"] == m["T2I-Recall@5"] == 1.0
    # top 5 holds all own captions (2, 3, 1, 2) and then others: precision = mean(own / 5)
    assert m["Precision@5"] == pytest.approx((2 + 3 + 1 + 2) / 5 / 4)


def test_precision_at_5_is_1_when_five_own_captions_rank_top():
    owner = owners(5, 5, 5)
    noise = 0.01 * torch.randn(3, 15, generator=torch.Generator().manual_seed(0))
    scores = torch.where(owner[None, :] == torch.arange(3)[:, None], 1.0, 0.0) + noise
    m = mtl.retrieval_metrics(scores, owner)
    assert m["Precision@5"] == 1.0 and m["Precision@1"] == 1.0


def test_ties_are_broken_against_the_model():
    # A constant scorer knows nothing: with wrong candidates first among equals it retrieves nothing
    # at K=1. 3 images x 2 captions: each image's 4 wrong captions come first, then its 2 own ones.
    owner = owners(2, 2, 2)
    m = mtl.retrieval_metrics(torch.zeros(3, 6), owner)
    assert m["Recall@1"] == m["Precision@1"] == m["T2I-Recall@1"] == 0.0
    assert m["Recall@5"] == 1.0 and m["Precision@5"] == pytest.approx(1 / 5)  # rank 5 is the first own one
    assert m["T2I-Recall@5"] == 1.0  # only 3 images: rank 3 <= 5
    # An own caption tied with a wrong one at the top does not count at K=1, whatever the column order.
    for order in ([0, 1, 2], [1, 0, 2], [2, 1, 0]):
        owner = torch.tensor([0, 1, 1])[order]
        scores = torch.tensor([[5.0, 5.0, 1.0], [0.0, 3.0, 3.0]])[:, order]
        m = mtl.retrieval_metrics(scores, owner)
        assert m["Recall@1"] == 0.5, order   # image 0 loses its tie; image 1's top two are both its own
        assert m["Precision@1"] == 0.5, order


def test_a_hand_computed_mixed_case():
    # 3 images; captions 0,1 -> image 0; 2,3 -> image 1; 4 -> image 2.
    owner = torch.tensor([0, 0, 1, 1, 2])
    scores = torch.tensor([
        [0.9, 0.1, 0.8, 0.3, 0.2],   # ranking 0,2,3,4,1 -> own at ranks 1 and 5
        [0.7, 0.2, 0.1, 0.6, 0.5],   # ranking 0,3,4,1,2 -> own at ranks 2 and 5
        [0.1, 0.6, 0.2, 0.4, 0.3],   # ranking 1,3,4,2,0 -> own at rank 3
    ])
    m = mtl.retrieval_metrics(scores, owner)
    assert m["Recall@1"] == pytest.approx(1 / 3)
    assert m["Precision@1"] == pytest.approx(1 / 3)
    assert m["Recall@5"] == 1.0
    assert m["Precision@5"] == pytest.approx((2 / 5 + 2 / 5 + 1 / 5) / 3)
    # Text->image, per caption (column): its image's rank among the 3 images.
    # c0: [0.9,0.7,0.1] img0 rank 1 | c1: [0.1,0.2,0.6] img0 rank 3 | c2: [0.8,0.1,0.2] img1 rank 3
    # c3: [0.3,0.6,0.4] img1 rank 1 | c4: [0.2,0.5,0.3] img2 rank 2
    assert m["T2I-Recall@1"] == pytest.approx(2 / 5)
    assert m["T2I-Recall@5"] == 1.0
    assert set(m) == {"Recall@1", "Recall@5", "Precision@1", "Precision@5", "T2I-Recall@1", "T2I-Recall@5"}


@pytest.mark.parametrize("seed", range(5))
def test_retrieval_invariants_on_random_scores(seed):
    g = torch.Generator().manual_seed(seed)
    n = 12
    counts = torch.randint(1, 6, (n,), generator=g).tolist()
    owner = owners(*counts)
    perm = torch.randperm(len(owner), generator=g)  # caption order must not matter
    scores = torch.randn(n, len(owner), generator=g).round(decimals=1)  # coarse: many ties
    m = mtl.retrieval_metrics(scores, owner)
    assert m["Precision@1"] == m["Recall@1"]  # one candidate at K=1: a hit is both
    assert m["Recall@5"] >= m["Recall@1"] and m["T2I-Recall@5"] >= m["T2I-Recall@1"]
    assert all(0.0 <= v <= 1.0 for v in m.values())
    assert mtl.retrieval_metrics(scores[:, perm], owner[perm]) == m
    # Pessimistic ties: adding a tiny bonus to every wrong candidate changes nothing, because wrong
    # candidates already win every tie.
    own = owner[None, :] == torch.arange(n)[:, None]
    assert mtl.retrieval_metrics(scores + 1e-4 * (~own), owner) == m
    # Brute force Recall@1 / T2I-Recall@1 with the same rule.
    r1 = sum(bool(own[i][scores[i] == scores[i].max()].all()) for i in range(n)) / n
    t1 = sum(bool(scores[owner[c], c] > scores[torch.arange(n) != owner[c], c].max()) for c in range(len(owner)))
    assert m["Recall@1"] == pytest.approx(r1) and m["T2I-Recall@1"] == pytest.approx(t1 / len(owner))


# ---------------------------------------------------------------------------------------------
# Retrieval scores come from the model: mean per-token log-likelihood given image + prompt
# ---------------------------------------------------------------------------------------------

def test_retrieval_scores_are_mean_caption_log_likelihoods(tiny_model):
    cfg, encoder, model = tiny_model(EVAL_BATCH_SIZE=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a less trivial LM than the near-identity random init
        for p in model.lm.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    refs = [["a red circle", "the circle is red"], ["a blue square"], ["a photo of a green circle", "a circle"]]
    records = {f"i{n}": mtl.Record(f"i{n}", r, "") for n, r in enumerate(refs)}
    features = {f"i{n}": torch.randn(encoder.dim, generator=g) for n in range(3)}
    split = mtl.make_split(list(records), features, records, model)
    scores, owner = mtl.retrieval_scores(model, split, pool=2, cfg=cfg)  # pool: the first 2 images only
    assert owner.tolist() == [0, 0, 1] and scores.shape == (2, 3)

    model.eval()
    for i in range(2):
        for m, caption in enumerate(["a red circle", "the circle is red", "a blue square"]):
            ids = model.tokenizer(" " + caption, add_special_tokens=False)["input_ids"] + [model.tokenizer.eos_token_id]
            with torch.no_grad():
                prefix = prefix_embeds(model, split.features[i: i + 1])
                embeds = torch.cat([prefix, model.lm.get_input_embeddings()(torch.tensor([ids]))], dim=1)
                logp = model.lm(inputs_embeds=embeds).logits[0].log_softmax(-1)
            p = prefix.shape[1]
            expected = torch.stack([logp[p - 1 + t, tok] for t, tok in enumerate(ids)]).mean()
            assert scores[i, m].item() == pytest.approx(expected.item(), abs=1e-4), (i, caption)


# ---------------------------------------------------------------------------------------------
# --caption --explain: where the Q-Former's queries look
# ---------------------------------------------------------------------------------------------

def test_heat_colours_run_from_dark_to_bright():
    colours = tools.heat_colours(torch.tensor([0.0, 0.5, 1.0])).tolist()
    assert colours[0] == list(tools.HEAT_STOPS[0]) and colours[-1] == list(tools.HEAT_STOPS[-1])
    brightness = [sum(c) for c in tools.heat_colours(torch.linspace(0, 1, 11)).tolist()]
    assert brightness == sorted(brightness)


def test_attention_picture_puts_the_heat_on_the_attended_patch():
    """Query q looks only at patch (row q, column 3 - q) of a 4 x 4 grid: its panel is brightest there,
    and the mean panel is bright on all four patches of that diagonal."""
    grid, size, V = 4, 224, 4
    attention = torch.zeros(V, 1 + grid * grid)
    for q in range(V):
        attention[q, 1 + q * grid + (grid - 1 - q)] = 1.0
    view = mtl.Image.new("RGB", (32, 32), (128, 128, 128))
    picture = tools.attention_picture(view, attention, grid, "a caption", size=size, columns=4)
    small = 2 * size // 4
    assert picture.size == (2 * size, 20 + size + small)

    def brightest_block(left, top, side):
        block = side // grid
        sums = {(r, c): sum(sum(picture.getpixel((left + c * block + dx, top + r * block + dy)))
                            for dx in (block // 3, 2 * block // 3) for dy in (block // 3, 2 * block // 3))
                for r in range(grid) for c in range(grid)}
        return max(sums, key=sums.get), sums

    for q in range(V):
        (r, c), _ = brightest_block(q * small, 20 + size, small)
        assert (r, c) == (q, grid - 1 - q), q
    _, sums = brightest_block(size, 20, size)
    diagonal = {(q, grid - 1 - q) for q in range(V)}
    assert min(sums[k] for k in diagonal) > max(v for k, v in sums.items() if k not in diagonal)


def test_explain_pictures_of_images_with_one_name_do_not_overwrite_each_other():
    names = tools.explain_names(["a/photo.jpg", "b/photo.png", "photo-2.jpg", "a/photo.jpg"])
    assert names == {"a/photo.jpg": "photo.png", "b/photo.png": "photo-2.png", "photo-2.jpg": "photo-2-2.png"}
