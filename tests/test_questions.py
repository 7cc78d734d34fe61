"""Questions (QA_DATASET): VQAv2's accuracy against hand-worked cases, question sources and their bad rows,
the split by image shared with the captions, sequences with several images (Frozen-style solved examples),
answers generated left-padded and stopped at a newline, QA_MIX training pairs, a QA_MIX=0 run unchanged,
and the outputs of --train, --test and --ask with questions; the demo's questions."""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import random

import datasets
import numpy
import pytest
import torch

import multimodal_transfer_learning as mtl
import workflow_tools as tools
from conftest import (COLOURS, SHAPES, draw, explain, parallel, run_script, text, wandb_records, write_image_folder)

# ---------------------------------------------------------------------------------------------
# The metric, against cases worked out by hand from VQAv2's evaluation rules
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, normalised", [
    ("Yes!", "yes"),                  # punctuation touching the end goes, and lower case
    ("the red one", "red 1"),         # articles go, number words become digits
    ("Two dogs.", "2 dogs"),          # a period not in a number goes
    ("3.5", "3.5"),                   # one in a number stays
    ("black/white", "black white"),   # punctuation between words becomes a space
    ("black / white", "black white"),
    ("1,000", "1000"),                # a comma inside a number glues it
    ("dont", "don't"),                # contractions get their apostrophe back
    ("couldnt've", "couldn't've"),
    ("none", "0"),
    ("  An   apple ", "apple"),
])
def test_answers_are_normalised_as_vqav2_does(raw, normalised):
    assert mtl.normalize_answer(raw) == normalised


def test_ten_answers_score_over_the_ten_leave_one_out_subsets():
    answers = ["red"] * 3 + ["dark red"] * 2 + ["blue"] * 5
    # "Red.": leaving out one of the 3 "red" leaves 2 matches (2/3), leaving out any other 3 (1): (3 * 2/3 + 7) / 10
    assert mtl.vqa_accuracy("Red.", answers) == pytest.approx(0.9)
    # "dark red": 2 of the subsets keep 1 match (1/3), 8 keep 2 (2/3): (2/3 + 16/3) / 10
    assert mtl.vqa_accuracy("dark red", answers) == pytest.approx(0.6)
    assert mtl.vqa_accuracy("blue", answers) == pytest.approx(1.0)  # 4 or 5 matches: capped at 1 in every subset
    assert mtl.vqa_accuracy("green", answers) == 0
    # one annotator said "two" (normalised "2"), nine "3": 9 subsets hold that one match (1/3), 1 none
    assert mtl.vqa_accuracy("2", ["two"] + ["3"] * 9) == pytest.approx(0.3)


def test_fewer_answers_need_an_exact_match_after_normalisation():
    assert mtl.vqa_accuracy("The Circle", ["circle"]) == 1
    assert mtl.vqa_accuracy("circles", ["circle"]) == 0
    assert mtl.vqa_accuracy("three", ["blue", "3"]) == 1


def test_vqa_metrics_average_per_question_and_per_type():
    q = [mtl.Question("a", "what colour?", ["red"], "colour", "a"), mtl.Question("a", "how many?", ["2"], "count", "a"),
         mtl.Question("b", "how many?", ["3"], "count", "b")]
    metrics, answered = mtl.vqa_metrics(q, ["Red", "two", "2"])
    assert metrics == {"VQA-acc": pytest.approx(2 / 3), "VQA-acc/colour": 1.0, "VQA-acc/count": 0.5}
    assert [a["accuracy"] for a in answered] == [1.0, 1.0, 0.0] and answered[2]["answers"] == ["3"]


# ---------------------------------------------------------------------------------------------
# Question sources and their bad rows
# ---------------------------------------------------------------------------------------------

