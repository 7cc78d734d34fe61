"""Comparing runs (--compare): the Markdown table over hand-made results.csv files (the newest row per
checkpoint and decoding, the settings that differ, the best value per metric marked, 'missing' for a
metric a run lacks), the plots over hand-made histories, and the command's one-line failures."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from PIL import Image

import multimodal_transfer_learning as mtl
import workflow_tools as tools
from conftest import error_lines, explain, run_script


def write_csv(path: Path, rows: list[dict]) -> None:
    """A results.csv as --test writes it: a header, then one row per test run (a missing metric: empty)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(c for r in rows for c in r))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def write_history(path: Path, epochs: list[tuple[int, float, float | None]]) -> None:
    """(epoch, val loss, val CIDEr or None) per line, as --train writes {run}.history.jsonl."""
    path.write_text("".join(json.dumps({"epoch": e, "train_loss": loss + 0.1, "val_loss": loss,
                                        "val_metrics": {"CIDEr": cider, "BLEU-4": 0.1}}) + "\n"
                            for e, loss, cider in epochs))


def row(checkpoint, top_k, epochs, untrained, **metrics):
    return {"checkpoint": checkpoint, "vision_encoder": "clip", "adapter": "mlp", "top_k": top_k,
            "decoding": "greedy", "epochs": epochs, "untrained": untrained, **metrics}


@pytest.fixture
def runs(tmp_path) -> Path:
    """Two folders of hand-made results: folder a tested its checkpoint twice (the second row is the
    newer); folder b holds a run without METEOR (no Java) and its zero-shot baseline. Every metric not
    written here (BLEU-1, ...) is missing everywhere."""
    root = tmp_path / "models"
    write_csv(root / "a" / "results.csv", [
        row("2_clip_top0.pt", 0, 2, "no", loss="2.5", **{"BLEU-4": "0.1", "METEOR": "0.2", "CIDEr": "0.3",
                                                         "Recall@1": "0.4"}),
        row("2_clip_top0.pt", 0, 2, "no", loss="2.4", **{"BLEU-4": "0.11", "METEOR": "0.21", "CIDEr": "0.31",
                                                         "Recall@1": "0.5"}),
    ])
    write_csv(root / "b" / "results.csv", [
        row("untrained_clip_top1", 1, 0, "yes", loss="5.0", **{"BLEU-4": "0.0", "METEOR": "", "CIDEr": "0.01",
                                                               "Recall@1": "0.1"}),
        row("3_clip_top1.pt", 1, 3, "no", loss="2.0", **{"BLEU-4": "0.25", "METEOR": "", "CIDEr": "0.9",
                                                         "Recall@1": "0.5"}),
    ])
    write_history(root / "a" / "clip_top0.history.jsonl", [(1, 2.9, 0.1), (2, 2.6, 0.3)])
    write_history(root / "b" / "clip_top1.history.jsonl", [(1, 2.5, 0.2), (2, 2.2, None), (3, 2.1, 0.8)])
    return root