def question_rows(n: int, image="img/{i:03d}.png") -> list[dict]:
    """Two questions per image of `write_images` (whose colour and shape follow from the index)."""
    rows = []
    for i in range(n):
        colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        rows += [{"image": image.format(i=i), "question": "what colour is it?", "answers": [colour] * 10,
                  "question_type": "what colour"},
                 {"image": image.format(i=i), "question": "what shape is it?", "answers": [shape], "question_type": "shape"}]
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_csv_file_with_answer_lists_or_one_answer_relative_to_qa_image_dir(config_from_env, tmp_path, image_folder):
    path = tmp_path / "qa.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["picture", "q", "a"])
        writer.writerow(["img/001.png", "What colour is it?", json.dumps(["green", "green", "dark green"])])
        writer.writerow(["img/002.png", "  what   shape? ", "circle"])
    cfg = config_from_env(qa_dataset=path, qa_image_dir=image_folder, qa_image_column="picture",
                          qa_question_column="q", qa_answers_column="a")
    questions, store, skipped = mtl.load_questions(cfg)
    assert skipped == {} and [q.answers for q in questions] == [["green", "green", "dark green"], ["circle"]]
    assert questions[0].answer == "green" and questions[1].question == "what shape?" and questions[1].type == ""
    assert questions[1].ref == str(image_folder / "img/002.png") and store.open(questions[1].ref).size == (48, 48)
    with pytest.raises(mtl.UserError) as e:
        mtl.load_questions(dataclasses.replace(cfg, qa_answers_column="answers"))
    assert "QA_ANSWERS_COLUMN" in str(e.value) and e.value.exit_code == 2


def test_a_hub_dataset_with_vqav2_answers(config_from_env, tmp_path, monkeypatch):
    """VQAv2's layout: answers as a list of {"answer", "answer_confidence"}, an image id, a question type."""
    table = {"image": [draw("red", "circle"), draw("blue", "square")], "question": ["what colour?", "what is it?"],
             "answers": [[{"answer": "red", "answer_confidence": "yes"}] * 10,
                         [{"answer": "square", "answer_confidence": "maybe"}, {"answer": "box", "answer_confidence": "no"}]],
             "image_id": [7, 9], "question_type": ["what color", "what is"]}
    datasets.Dataset.from_dict(table).cast_column("image", datasets.Image()).save_to_disk(tmp_path / "hub")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.load_from_disk(tmp_path / "hub"))
    questions, store, skipped = mtl.load_questions(config_from_env(qa_dataset="someone/vqa-like"))
    assert [(q.image_id, q.answers[:2], q.type, q.ref) for q in questions] == [
        ("7", ["red", "red"], "what color", 0), ("9", ["square", "box"], "what is", 1)]
    assert store.open(1).getpixel((24, 24)) == (30, 60, 220)
    with pytest.raises(mtl.UserError) as e:
        mtl.load_questions(config_from_env(qa_dataset="someone/vqa-like", qa_question_column="prompt"))
    assert "QA_QUESTION_COLUMN" in str(e.value) and e.value.exit_code == 2


def test_bad_question_rows_are_skipped_and_reported_and_too_many_stop(tiny_model, tmp_path, image_folder, caplog,
                                                                     monkeypatch):
    rows = question_rows(20)
    rows += [{"image": "", "question": "what colour is it?", "answers": ["red"]},
             {"image": "img/003.png", "question": "  ", "answers": ["red"]},
             {"image": "img/004.png", "question": "what shape is it?", "answers": []},
             {"image": "img/005.png", "question": "what shape is it?", "answers": ["", " "]},
             {"image": "img/missing.png", "question": "what colour is it?", "answers": ["red"]}]
    cfg, encoder, model = tiny_model(qa_dataset=write_jsonl(tmp_path / "qa.jsonl", rows), qa_image_dir=image_folder,
                                     max_bad_fraction=0.2)
    questions = mtl.load_questions(cfg)
    assert questions[2] == {"row 41": "no image", "row 42": "empty question", "row 43": "no answer",
                            "row 44": "no answer"}
    monkeypatch.setattr(mtl.log, "propagate", True)  # to caplog, whatever an in-process main() set
    with caplog.at_level(logging.WARNING, logger="mtl"):
        splits, _, _ = mtl.prepare_data(cfg, mtl.load_records(cfg), encoder, model, questions)
    warning = next(r.getMessage() for r in caplog.records if "question rows" in r.getMessage())
    assert warning.startswith("skipped 5 of 45 question rows: row 41 (no image); row 42 (empty question)")
    assert sum(len(s.questions) for s in splits.values()) == 40
    with pytest.raises(mtl.UserError) as e:  # 5 of 45 is 11%
        mtl.prepare_data(dataclasses.replace(cfg, max_bad_fraction=0.1), mtl.load_records(cfg), encoder, model,
                         mtl.load_questions(cfg))
    assert "11.1% of the question rows" in str(e.value) and "MAX_BAD_FRACTION=0.1" in str(e.value)