def parse_table(markdown: str) -> tuple[list[str], list[dict]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    header, body = cells[0], cells[2:]
    assert set(lines[1]) <= set("|-"), lines[1]
    return header, [dict(zip(header, r)) for r in body]


def test_table_has_one_row_per_run_the_settings_that_differ_and_the_best_marked(runs):
    table = tools.compare_runs([runs], runs)
    header, rows = parse_table(table)
    metrics = ["loss", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "Recall@1", "Recall@5",
               "Precision@1", "Precision@5", "T2I-Recall@1", "T2I-Recall@5"]
    # vision_encoder, adapter and decoding are the same everywhere: not shown; no run answered questions: no VQA-acc
    assert header == ["run", "top_k", "epochs", "untrained", *metrics]
    assert [r["run"] for r in rows] == ["a/2_clip_top0", "b/untrained_clip_top1", "b/3_clip_top1"]
    a, zero, b = rows
    assert (a["top_k"], a["epochs"], a["untrained"]) == ("0", "2", "no")
    assert (zero["top_k"], zero["epochs"], zero["untrained"]) == ("1", "0", "yes")
    # a's newer row wins; the best per metric is bold, lowest for the loss, ties all marked
    assert [a["loss"], zero["loss"], b["loss"]] == ["2.4000", "5.0000", "**2.0000**"]
    assert [a["BLEU-4"], zero["BLEU-4"], b["BLEU-4"]] == ["0.1100", "0.0000", "**0.2500**"]
    assert [a["CIDEr"], zero["CIDEr"], b["CIDEr"]] == ["0.3100", "0.0100", "**0.9000**"]
    assert [a["Recall@1"], zero["Recall@1"], b["Recall@1"]] == ["**0.5000**", "0.1000", "**0.5000**"]
    # a metric only one run has is not 'best' of anything; a missing one is 'missing', never 0
    assert [a["METEOR"], zero["METEOR"], b["METEOR"]] == ["0.2100", "missing", "missing"]
    assert {r["BLEU-1"] for r in rows} == {r["T2I-Recall@5"] for r in rows} == {"missing"}


def test_comparison_md_and_the_plots_are_written_into_the_output_folder(runs, tmp_path):
    out = tmp_path / "report"
    table = tools.compare_runs([runs / "a", runs / "b"], out)
    doc = (out / "comparison.md").read_text()
    assert table in doc and "loss: lowest" in doc
    pngs = sorted(p.name for p in out.glob("comparison_*.png"))
    assert pngs == ["comparison_test_metrics.png", "comparison_val_cider.png", "comparison_val_loss.png"]
    for name in pngs:
        assert f"]({name})" in doc
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    # labels are relative to what the runs share: with both folders given they keep their folder names
    assert "| a/2_clip_top0 |" in table and "| b/3_clip_top1 |" in table


def test_histories_alone_give_the_epoch_plots_and_say_no_run_was_tested(tmp_path):
    write_history(tmp_path / "clip_top0.history.jsonl", [(1, 2.9, 0.1), (2, 2.6, 0.3)])
    table = tools.compare_runs([tmp_path], tmp_path)
    assert "no test results yet" in table
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["comparison_val_cider.png", "comparison_val_loss.png"]


def test_a_folder_without_runs_or_that_does_not_exist_is_one_clear_error(tmp_path):
    with pytest.raises(mtl.UserError, match="no results.csv or .*history.jsonl under .*--train.*--test"):
        tools.compare_runs([tmp_path], tmp_path)
    with pytest.raises(mtl.UserError, match="no such folder"):
        tools.compare_runs([tmp_path / "nope"], tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def no_matplotlib(tmp_path) -> str:
    """A PYTHONPATH on which `import matplotlib` fails, as where it is not installed."""
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    return str(shadow.parent)


def test_compare_command_prints_the_table_and_fails_in_one_line_without_matplotlib(runs, base_env, no_matplotlib):
    # DEVICE=cuda as in the .env of a GPU box whose results are compared on a laptop: comparing runs no model
    env = {**base_env, "OUTPUT_DIR_MODELS": str(runs), "DEVICE": "cuda"}
    res = run_script(["--compare"], env)  # default: OUTPUT_DIR_MODELS
    assert res.returncode == 0, explain(res)
    assert "| b/3_clip_top1 |" in res.stdout and "**2.0000**" in res.stdout
    assert (runs / "comparison.md").is_file() and (runs / "comparison_val_loss.png").is_file()

    for p in runs.glob("comparison*"):
        p.unlink()
    res = run_script(["--compare", str(runs)], {**env, "PYTHONPATH": no_matplotlib})
    assert res.returncode == 1, explain(res)
    (line,) = error_lines(res)
    assert "pip install matplotlib" in line and "Traceback" not in res.stderr
    assert not list(runs.glob("comparison*"))  # nothing written before the failure