# ---------------------------------------------------------------------------------------------
# The split: by image, shared with the captions
# ---------------------------------------------------------------------------------------------

def test_questions_split_by_image_and_no_val_or_test_image_reaches_training(tiny_model, tmp_path, image_folder):
    """40 caption images, asked about under another path to the same files, and 30 images only asked about."""
    extra = write_image_folder(tmp_path / "extra", 30)
    rows = question_rows(40, image="images/../images/img/{i:03d}.png") + question_rows(30, image="extra/img/{i:03d}.png")
    cfg, encoder, model = tiny_model(qa_dataset=write_jsonl(tmp_path / "qa.jsonl", rows), qa_mix=0.5)
    splits, by_id, _ = mtl.prepare_data(cfg, mtl.load_records(cfg), encoder, model, mtl.load_questions(cfg))
    caption_split = {i: name for name, s in splits.items() for i in s.ids}
    asked = {name: {q.image_id for q in s.questions} for name, s in splits.items()}
    for name, ids in asked.items():
        shared = {i for i in ids if i.startswith("images/")}
        assert {caption_split[i.removeprefix("images/../images/")] for i in shared} <= {name}  # the caption split
    own = {name: len({i for i in ids if i.startswith("extra/")}) for name, ids in asked.items()}
    assert own == {"train": 24, "val": 3, "test": 3} and extra.is_dir()
    assert all(len(s.questions) == 2 * len(asked[name]) for name, s in splits.items())  # an image's questions together
    held_out = asked["val"] | asked["test"] | {f"images/../images/{i}" for i in splits["val"].ids + splits["test"].ids}
    assert not held_out & asked["train"]

    # what an epoch trains on: the train split's caption pairs, then question pairs of train images only
    epoch, prompts = mtl.epoch_pairs(model, splits["train"], cfg, epoch=1)
    train_rows = {id(t) for t in splits["train"].features.rows + splits["train"].qa_features.rows}
    assert {id(epoch.features.rows[r]) for r, _ in epoch.pairs} <= train_rows
    others = {id(t) for name in ("val", "test") for t in splits[name].features.rows + splits[name].qa_features.rows}
    assert not {id(epoch.features.rows[r]) for r, _ in epoch.pairs} & others


# ---------------------------------------------------------------------------------------------
# Sequences with several images, and QA_MIX pairs
# ---------------------------------------------------------------------------------------------

def qa_text(model, question: str, answer: str | None = None) -> list[int]:
    return model.tokenize_prompt(mtl.ask_text(question, answer))


def test_a_two_shot_sequence_with_three_images_is_built_as_by_hand_and_trains_every_image(tiny_model):
    cfg, encoder, model = tiny_model(num_visual_tokens=3, top_k=2)
    model.train()
    shots = [qa_text(model, "what colour is it?", "red"), qa_text(model, "what shape is it?", "circle")]
    prompt, answer = qa_text(model, "what colour is the shape?"), model.tokenize_captions(["blue"], prefix=" ")[0]
    features = torch.randn(3, encoder.dim, generator=torch.Generator().manual_seed(0), requires_grad=True)

    ids, mask, labels, places = model.layout([answer], [prompt], [shots])
    assert places.tolist() == [[0, 0], [0, 3 + len(shots[0])], [0, 6 + len(shots[0]) + len(shots[1])]]
    assert mask.sum() == 9 + len(shots[0]) + len(shots[1]) + len(prompt) + len(answer) == ids.shape[1]
    assert labels[0][labels[0] != -100].tolist() == answer  # the answer and EOS only

    visual, table = model.adapter(features), model.lm.get_input_embeddings()
    segments = [visual[0], table(torch.tensor(shots[0])), visual[1], table(torch.tensor(shots[1])), visual[2],
                table(torch.tensor(prompt + answer))]
    embeds = torch.cat(segments)[None]
    expected = torch.full((1, embeds.shape[1]), -100)
    expected[0, -len(answer):] = torch.tensor(answer)
    reference = model.lm(inputs_embeds=embeds, labels=expected).loss
    loss = model.token_losses(features, [answer], [prompt], [shots])[0].mean()
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)

    loss.backward()  # every image's visual tokens reach the loss: the gradient flows back to each one's features
    assert all(features.grad[i].abs().sum() > 0 for i in range(3))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapter.parameters())


def test_rows_with_and_without_solved_examples_score_as_alone(tiny_model):
    """Right padding, causal attention: a row's losses do not depend on the other rows of its batch."""
    _, encoder, model = tiny_model(num_visual_tokens=2)
    model.eval()
    g = torch.Generator().manual_seed(1)
    features = torch.randn(4, encoder.dim, generator=g)
    shots = [[qa_text(model, "what colour is it?", "red"), qa_text(model, "what is it?", "a big square")], []]
    prompts = [qa_text(model, "what shape?"), qa_text(model, "what colour is it?")]
    answers = model.tokenize_captions(["circle", "green"], prefix=" ")
    with torch.no_grad():
        both, rows = model.token_losses(features, answers, prompts, shots)
        alone = [model.token_losses(features[:3], answers[:1], prompts[:1], shots[:1])[0],
                 model.token_losses(features[3:], answers[1:], prompts[1:], shots[1:])[0]]
    for row in range(2):
        torch.testing.assert_close(both[rows == row], alone[row], rtol=0, atol=1e-5)


def test_qa_mix_adds_question_pairs_to_the_epoch(tiny_model, tmp_path, image_folder):
    rows = question_rows(40)
    cfg, encoder, model = tiny_model(qa_dataset=write_jsonl(tmp_path / "qa.jsonl", rows), qa_image_dir=image_folder,
                                     qa_mix=0.25, batch_size=8)
    splits, _, _ = mtl.prepare_data(cfg, mtl.load_records(cfg), encoder, model, mtl.load_questions(cfg))
    train = splits["train"]
    n = len(train.pairs)
    m = round(n * 0.25 / 0.75)  # a quarter of the epoch's sequences
    assert mtl.qa_pairs_per_epoch(train, cfg) == m and m < len(train.questions)
    epoch, prompts = mtl.epoch_pairs(model, train, cfg, epoch=1)
    assert epoch.pairs[:n] == train.pairs and prompts[:n] == [model.prompt_ids] * n and len(epoch.pairs) == n + m
    asked = {(id(f), tuple(qa_text(model, q.question))): q for q, f in zip(train.questions, train.qa_features.rows)}
    drawn = [(id(epoch.features.rows[row]), tuple(prompt)) for (row, _), prompt in zip(epoch.pairs[n:], prompts[n:])]
    for (_, target), key in zip(epoch.pairs[n:], drawn):  # a question about a train image, its answer the target
        assert target == model.tokenize_captions([asked[key].answer], prefix=" ")[0]
    assert len(set(drawn)) == m  # no repeats yet
    assert mtl.epoch_pairs(model, train, cfg, epoch=2)[1][n:] != prompts[n:]  # another draw each epoch
    steps = list(mtl.optimizer_steps(model, train, cfg, 1))
    assert sum(len(c) for s in steps for _, c, _ in s) == n + m == len(steps) * 8 - (-(n + m) % 8)

    unmixed = dataclasses.replace(cfg, qa_mix=0.0)
    assert mtl.epoch_pairs(model, train, unmixed, 1) == (train, None)  # QA_MIX=0: the captions alone, as before


def test_qa_settings_without_a_question_source_are_refused(config_from_env):
    for setting in ({"qa_mix": 0.3}, {"qa_shots": 2}):
        with pytest.raises(mtl.UserError) as e:
            mtl.load_questions(config_from_env(**setting))
        assert "need QA_DATASET" in str(e.value) and e.value.exit_code == 2


# ---------------------------------------------------------------------------------------------
# Answers: left-padded batches, solved examples, a newline ends them
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def manual_answer(model, images, texts, stops, max_new_tokens) -> list[int]:
    """Greedy decoding the slow way for one question: [visual][text]... built by hand, no padding, no KV cache."""
    visual, table = model.adapter(images), model.lm.get_input_embeddings()
    embeds = torch.cat([part for v, t in zip(visual, texts) for part in (v, table(torch.tensor(t, dtype=torch.long)))])[None]
    out = []
    for _ in range(max_new_tokens):
        nxt = int(model.lm(inputs_embeds=embeds).logits[0, -1].argmax())
        if nxt in stops:
            break
        out.append(nxt)
        embeds = torch.cat([embeds, table(torch.tensor([[nxt]]))], dim=1)
    return out


@pytest.mark.parametrize("shots", [0, 2])
def test_answers_in_left_padded_batches_match_a_manual_loop(tiny_model, shots):
    cfg, encoder, model = tiny_model(qa_shots=shots, qa_max_new_tokens=6, eval_batch_size=3)
    model.eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # an LM that says different things to different inputs
        for p in model.lm.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    questions = [mtl.Question(f"q{i}", q, [], "", "") for i, q in
                 enumerate(["what colour?", "what shape is the big one?", "is it red?", "a photo of what?", "what?"])]
    solved = mtl.Split([], [], [], [], [mtl.Question(f"s{i}", f"what {w}?", [a], "", "") for i, (w, a) in
                                        enumerate([("colour", "red"), ("shape", "a square"), ("is it", "the circle")])],
                       torch.randn(3, encoder.dim, generator=g))
    features = torch.randn(5, encoder.dim, generator=g)
    stops = [model.tokenizer.eos_token_id, model.tokenizer.convert_tokens_to_ids("circle")]
    model.__dict__["answer_stops"] = stops  # here "circle" ends an answer, as a newline does for real tokenizers
    got = mtl.answer_questions(model, questions, features, cfg, solved)
    lengths = set()
    for q, f, answer in zip(questions, features, got):
        draw = random.Random(f"{cfg.seed}-{q.image_id}-{q.question}").sample(range(3), shots)
        texts = [qa_text(model, solved.questions[i].question, solved.questions[i].answer) for i in draw]
        texts.append(qa_text(model, q.question))
        lengths.add(sum(map(len, texts)))
        images = torch.stack([solved.qa_features[i] for i in draw] + [f])
        assert answer == model.tokenizer.decode(manual_answer(model, images, texts, stops, 6),
                                                skip_special_tokens=True).strip()
    assert len(lengths) > 1 and len(set(got)) > 1  # the rows needed padding, and the answers differ


def test_a_token_with_a_newline_ends_an_answer(tiny_model, tmp_path):
    lm = tools.save_tiny_lm(tmp_path / "lm", ["caption", ":", "yes", ".\n", "\n\n"], seed=0, hidden_size=16,
                            intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                            head_dim=8)
    _, _, model = tiny_model(lm_model=lm, top_k=1)
    newlines = model.tokenizer.convert_tokens_to_ids([".\n", "\n\n"])
    assert sorted(model.answer_stops) == sorted([model.tokenizer.eos_token_id, *newlines])


# ---------------------------------------------------------------------------------------------
# Runs: QA_MIX=0 unchanged; --train, --test and --ask with questions
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qa_runs(shared_env, trained):
    """On the shared dataset, with two questions per image: "zero" (QA_DATASET, QA_MIX=0, otherwise run A's
    settings) beside "mix" (QA_MIX=0.5, one epoch); then mix's --test and --ask, each with one solved example."""
    root, env = shared_env
    questions = write_jsonl(root / "questions.jsonl", question_rows(40, image="images/img/{i:03d}.png"))
    envs = {"zero": env("qa_zero", QA_DATASET=questions), "mix": env("qa_mix", QA_DATASET=questions, QA_MIX="0.5",
                                                                      EPOCHS="1")}
    runs = parallel({name: lambda e=e: run_script(["--train"], e) for name, e in envs.items()})
    assert runs["mix"].returncode == 0, explain(runs["mix"])
    asked = [str(root / "images" / "img" / f"{i:03d}.png") for i in (0, 5)]
    shot = {**envs["mix"], "QA_SHOTS": "1"}
    runs |= parallel({"test": lambda: run_script(["--test"], shot),
                      "ask": lambda: run_script(["--ask", "What colour is it?", *asked], shot)})
    return {"root": root, "envs": envs, "asked": asked, **runs}


def history(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "models" / "clip_top1.history.jsonl").read_text().splitlines()]


def test_a_qa_mix_0_run_has_the_losses_of_a_captions_only_run(qa_runs, trained):
    res = qa_runs["zero"]
    assert res.returncode == 0, explain(res)
    zero, captions_only = history(qa_runs["root"] / "qa_zero"), history(trained["A"])
    assert [(h["train_loss"], h["val_loss"]) for h in zero] == [(h["train_loss"], h["val_loss"]) for h in captions_only]
    assert all("VQA-acc" in h["val_metrics"] and "VQA-acc" not in a["val_metrics"] for h, a in zip(zero, captions_only))
    assert "train 32 images / 96 captions / 64 questions" in text(res)  # the questions follow the caption split


def test_train_test_and_ask_report_answers(qa_runs):
    folder = qa_runs["root"] / "qa_mix" / "models"
    (epoch,) = history(qa_runs["root"] / "qa_mix")
    assert {"VQA-acc", "VQA-acc/what colour", "VQA-acc/shape", "num_questions"} <= set(epoch["val_metrics"])
    assert torch.load(folder / "1_clip_top1.pt", weights_only=True)["config"]["qa_mix"] == 0.5

    res = qa_runs["test"]
    assert res.returncode == 0, explain(res)
    metrics = json.loads((folder / "1_clip_top1.test.json").read_text())["metrics"]
    answered = [json.loads(line) for line in (folder / "1_clip_top1.test_answers.jsonl").read_text().splitlines()]
    assert len(answered) == metrics["num_questions"] == 8  # 2 questions about each of the 4 test images
    for a in answered:
        assert a["accuracy"] == mtl.vqa_accuracy(a["generated"], a["answers"])
    assert metrics["VQA-acc"] == pytest.approx(sum(a["accuracy"] for a in answered) / 8)
    shape = [a["accuracy"] for a in answered if a["question"] == "what shape is it?"]
    assert metrics["VQA-acc/shape"] == pytest.approx(sum(shape) / 4)
    with open(folder / "results.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert (row["qa_mix"], row["qa_shots"], float(row["VQA-acc"])) == ("0.5", "1", pytest.approx(metrics["VQA-acc"]))
    assert float(row["VQA-acc/what colour"]) == pytest.approx(metrics["VQA-acc/what colour"])
    logged = {item.key or "/".join(item.nested_key) for f in (qa_runs["root"] / "qa_mix" / "wandb").rglob("run-*.wandb")
              for r in wandb_records(f) if r.WhichOneof("record_type") == "history" for item in r.history.item}
    assert {"test/VQA-acc", "test/VQA-acc/shape"} <= logged

    res = qa_runs["ask"]
    assert res.returncode == 0, explain(res)
    lines = res.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == qa_runs["asked"]
    assert all(len(line.split("\t")[1].split()) <= 10 for line in lines)  # QA_MAX_NEW_TOKENS words at most


def test_compare_and_the_model_card_show_vqa_accuracy(qa_runs, tmp_path):
    table = tools.compare_runs([qa_runs["root"] / "qa_mix"], tmp_path)
    header = [h.strip(" |") for h in table.splitlines()[0].split(" | ")]
    assert header.index("VQA-acc/what colour") > header.index("VQA-acc") > header.index("CIDEr")  # metrics, not settings
    assert (tmp_path / "comparison_val_vqa-acc.png").is_file()
    path = qa_runs["root"] / "qa_mix" / "models" / "1_clip_top1.pt"
    tools.export_checkpoint(path, mtl.read_checkpoint(path), tmp_path / "export")
    card = (tmp_path / "export" / "README.md").read_text()
    assert "| VQA-acc |" in card and "| VQA-acc/shape |" in card and "QA_MIX" in card


# ---------------------------------------------------------------------------------------------
# The demo's questions
# ---------------------------------------------------------------------------------------------

def test_demo_questions_have_the_answers_the_picture_shows():
    def runs(occupied):  # stretches of True
        return int(occupied[0]) + int((~occupied[:-1] & occupied[1:]).sum())
    for index in range(12):
        image, captions, questions = tools.demo_item("qa", index, seed=3)
        answers = {q["question_type"]: q["answers"] for q in questions}
        pixels = torch.from_numpy(numpy.array(image))  # (64, 64, 3)
        drawn = (pixels != 128).any(-1)  # not the gray background
        count = max(runs(drawn.any(0)), runs(drawn.any(1)))  # the shapes stand in a row or a column, apart
        assert answers["how many"] == [str(count)] and 1 <= count <= 3
        assert {tuple(p) for p in pixels[drawn].tolist()} == {tools.DEMO_COLOURS[answers["what colour"][0]]}
        ys, xs = drawn.nonzero(as_tuple=True)
        centre = (xs.float().mean().item(), ys.float().mean().item())
        nearest = min(tools.DEMO_PLACES, key=lambda p: sum((a - b) ** 2 for a, b in zip(tools.DEMO_PLACES[p], centre)))
        assert answers["where"] == [nearest]
        assert all(answers["what shape"][0] in c and tools.DEMO_WHERE[nearest] in c for c in captions)
