"""The workflow around the recipe in multimodal_transfer_learning.py: sweeps, comparing runs (tables and
plots), exporting a checkpoint (model card, Hugging Face Hub upload), the offline demo's synthetic data
and tiny models, and the pictures of where a Q-Former looks.

The recipe imports this module only when one of these commands runs (--sweep, --compare, --export,
--caption --explain, --demo); training, testing, captioning and asking never need it.
"""
from __future__ import annotations

import base64
import codecs
import csv
import dataclasses
import html
import io
import itertools
import json
import math
import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from dotenv import dotenv_values
from PIL import Image, ImageDraw

# When the recipe runs as a script it is the module __main__, and it registers itself under its own
# name before importing this file (see `workflow_tools` there): this import then gets that very
# module, with its one DIST and its one Config, never a second copy.
import multimodal_transfer_learning as mtl
from multimodal_transfer_learning import (DATA_KEYS, DEFAULT_VISION_MODELS, EXPORT_FORMAT, MODEL_KEYS, SECRET_ENV,
                                          TRAINING_KEYS, Config, InferenceModel, Stopped, UserError, atomic_folder,
                                          atomic_write, chosen_checkpoint, history_path, is_hub_id, load_config, log,
                                          progress_bar, read_checkpoint, read_environment, read_export_info,
                                          read_history, require_package, result_path)


# =============================================================================================
# Export and the Hugging Face Hub
# =============================================================================================
# An export is a folder anyone can use without this machine's files: model.safetensors (the
# checkpoint's trainable weights), config.json (everything to rebuild the model, no secrets) and a
# model card. `read_checkpoint` reads it back as it reads a .pt, so --test, --caption and --ask accept it.


def export_info(path: Path, ckpt: dict) -> dict:
    """config.json of an export: the checkpoint's config, epoch and metrics, the test results written
    beside it ({stem}.test.json) and the split sizes its run's history recorded."""
    run = path.stem.split("_", 1)[-1]  # {epoch}_{run_name}.pt
    history = {row["epoch"]: row for row in read_history(history_path(path.parent, run))}
    test_file = result_path(path, "test")
    test = ckpt.get("test")
    if test_file.is_file():
        test = test_summary(test_file)
    other_sets = sorted(path.parent.glob(result_path(path, "test", "*").name))  # TEST_DATASET results
    return {"format": EXPORT_FORMAT, "format_version": 1, "source_checkpoint": path.name,
            "epoch": ckpt["epoch"], "step": ckpt.get("step"),
            "config": {k: v for k, v in ckpt["config"].items() if k.upper() not in SECRET_ENV},
            "images": history.get(ckpt["epoch"], {}).get("images", ckpt.get("images")),
            "val_metrics": ckpt["metrics"], "test": test,
            "other_tests": [test_summary(f) for f in other_sets]}


def test_summary(test_file: Path) -> dict:
    """What a model card tells of a {stem}.test.json: the metrics, on which images, with which decoding."""
    result = json.loads(test_file.read_text())
    return {k: result.get(k) for k in ("metrics", "num_test_images", "decoding", "test_dataset")}


def export_checkpoint(path: Path, ckpt: dict, folder: Path, repo_id: str | None = None) -> None:
    """Write the export of a checkpoint into `folder`: into a temp folder beside it first, then renamed
    into place, so a failure leaves no half-written export. An earlier export there is replaced;
    any other folder that is not empty is refused."""
    if folder.exists() and read_export_info(folder) is None and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"--export {folder}: it exists and is not an export; choose a new folder "
                        "(an earlier export is replaced, anything else is never overwritten)", exit_code=2)
    from safetensors.torch import save as safetensors_bytes
    info = export_info(path, ckpt)
    weights = safetensors_bytes({k: v.contiguous() for k, v in ckpt["model"].items()}, metadata={"format": "pt"})
    with atomic_folder(folder) as tmp:
        atomic_write(tmp / "model.safetensors", lambda fh: fh.write(weights))
        atomic_write(tmp / "config.json", lambda fh: fh.write(json.dumps(info, indent=2).encode()))
        atomic_write(tmp / "README.md", lambda fh: fh.write(model_card(info, ckpt["model"], repo_id).encode()))


def model_card(info: dict, weights: dict, repo_id: str | None) -> str:
    """README.md of an export: what the model is, its metrics and on which data, how it was trained,
    what it is for and not for, and how to use it."""
    c = info["config"]
    vision = c.get("vision_model") or DEFAULT_VISION_MODELS.get(c["vision_encoder"], "")
    tuning = (f"LoRA (rank {c.get('lora_rank')}) on every block" if c.get("tuning") == "lora"
              else f"its top {c['top_k']} blocks unfrozen")
    front = ["---", "library_name: pytorch", "pipeline_tag: image-to-text", "tags: [image-captioning, multimodal]",
             *([f"base_model: {c['lm_model']}"] if is_hub_id(c["lm_model"]) else []),
             *([f"datasets: [{c['dataset']}]"] if is_hub_id(c["dataset"]) else []), "---"]
    local = not (is_hub_id(c["lm_model"]) and is_hub_id(vision))
    folder = "captioner" if repo_id else "DIR"
    return "\n".join([
        *front, "",
        f"# {info['source_checkpoint']}: an image captioner built on {c['lm_model']}", "",
        f"A frozen vision encoder ({c['vision_encoder']}: `{vision}`) -> a trained {c['adapter']} adapter -> "
        f"{c['num_visual_tokens']} visual tokens -> `{c['lm_model']}` with {tuning}, trained for {info['epoch']} "
        f"epochs ({info['step']} optimizer steps) on (image, caption) pairs with `multimodal_transfer_learning.py`"
        f"{stage_note(c)}. "
        f"Only the trained parts are here ({len(weights)} tensors, {sum(v.numel() for v in weights.values()):,} "
        "parameters); the encoder and the LM come from their own repositories, under their own licences.", "",
        *card_metrics(info), "",
        "## Training settings", "", "| variable | value |", "|---|---|",
        *(f"| {k.upper()} | `{c[k]!r}` |" for k in (*MODEL_KEYS, *DATA_KEYS, *TRAINING_KEYS) if k in c), "",
        "## Intended use and limitations", "",
        f"- A research baseline: short captions in the style of its training captions ({c['dataset']}), and a "
        "starting point for ablations. Not for decisions about people, safety-critical use, or accessibility "
        "without human review.",
        "- Captions can be wrong: objects that are not there, wrong counts and colours, and the biases of the "
        "training captions (e.g. guesses of gender or age).",
        (f"- Trained on captions and, for {c['qa_mix']:.0%} of its sequences, on the question-answer pairs of "
         f"{c['qa_dataset']}: it answers questions like those, briefly (`--ask`); other questions at its own risk."
         if c.get("qa_mix") else
         "- Trained on captions only: asked a question (`--ask`), it answers with a description of the image, "
         "which answers 'what is in the picture' questions at best; it has not learnt to count, read text or reason."),
        "- English only, one image at a time, at the encoder's input resolution.",
        *(["- VISION_MODEL and/or LM_MODEL were local folders when this model was trained: where those folders do "
           "not exist, point the variables at the same models (e.g. `LM_MODEL=Qwen/Qwen3-0.6B-Base`)."] if local else []),
        "", "## Usage", "",
        "With the script that wrote this folder (`multimodal_transfer_learning.py`, `pip install -r requirements.txt`):",
        "", "```bash", *([f"hf download {repo_id} --local-dir captioner"] if repo_id else []),
        f"python multimodal_transfer_learning.py --caption --checkpoint {folder} photo.jpg",
        f"python multimodal_transfer_learning.py --ask 'What is in the picture?' --checkpoint {folder} photo.jpg",
        f"python multimodal_transfer_learning.py --test --checkpoint {folder}", "```", "",
        "`config.json` holds every setting needed to rebuild the model (no secrets), `model.safetensors` the "
        "trained weights.", ""])


def stage_note(c: dict) -> str:
    """Where a staged run started (INIT_FROM) and whether its adapter was frozen, as a clause of the card."""
    start = f", starting from `{c['init_from']}` (INIT_FROM)" if c.get("init_from") else ""
    return start + (" with the adapter frozen (FREEZE_ADAPTER=1)" if c.get("freeze_adapter") else "")


def card_metrics(info: dict) -> list[str]:
    """The model card's metrics: the test results if the checkpoint was tested, else the validation
    metrics of its epoch (said so), with the split and pool sizes they come from."""
    c, images, test = info["config"], info["images"], info["test"]
    if test:
        metrics = test["metrics"]
        source = (f"Test split: {test['num_test_images']} images, captions generated for {metrics.get('num_images')} "
                  f"of them and scored against all their references; retrieval over a pool of "
                  f"{metrics.get('retrieval_pool', 0)} images and all their captions; decoding {test['decoding']}.")
    else:
        metrics = info["val_metrics"]
        source = (f"Validation split after epoch {info['epoch']} ({metrics.get('num_images')} images captioned): "
                  "this checkpoint has not been tested yet (`--test`), so these are not test numbers.")
    shown = [m for m, where in mtl.METRICS.items() if "card" in where] + sorted(k for k in metrics if "/" in k)
    split = (f"The data was split 80/10/10 by image (SEED={c['seed']}): {images['train']} train, {images['val']} "
             f"validation and {images['test']} test images of {c['dataset']}." if images else
             "The split sizes were not recorded with this checkpoint.")
    return ["## Metrics", "", source, "", "| metric | value |", "|---|---|",
            *(f"| {m} | {'missing' if metrics[m] is None else f'{metrics[m]:.4f}'} |" for m in shown if m in metrics), "",
            "BLEU, METEOR, ROUGE-L and CIDEr (CIDEr-D) by pycocoevalcap; Recall/Precision@K rank every caption of the "
            "pool by the model's likelihood given the image. `missing` = not computed (METEOR needs Java).",
            *([f"VQA-acc (VQA-acc/{{type}} per question type): VQAv2's accuracy of short greedy answers to "
               f"{metrics['num_questions']} questions (normalised answers; min(#matching annotators / 3, 1) over the "
               "10 leave-one-out subsets where 10 answers exist, else an exact match)."] if "VQA-acc" in metrics else []),
            "", split,
            *(f"\nOut of domain (TEST_DATASET): every image of {t['test_dataset']} ({t['num_test_images']} images): "
              + ", ".join(f"{m} {t['metrics'][m]:.4f}" for m in PLOTTED_TEST_METRICS if t["metrics"].get(m) is not None)
              for t in info.get("other_tests", []))]


def push_to_hub(folder: Path, repo_id: str, token: str, private: bool) -> str:
    """Upload an export folder to a model repository (created if needed); returns its URL."""
    from huggingface_hub import create_repo, upload_folder
    try:
        url = create_repo(repo_id, token=token or None, private=private, exist_ok=True)
        upload_folder(repo_id=repo_id, folder_path=folder, token=token or None,
                      commit_message=f"Upload {folder.name} with multimodal_transfer_learning.py")
    except Exception as e:
        log.debug("upload failure", exc_info=True)
        bad_id = type(e).__name__ == "HFValidationError"
        raise UserError(upload_failure(e, repo_id, folder), exit_code=2 if bad_id else 1) from None
    return str(url)


def upload_failure(e: Exception, repo_id: str, folder: Path) -> str:
    """One line: why the upload failed and what to do; the export itself is complete either way."""
    from huggingface_hub import errors as hub_errors
    later = f"the export in {folder} is complete: upload it later with the same command or `hf upload {repo_id} {folder}`"
    status = getattr(getattr(e, "response", None), "status_code", None)
    if type(e).__name__ == "HFValidationError":
        return f"--push-to-hub {repo_id}: not a valid repository id (use owner/name)"
    if isinstance(e, hub_errors.LocalTokenNotFoundError) or status in (401, 403):
        return (f"--push-to-hub {repo_id}: the hub rejected the upload (HF_TOKEN missing, invalid, or without write "
                f"access to {repo_id}); set HF_TOKEN to a write token; {later}")
    network = any(c.__name__ == "TransportError" for c in type(e).__mro__)  # httpx: no connection, timeouts
    if isinstance(e, hub_errors.OfflineModeIsEnabled) or network or (isinstance(e, OSError) and status is None):
        return (f"--push-to-hub {repo_id}: upload failed, the hub is unreachable (no network, or HF_HUB_OFFLINE=1) "
                f"({type(e).__name__}); {later}")
    why = (str(e).strip().splitlines() or [""])[0][:200]
    return f"--push-to-hub {repo_id}: upload failed ({type(e).__name__}: {why}); {later}"


def cmd_export(cfg: Config, checkpoint: str | None, folder: Path, repo_id: str | None, private: bool) -> None:
    """--export DIR [--push-to-hub REPO_ID [--private]]."""
    path = chosen_checkpoint(cfg, checkpoint)
    export_checkpoint(path, read_checkpoint(path), folder, repo_id)
    log.info(f"exported {path} to {folder}/ (model.safetensors, config.json, README.md)")
    if repo_id:
        log.info(f"uploaded to {push_to_hub(folder, repo_id, cfg.hf_token, private)}")


# =============================================================================================
# Comparing runs
# =============================================================================================
# --compare reads what every run leaves on disk (results.csv rows from --test, {run}.history.jsonl
# from --train), so runs compare without W&B, across machines and across versions of this script.





PLOTTED_TEST_METRICS = [m for m, shown in mtl.METRICS.items() if "plot" in shown]
EPOCH_METRICS = [m for m, shown in mtl.METRICS.items() if "epochs" in shown]


def find_run_files(folders: list[Path]) -> tuple[list[Path], list[Path]]:
    """Every results.csv and every run history under the folders."""
    results = {p.resolve() for f in folders for p in f.rglob(mtl.output_path("", "results", "results").name)}
    histories = {p.resolve() for f in folders for p in f.rglob(mtl.output_path("", "*", "history").name)}
    return sorted(results), sorted(histories)


def run_label(folder: Path, root: Path, name: str) -> str:
    """A run's name in tables and legends: its folder relative to what all runs share, and its name."""
    return str(folder.relative_to(root) / name)


def read_results(paths: list[Path], root: Path) -> list[dict]:
    """The results.csv rows as dicts with a 'run' label and the path of their gallery (None if there is none).
    Several rows for the same checkpoint, decoding, QA_SHOTS and test set (--test run again) count once: the
    newest, i.e. the last in its file."""
    rows = {}
    for path in paths:
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                label = run_label(path.parent, root, Path(row.get("checkpoint") or "?").stem)
                test_set = row.get("test_dataset") or ""
                gallery = mtl.result_path(path.parent / (row.get("checkpoint") or "?"), "gallery", test_set)
                key = (label, row.get("decoding"), row.get("qa_shots"), test_set)
                rows[key] = {"run": label, **row, "gallery": gallery if gallery.is_file() else None}  # newest wins
    return list(rows.values())


def number(text) -> float | None:
    """A metric cell as a number; None if it is missing (empty, as results.csv writes a missing metric)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def comparison_table(rows: list[dict], out: Path = Path(".")) -> str:
    """Markdown: one row per run; the settings that differ between runs, then every test metric, the
    best value of each in bold (when at least two runs have it); a metric a run lacks is 'missing'. Where a
    run has a test gallery, a last column links it (relative to `out`, where the table is written). VQA accuracy
    (overall and per question type) shows only where a run answered questions (QA_DATASET)."""
    answered = any(number(r.get("VQA-acc")) is not None for r in rows)
    metrics = [m for m in mtl.METRICS if answered or m != "VQA-acc"]
    metrics += sorted({c for r in rows for c in r if c.startswith("VQA-acc/")})  # per question type
    columns = dict.fromkeys(c for r in rows for c in r if c not in ("run", "checkpoint", "gallery", *metrics))
    settings = [c for c in columns if len({r.get(c) or "" for r in rows}) > 1]
    best = {}
    for m in metrics:
        values = [v for r in rows if (v := number(r.get(m))) is not None]
        if len(values) >= 2:
            best[m] = min(values) if m in mtl.LOWER_IS_BETTER else max(values)

    def cell(row, m):
        v = number(row.get(m))
        if v is None:
            return "missing"
        return f"**{v:.4f}**" if v == best.get(m) else f"{v:.4f}"
    links = ["gallery"] if any(r.get("gallery") for r in rows) else []
    lines = ["| " + " | ".join(["run", *settings, *metrics, *links]) + " |",
             "|" + "---|" * (1 + len(settings) + len(metrics) + len(links))]
    for r in rows:
        cells = [r["run"], *(r.get(c) or "" for c in settings), *(cell(r, m) for m in metrics),
                 *([f"[page]({os.path.relpath(r['gallery'], out)})" if r.get("gallery") else ""] if links else [])]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def import_pyplot(needed_by: str = "--compare"):
    require_package("matplotlib", needed_by, exit_code=1)  # a command's missing tool, not a bad setting
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> None:
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110, bbox_inches="tight"))


def plot_histories(plt, histories: dict[str, list[dict]], folder: Path, starts: dict[str, int] = {}) -> list[Path]:
    """Val loss, and each per-epoch metric some run recorded (CIDEr; VQA-acc with questions), per epoch, one line
    per run; a stage's epochs after those of the stages before it (`starts`: how many, see `epochs_before`)."""
    curves = [("val_loss", "val loss", lambda h: h.get("val_loss"))]
    curves += [(f"val_{m.lower()}", f"val {m}", lambda h, m=m: (h.get("val_metrics") or {}).get(m)) for m in EPOCH_METRICS
               if any(m in (h.get("val_metrics") or {}) for rows in histories.values() for h in rows)]
    paths = []
    for name, title, value in curves:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for label, rows in histories.items():
            ys = [number(value(h)) for h in rows]
            ax.plot([starts.get(label, 0) + h["epoch"] for h in rows], [math.nan if y is None else y for y in ys],
                    marker="o", label=label)
        ax.set(xlabel="epoch (of all stages)" if any(starts.values()) else "epoch", ylabel=title,
               title=f"{title} per epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(folder / f"comparison_{name}.png")
        save_figure(fig, paths[-1])
        plt.close(fig)
    return paths


def checkpoint_header(path: Path) -> dict:
    """A checkpoint's config and epoch, not its weights: an export's config.json, or a .pt read memory-mapped
    (only what is touched is read); {} where there is none."""
    if path.is_dir():
        return read_export_info(path) or {}
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True) if path.is_file() else {}


def epochs_before(history: Path) -> int:
    """How many epochs the stages before a run trained: its INIT_FROM source's epoch, and that one's source's, and
    so on (0 for a run that started from scratch, or whose source is gone)."""
    run = history.name.removesuffix(mtl.OUTPUT_SUFFIXES["history"])
    epochs = [int(p.name.split("_")[0]) for p in history.parent.glob(mtl.output_path("", f"*_{run}", "checkpoint").name)
              if p.name.split("_")[0].isdigit()]
    header = checkpoint_header(mtl.output_path(history.parent, f"{max(epochs)}_{run}", "checkpoint")) if epochs else {}
    total = 0
    for _ in range(100):  # a chain of stages ends long before; sources that start from each other never would
        init_from = header.get("config", {}).get("init_from")
        if not init_from:
            break
        header = checkpoint_header(Path(init_from))
        total += header.get("epoch", 0)
    return total


def plot_test_metrics(plt, rows: list[dict], folder: Path) -> Path:
    """The main test metrics, one bar per run; a missing metric is labelled, never drawn as 0."""
    fig, ax = plt.subplots(figsize=(max(6.4, 1.4 * len(PLOTTED_TEST_METRICS)), 4))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(PLOTTED_TEST_METRICS))]
        values = [number(r.get(m)) for m in PLOTTED_TEST_METRICS]
        ax.bar(xs, [math.nan if v is None else v for v in values], width, label=r["run"])
        for x, v in zip(xs, values):
            if v is None:
                ax.text(x, 0, "missing", rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(PLOTTED_TEST_METRICS)), PLOTTED_TEST_METRICS)
    ax.set(ylabel="test score", title="test metrics per run")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    path = folder / "comparison_test_metrics.png"
    save_figure(fig, path)
    plt.close(fig)
    return path


def compare_runs(folders: list[Path], out: Path) -> str:
    """Read every run under the folders; write comparison.md and the comparison_*.png plots into `out`.
    Returns the Markdown table."""
    for f in folders:
        if not f.is_dir():
            raise UserError(f"--compare {f}: no such folder")
    plt = import_pyplot()  # before writing anything
    results, history_files = find_run_files(folders)
    if not results and not history_files:
        raise UserError(f"no results.csv or *.history.jsonl under {', '.join(map(str, folders))}: "
                        "train (--train) and test (--test) first")
    root = Path(os.path.commonpath([p.parent for p in results + history_files]))
    rows = read_results(results, root)
    labels = {p: run_label(p.parent, root, p.name.removesuffix(mtl.OUTPUT_SUFFIXES["history"])) for p in history_files}
    histories = {labels[p]: read_history(p) for p in history_files}
    plots = plot_histories(plt, histories, out, {labels[p]: epochs_before(p) for p in history_files}) if histories else []
    if rows:
        plots.append(plot_test_metrics(plt, rows, out))
    table = comparison_table(rows, out) if rows else "(no test results yet: run --test)"
    doc = "\n".join([
        f"# Comparison of {len(rows)} tested runs", "",
        f"Under {', '.join(str(f) for f in folders)}. Test metrics from results.csv (the newest row per checkpoint, "
        "decoding, QA_SHOTS and test set); **bold** = the best per metric (loss: lowest; the rest: highest); "
        "`missing` = not computed (e.g. METEOR without Java). Columns between run and the metrics: the settings that "
        "differ; `gallery`: the run's test captions to look at, worst first.", "",
        table, "", *(f"![{p.stem}]({p.name})" for p in plots), ""])
    atomic_write(out / "comparison.md", lambda fh: fh.write(doc.encode()))
    log.info(f"wrote {out / 'comparison.md'}" + "".join(f", {p.name}" for p in plots))
    return table


def cmd_compare(cfg: Config, folders: list[str]) -> None:
    """--compare [DIR ...]: every run under the folders (default OUTPUT_DIR_MODELS) compared in the first."""
    folders = [Path(d) for d in folders] or [Path(cfg.output_dir_models)]
    print(compare_runs(folders, folders[0]))


# =============================================================================================
# Sweeps: one variant per env file
# =============================================================================================
# Each variant runs in a child process (this script with --train, then --test), so that a crash, a
# non-finite loss or a leaked GPU allocation in one cannot touch the next. The child shares our
# process group: Ctrl-C in a terminal stops it as cleanly as a direct run, and the sweep with it.

@dataclass(eq=False)
class Variant:
    file: Path
    env: dict[str, str]  # the child's environment: ours, then the file's values, then its OUTPUT_DIR_MODELS
    folder: Path         # its OUTPUT_DIR_MODELS
    source: Variant | None = None  # the variant its INIT_FROM=@stem starts from (see `stage_order`)


def sweep_variants(files: list[str], base: Config) -> list[Variant]:
    """Each file's variant. The file's values win over the base configuration (the --env-file or .env
    file, then the real environment); its outputs go to OUTPUT_DIR_MODELS/<file stem>/ unless it sets
    OUTPUT_DIR_MODELS itself."""
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise UserError(f"--sweep: no such env file: {', '.join(missing)}", exit_code=2)
    variants, derived, unknown = [], [], []
    for f in map(Path, files):
        values = {k: v for k, v in dotenv_values(f).items() if v is not None}
        unknown += [f"{f}: {problem}" for problem in mtl.unknown_variables(values)]
        folder = values.get("OUTPUT_DIR_MODELS") or str(Path(base.output_dir_models) / f.stem)
        if "OUTPUT_DIR_MODELS" not in values:
            derived.append(f.stem)
        variants.append(Variant(f, {**os.environ, **values, "OUTPUT_DIR_MODELS": folder}, Path(folder)))
    if unknown:  # a variant file exists to set our variables: a typo would train the base configuration again
        raise UserError(f"--sweep: {'; '.join(unknown)}; a variant file holds settings only", exit_code=2)
    twice = sorted({s for s in derived if derived.count(s) > 1})
    if twice:
        raise UserError(f"--sweep: several files named {twice[0]}.*, but each variant's outputs go to a folder "
                        "named after its file: rename one, or set OUTPUT_DIR_MODELS in it", exit_code=2)
    return variants


def stage_order(variants: list[Variant]) -> list[Variant]:
    """The variants in the order given, except that a stage (INIT_FROM=@stem) runs after the variant of stem.env
    it starts from. An unknown stem or stages that start from each other are refused before anything trains."""
    by_stem, ordered, path = {v.file.stem: v for v in variants}, [], []

    def visit(v: Variant) -> None:
        if v in ordered:
            return
        if v in path:
            cycle = " -> ".join(f"{s.file.stem}.env" for s in [*path[path.index(v):], v])
            raise UserError(f"--sweep: the INIT_FROM=@stem stages start from each other ({cycle}): break the cycle", 2)
        stem = v.env.get("INIT_FROM", "")[1:] if v.env.get("INIT_FROM", "").startswith("@") else None
        if stem is not None and stem not in by_stem:
            raise UserError(f"--sweep: {v.file} has INIT_FROM=@{stem}, but no variant file of this sweep is named "
                            f"{stem}.env (variants: {', '.join(by_stem)})", exit_code=2)
        path.append(v)
        if stem is not None:
            v.source = by_stem[stem]
            visit(v.source)
        path.pop()
        ordered.append(v)
    for v in variants:
        visit(v)
    return ordered


def resolve_stage(v: Variant, env_file: str | None, demo: bool) -> None:
    """INIT_FROM=@stem -> the last checkpoint of that variant, which has run by now (see `stage_order`)."""
    if v.source:
        source = mtl.find_last_checkpoint(variant_config(v.source, env_file, demo))
        v.env["INIT_FROM"] = str(source)
        log.info(f"{v.file.stem}: INIT_FROM=@{v.source.file.stem} -> {source}")


def variant_config(v: Variant, env_file: str | None, demo: bool) -> Config:
    """The variant's configuration as its child process will see it."""
    cfg = load_config(read_environment(env_file, demo, v.env))
    return demo_config(cfg, make_demo_files(cfg)) if demo else cfg


def sweep_state(cfg: Config) -> str:
    """new, interrupted (checkpoints, but not of the last epoch), trained (not tested) or finished."""
    try:
        last = mtl.find_last_checkpoint(cfg)
    except UserError:
        return "new"
    if int(last.name.split("_")[0]) < cfg.epochs:
        return "interrupted"
    return "finished" if result_path(last, "test").is_file() else "trained"


SWEEP_JOBS = {"new": (["--train"], ["--test"]), "interrupted": (["--train", "--resume"], ["--test"]),
              "trained": (["--test"],), "finished": ()}


def run_variant(v: Variant, env_file: str | None, demo: bool, flags: list[str]) -> str | None:
    """Train (or resume) and test one variant, unless it is finished. Returns None, or why it failed.
    flags: what every child gets (--env-file, --demo, --debug)."""
    try:
        resolve_stage(v, env_file, demo)
        cfg = variant_config(v, env_file, demo)
    except UserError as e:
        return " ".join(str(e).split())
    state = sweep_state(cfg)
    log.info(f"{v.file.stem}: {state} ({cfg.run_name}, {cfg.epochs} epochs) in {v.folder}"
             + {"new": "", "interrupted": ": resuming", "trained": ": testing", "finished": ": skipped"}[state])
    for job in SWEEP_JOBS[state]:
        code, stderr_tail = run_child([*job, *flags], v.env)
        if code == 130:  # the child alone was interrupted: the user means the sweep
            raise KeyboardInterrupt
        if code == 143:
            raise Stopped()
        if code:
            return error_reason(stderr_tail) or f"{' '.join(job)} exited with code {code}"
    return None


def run_child(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run this script with `argv`, its stderr passed through to ours (through a pseudo-terminal when
    ours is a terminal, so that progress bars and colours look as in a direct run). Returns its exit
    code and the end of its stderr."""
    if sys.stderr.isatty():
        import pty
        read_fd, write_fd = pty.openpty()
    else:
        read_fd, write_fd = os.pipe()
    proc = subprocess.Popen([sys.executable, str(Path(mtl.__file__).resolve()), *argv], env=env, stderr=write_fd)
    os.close(write_fd)
    try:
        tail = pass_through(read_fd)
    except (KeyboardInterrupt, Stopped) as e:
        if isinstance(e, Stopped):  # SIGTERM reached us alone; Ctrl-C in a terminal reached the child too
            proc.terminate()
        pass_through(read_fd)  # let the child stop cleanly: unread output would block it
        proc.wait()
        raise
    finally:
        os.close(read_fd)
    return proc.wait(), tail


def pass_through(fd: int, keep: int = 20_000) -> str:
    """Copy what arrives on `fd` to stderr until the writer closes it; returns the last `keep` characters."""
    decoder, tail = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # a pseudo-terminal reports EIO once the child has exited
            chunk = b""
        if not chunk:
            return tail
        text = decoder.decode(chunk)
        sys.stderr.write(text)
        sys.stderr.flush()
        tail = (tail + text)[-keep:]


def error_reason(stderr: str) -> str | None:
    """The last error a child logged, on one line (with the '  - ' lines of a multi-line message), or
    else the last line of a traceback."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", stderr).replace("\r", "\n").splitlines()
    for i in range(len(lines) - 1, -1, -1):
        m = re.match(r"\d\d:\d\d:\d\d ERROR\s+(.*)", lines[i])
        if m:
            more = [line.strip() for line in itertools.takewhile(lambda x: x.startswith("  - "), lines[i + 1:])]
            return " ".join([m[1], *more])
    return next((line for line in reversed(lines) if line.strip()), None)


def cmd_sweep(cfg: Config, files: list[str], env_file: str | None, demo: bool, debug: bool) -> int:
    """--sweep ENV_FILE ...: each variant trained and tested in turn, then compared; 1 if any failed."""
    import_pyplot("--sweep (its comparison)")  # say so before hours of training, not after
    variants, failed = stage_order(sweep_variants(files, cfg)), {}
    flags = [*(["--env-file", env_file] if env_file else []), *(["--demo"] if demo else []), *(["--debug"] if debug else [])]
    for i, v in enumerate(variants, 1):
        log.info(f"sweep: variant {i} of {len(variants)}: {v.file}")
        stage_failed = v.source is not None and v.source.file in failed
        reason = f"not run: its INIT_FROM variant {v.source.file} failed" if stage_failed else \
            run_variant(v, env_file, demo, flags)
        if reason:
            failed[v.file] = reason
            log.warning(f"{v.file.stem} failed ({reason}); going on with the next variant")
    folders = [v.folder for v in variants if v.folder.is_dir()]
    if folders and any(find_run_files(folders)):
        print(compare_runs(folders, Path(cfg.output_dir_models)))
    for file, reason in failed.items():
        log.error(f"sweep: {file} failed: {reason}")
    log.info(f"sweep: {len(variants) - len(failed)} of {len(variants)} variants done"
             + (f", {len(failed)} failed (rerun the sweep after fixing them: finished variants are skipped)"
                if failed else ""))
    return 1 if failed else 0


# =============================================================================================
# Demo: synthetic shapes, tiny random models, all offline
# =============================================================================================
# Colour and shape survive a frozen, random encoder's single global embedding (colour shifts the
# pixel statistics, and the three shapes cover different areas); position barely would. DEMO_TASK=position
# asks for it: a smaller shape on one side, and captions that name the side. The pooled embedding (the
# MLP adapter's input) blurs where; patch tokens keep it, one token per place.

# What --demo sets (real environment variables still win; see `read_environment`).
DEMO_PRESET = {"EPOCHS": "6", "BATCH_SIZE": "32", "LR_ADAPTER": "2e-3", "LR_QWEN": "2e-3", "WARMUP_RATIO": "0.05",
               "NUM_VISUAL_TOKENS": "4", "ADAPTER_HIDDEN": "256", "PROMPT": "caption:", "MAX_CAPTION_TOKENS": "16",
               "MAX_NEW_TOKENS": "16", "VAL_CAPTION_IMAGES": "0", "RETRIEVAL_POOL": "50", "DEVICE": "cpu",
               "DTYPE": "fp32", "NUM_WORKERS": "0", "NO_REPEAT_NGRAM": "0"}


DEMO_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
                "purple": (140, 50, 170), "orange": (245, 140, 30), "black": (20, 20, 20), "white": (250, 250, 250)}


DEMO_SHAPES = ("circle", "square", "triangle")


DEMO_TEMPLATES = ("{a} {c} {s}", "{a} {c} {s} on a gray background", "a picture of {a} {c} {s}",
                  "there is {a} {c} {s} in the image", "one {c} {s}")


DEMO_PLACES = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48)}  # centres in 64 x 64


DEMO_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}


DEMO_POSITION_TEMPLATES = ("{a} {c} {s} {where}", "{a} {c} {s} {where} of the image", "there is {a} {c} {s} {where}",
                           "{where} there is {a} {c} {s}", "one {c} {s} {where}")


# DEMO_TASK=qa: 1-3 shapes of one colour and kind, in a row at one of DEMO_PLACES; captions say how many, and
# four questions a shape each, with a question type each (VQA-acc/{type}).
DEMO_COUNTS = ("one", "two", "three")


DEMO_QA_TEMPLATES = ("{a} {c} {s} {where}", "{a} {c} {s} {where} of the image", "there {be} {a} {c} {s} {where}",
                     "{where} there {be} {a} {c} {s}", "{n} {c} {s} {where}")


DEMO_QUESTIONS = {"what colour": "what colour are the shapes?", "what shape": "what shape are they?",
                  "where": "where are the shapes?", "how many": "how many shapes are there?"}
DEMO_QUESTIONS_FILE = "questions.jsonl"  # beside the demo's metadata.jsonl


def demo_caption(template: str, colour: str, shape: str, place: str | None = None, count: int = 1) -> str:
    article = ("an" if colour[0] in "aeiou" else "a") if count == 1 else DEMO_COUNTS[count - 1]
    return template.format(a=article, n=DEMO_COUNTS[count - 1], c=colour, s=shape + "s" * (count > 1),
                           be="is" if count == 1 else "are", where=DEMO_WHERE.get(place))


def demo_sample(index: int, seed: int) -> tuple[Image.Image, str, str]:
    rnd = random.Random(seed * 1_000_003 + index)
    colour, shape = rnd.choice(list(DEMO_COLOURS)), rnd.choice(DEMO_SHAPES)
    x, y, r = 32 + rnd.randint(-6, 6), 32 + rnd.randint(-6, 6), rnd.randint(16, 20)
    return draw_demo_shape(shape, x, y, r, DEMO_COLOURS[colour]), colour, shape


def demo_position_sample(index: int, seed: int) -> tuple[Image.Image, str, str, str]:
    """DEMO_TASK=position: a shape of radius 9-12 around one of DEMO_PLACES (jittered by up to 4 pixels)."""
    rnd = random.Random(f"position-{seed}-{index}")
    colour, shape, place = rnd.choice(list(DEMO_COLOURS)), rnd.choice(DEMO_SHAPES), rnd.choice(list(DEMO_PLACES))
    (cx, cy), r = DEMO_PLACES[place], rnd.randint(9, 12)
    x, y = cx + rnd.randint(-4, 4), cy + rnd.randint(-4, 4)
    return draw_demo_shape(shape, x, y, r, DEMO_COLOURS[colour]), colour, shape, place


def demo_qa_sample(index: int, seed: int) -> tuple[Image.Image, str, str, str, int]:
    """DEMO_TASK=qa: 1-3 shapes of radius 6, 16 pixels apart in a row (a column on the left or right) centred
    on one of DEMO_PLACES, each jittered by a pixel at most: they never touch, so they can be counted."""
    rnd = random.Random(f"qa-{seed}-{index}")
    colour, shape, place = rnd.choice(list(DEMO_COLOURS)), rnd.choice(DEMO_SHAPES), rnd.choice(list(DEMO_PLACES))
    count, (cx, cy), image = rnd.randint(1, 3), DEMO_PLACES[place], None
    for k in range(count):
        along = round((k - (count - 1) / 2) * 16)
        x, y = (cx, cy + along) if place in ("left", "right") else (cx + along, cy)
        image = draw_demo_shape(shape, x + rnd.randint(-1, 1), y + rnd.randint(-1, 1), 6, DEMO_COLOURS[colour], image)
    return image, colour, shape, place, count


def draw_demo_shape(shape: str, x: int, y: int, r: int, fill, image: Image.Image | None = None) -> Image.Image:
    """A 64 x 64 gray image (or `image`) with one shape of `fill` colour centred at (x, y), r pixels from centre
    to edge."""
    image = image or Image.new("RGB", (64, 64), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    box = (x - r, y - r, x + r, y + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    return image


def demo_item(task: str, index: int, seed: int) -> tuple[Image.Image, list[str], list[dict]]:
    """One image of the demo task, its five captions and (DEMO_TASK=qa) its questions, each with its answer and type."""
    if task == "qa":
        image, colour, shape, place, count = demo_qa_sample(index, seed)
        answers = {"what colour": colour, "what shape": shape, "where": place, "how many": str(count)}
        questions = [{"question": q, "answers": [answers[kind]], "question_type": kind} for kind, q in DEMO_QUESTIONS.items()]
        return image, [demo_caption(t, colour, shape, place, count) for t in DEMO_QA_TEMPLATES], questions
    if task == "position":
        image, colour, shape, place = demo_position_sample(index, seed)
        return image, [demo_caption(t, colour, shape, place) for t in DEMO_POSITION_TEMPLATES], []
    image, colour, shape = demo_sample(index, seed)
    return image, [demo_caption(t, colour, shape) for t in DEMO_TEMPLATES], []


def demo_vocabulary_captions(task: str) -> list[str]:
    """Every text the task can produce (captions; DEMO_TASK=qa: also questions and answers): what the demo LM's
    word-level vocabulary is built from."""
    if task == "qa":
        return ([demo_caption(t, c, s, p, n) for t in DEMO_QA_TEMPLATES for c in DEMO_COLOURS for s in DEMO_SHAPES
                 for p in DEMO_PLACES for n in (1, 2, 3)] + [mtl.ask_text(q, "1 2 3") for q in DEMO_QUESTIONS.values()])
    templates, places = (DEMO_POSITION_TEMPLATES, DEMO_PLACES) if task == "position" else (DEMO_TEMPLATES, [None])
    return [demo_caption(t, c, s, p) for t in templates for c in DEMO_COLOURS for s in DEMO_SHAPES for p in places]


def make_demo_dataset(folder: Path, n: int, seed: int, task: str = "shapes") -> Path:
    """Write n images and a metadata.jsonl with five varied captions each (an ordinary image folder); DEMO_TASK=qa:
    also questions.jsonl, four questions per image (a QA_DATASET file)."""
    if (folder / "metadata.jsonl").is_file():
        return folder
    asked = []
    with atomic_folder(folder) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "metadata.jsonl", "w") as fh:
            for i in progress_bar(range(n), desc="demo images", unit="img"):
                image, captions, questions = demo_item(task, i, seed)
                name = f"images/{i:05d}.png"
                image.save(tmp / name)
                fh.write(json.dumps({"file_name": name, "captions": captions}) + "\n")
                asked += [json.dumps({"image": name, **q}) + "\n" for q in questions]
        if asked:
            (tmp / DEMO_QUESTIONS_FILE).write_text("".join(asked))
    return folder


def make_demo_models(root: Path, kind: str, seed: int, task: str = "shapes") -> tuple[Path, Path]:
    """A tiny random encoder of the real architecture and a tiny random Qwen3 whose word-level vocabulary is
    the task's captions (so one LM per demo task)."""
    words = sorted({w.lower() for c in demo_vocabulary_captions(task) for w in re.findall(r"\w+|[^\w\s]+", c)}
                   | {"caption", ":"})  # as the tokenizer splits them
    vision = save_tiny_encoder(root / f"{kind}-seed{seed}", kind, seed, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    lm = save_tiny_lm(root / (f"qwen3-seed{seed}" if task == "shapes" else f"qwen3-{task}-seed{seed}"), words, seed,
                      hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, max_position_embeddings=128)
    return vision, lm


def make_demo_files(cfg: Config) -> dict[str, Path]:
    """Write, once, the demo's image folder and its tiny random models under CACHE_DIR/demo."""
    root, task = Path(cfg.cache_dir) / "demo", cfg.demo_task
    data = make_demo_dataset(root / f"{task}-{cfg.demo_images}-seed{cfg.seed}", cfg.demo_images, cfg.seed, task)
    vision_dir, lm_dir = make_demo_models(root / "models", cfg.vision_encoder, cfg.seed, task)
    checkpoints = root / ("checkpoints" if task == "shapes" else f"checkpoints-{task}")
    return {"root": root, "dataset": data, "vision_model": vision_dir, "lm_model": lm_dir, "checkpoints": checkpoints}


def demo_config(cfg: Config, files: dict[str, Path]) -> Config:
    """The config pointed at the demo's files. A random LM has no language to keep, so every block
    trains (TOP_K = all) and checkpoints go under CACHE_DIR/demo, unless the environment sets TOP_K or
    OUTPUT_DIR_MODELS (with --demo only the environment can: a sweep's variants do)."""
    from transformers import AutoConfig
    num_layers = AutoConfig.from_pretrained(files["lm_model"]).num_hidden_layers
    top_k = cfg.top_k if cfg.top_k != Config.top_k else num_layers
    output_dir = cfg.output_dir_models if cfg.output_dir_models != Config.output_dir_models \
        else str(files["checkpoints"])
    questions = files["dataset"] / DEMO_QUESTIONS_FILE
    return dataclasses.replace(cfg, dataset=str(files["dataset"]), vision_model=str(files["vision_model"]),
                               lm_model=str(files["lm_model"]), top_k=top_k, output_dir_models=output_dir,
                               cache_dir=str(files["root"] / "cache"),
                               qa_dataset=cfg.qa_dataset or (str(questions) if questions.is_file() else ""))


# =============================================================================================
# Tiny models of the real architectures
# =============================================================================================
# The demo, the tests and the benchmark need models without the hub: random weights in the real
# architectures (Qwen3, CLIP, ViT) at the widths each asks for, saved as a hub download would be.

def word_tokenizer(words: list[str], vocab_size: int = 0):
    """A word-level tokenizer over `words` (lower-cased; punctuation splits off: "caption:" -> "caption", ":"),
    filled up with made-up words to `vocab_size`. Like Qwen3-Base's: an EOS, no BOS and no pad token."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<|endoftext|>": 0, "<unk>": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>")


def save_tiny_lm(folder: Path, words: list[str], seed: int, **shape) -> Path:
    """A random Qwen3 of `shape` (Qwen3Config's names; vocab_size defaults to the words) with its word-level
    tokenizer, saved in `folder` unless it is there already."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    if not (folder / "config.json").is_file():
        tokenizer = word_tokenizer(words, shape.pop("vocab_size", 0))
        tokenizer.save_pretrained(folder)
        torch.manual_seed(seed)
        config = Qwen3Config(**{"tie_word_embeddings": True, **shape}, vocab_size=len(tokenizer), eos_token_id=0,
                             bos_token_id=None, pad_token_id=None)
        Qwen3ForCausalLM(config).save_pretrained(folder)
    return folder


def save_tiny_encoder(folder: Path, kind: str, seed: int, projection_dim: int = 0, **vision) -> Path:
    """A random CLIP (kind "clip": projection_dim defaults to the width) or ViT whose vision tower has the
    shape `vision` (their config's names), with its image processor, saved in `folder` unless it is there."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, ViTConfig, ViTImageProcessor, ViTModel
    if not (folder / "config.json").is_file():
        torch.manual_seed(seed)
        size = vision["image_size"]
        if kind == "clip":  # the recipe keeps the vision tower and the projection: a one-layer text tower will do
            text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
            CLIPModel(CLIPConfig(text_config=text, vision_config=vision,
                                 projection_dim=projection_dim or vision["hidden_size"])).save_pretrained(folder)
            CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}
                               ).save_pretrained(folder)
        else:
            ViTModel(ViTConfig(**vision), add_pooling_layer=False).save_pretrained(folder)
            ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(folder)
    return folder


# =============================================================================================
# Where the Q-Former's queries look (--caption --explain)
# =============================================================================================

HEAT_STOPS = ((0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164))  # matplotlib's inferno


def heat_colours(values: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] (any shape) -> RGB bytes (..., 3) along HEAT_STOPS: dark = ignored, bright = looked at."""
    stops = torch.tensor(HEAT_STOPS, dtype=torch.float32)
    x = values.clamp(0, 1) * (len(stops) - 1)
    low = x.floor().long().clamp(max=len(stops) - 2)
    frac = (x - low)[..., None]
    return (stops[low] * (1 - frac) + stops[low + 1] * frac).round().byte()


def heat_panel(view: Image.Image, weights: torch.Tensor, grid: int, size: int, label: str) -> Image.Image:
    """`view` at size x size under a heatmap of one attention row (P,) over its grid x grid patches (the CLS
    position, first, is left out and named in the label), scaled to its own maximum; one block per patch."""
    patches = weights[1:].reshape(grid, grid)
    colours = heat_colours(patches / patches.max().clamp(min=1e-12))
    heat = Image.frombytes("RGB", (grid, grid), colours.contiguous().numpy().tobytes()).resize((size, size), Image.NEAREST)
    panel = Image.blend(view.resize((size, size), Image.BICUBIC), heat, 0.6)
    labelled(panel, f"{label} (CLS {weights[0].item():.0%})")
    return panel


def labelled(panel: Image.Image, text: str) -> Image.Image:
    """`text` in white on a black box in the panel's top-left corner (readable over any heatmap)."""
    draw = ImageDraw.Draw(panel)
    box = draw.textbbox((3, 2), text)
    draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
    draw.text((3, 2), text, fill=(255, 255, 255))
    return panel


def attention_picture(view: Image.Image, attention: torch.Tensor, grid: int, caption: str, size: int = 224,
                      columns: int = 4) -> Image.Image:
    """The image as the encoder saw it beside a heatmap of the queries' cross-attention (V, P) over its
    patches averaged over queries, then one small panel per query; the caption on top."""
    small = 2 * size // columns
    rows = math.ceil(len(attention) / columns)
    picture = Image.new("RGB", (2 * size, 20 + size + rows * small), (255, 255, 255))
    ImageDraw.Draw(picture).text((4, 4), caption[:80], fill=(0, 0, 0))
    picture.paste(labelled(view.resize((size, size), Image.BICUBIC), "input"), (0, 20))
    picture.paste(heat_panel(view, attention.mean(0), grid, size, f"mean of {len(attention)} queries"), (size, 20))
    for q, weights in enumerate(attention):
        at = (q % columns * small, 20 + size + q // columns * small)
        picture.paste(heat_panel(view, weights, grid, small, f"q{q + 1}"), at)
    return picture


def explain_names(images: list[str]) -> dict[str, str]:
    """The --explain picture's file name of each image: its stem + .png, numbered where stems repeat."""
    names = {}
    for image in dict.fromkeys(images):
        stem, n = Path(image).stem, 1
        while (name := f"{stem}.png" if n == 1 else f"{stem}-{n}.png") in names.values():
            n += 1
        names[image] = name
    return names


def write_attention_pictures(t: InferenceModel, names: list[str], pixels: list[torch.Tensor], features: torch.Tensor,
                             captions: list[str], picture_names: dict[str, str]) -> None:
    """--explain: one PNG per image in `{checkpoint stem}.explain/` beside the checkpoint."""
    with torch.no_grad(), t.model.autocast():
        attention = t.model.adapter.attention(t.model.to_device(features)).float().cpu()  # (B, V, P)
    for name, px, weights, caption in zip(names, pixels, attention, captions):
        out = result_path(t.path, "explain") / picture_names[name]
        picture = attention_picture(t.encoder.unprocess(px), weights, t.encoder.grid, caption)
        atomic_write(out, lambda fh: picture.save(fh, format="PNG"))
        log.info(f"{name}: where the queries look -> {out}")


# =============================================================================================
# The test gallery (--test writes it beside its results)
# =============================================================================================
# One HTML page that needs nothing else: the thumbnails are inside it as data: URIs, the filter is a few
# lines of inline script, so it opens from a laptop's disk, a CI artifact or an e-mail alike.

GALLERY_STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#222}h1{font-size:18px;margin:0 0 4px}
p{margin:4px 0 10px;color:#555}input{font-size:14px;padding:4px 8px;width:420px}
table{border-collapse:collapse;margin-top:10px}
th,td{border-bottom:1px solid #ddd;padding:6px 10px;text-align:left;vertical-align:top}th{background:#f4f4f4}
td.n{text-align:right;font-variant-numeric:tabular-nums}img{width:96px;height:96px;object-fit:contain;
image-rendering:pixelated;background:#eee}.gen{font-weight:600}ul{margin:0;padding-left:18px;color:#444}"""


# The filter keeps the rows that hold every word typed; the page's #fragment, if any, is typed in first,
# so that a filtered view is a link.
GALLERY_SCRIPT = """const box = document.getElementById('filter'), count = document.getElementById('shown');
function apply() {
  const words = box.value.toLowerCase().split(/\\s+/).filter(Boolean);
  let shown = 0;
  for (const row of document.querySelectorAll('tbody tr')) {
    row.hidden = !words.every(w => row.dataset.text.includes(w));
    shown += !row.hidden;
  }
  count.textContent = shown;
}
box.addEventListener('input', apply);
box.value = decodeURIComponent(location.hash.slice(1));
apply();"""


def thumbnail_uri(image: Image.Image, side: int = 96) -> str:
    """The image shrunk to fit side x side pixels, as a PNG data: URI."""
    image = image.copy()
    image.thumbnail((side, side))
    png = io.BytesIO()
    image.save(png, format="PNG")
    return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()


def gallery_row(rank: int, row: dict, open_image) -> str:
    """One test image as a table row: thumbnail, generated caption, references, its CIDEr and BLEU-4."""
    try:
        picture = f'<img src="{thumbnail_uri(open_image(row["image_id"]))}" alt="">'
    except Exception as e:  # gone since it was encoded: the row stays, without its picture
        picture = f"(image unreadable: {html.escape(type(e).__name__)})"
    words = html.escape(" ".join([row["image_id"], row["generated"], *row["references"]]).lower(), quote=True)
    references = "".join(f"<li>{html.escape(r)}</li>" for r in row["references"])
    return (f'<tr data-text="{words}" data-id="{html.escape(row["image_id"], quote=True)}" '
            f'data-cider="{row["CIDEr"]!r}" data-bleu4="{row["BLEU-4"]!r}"><td class="n">{rank}</td><td>{picture}</td>'
            f'<td>{html.escape(row["image_id"])}</td><td class="gen">{html.escape(row["generated"]) or "(empty)"}</td>'
            f'<td><ul>{references}</ul></td><td class="n">{row["CIDEr"]:.3f}</td><td class="n">{row["BLEU-4"]:.3f}</td></tr>')


def write_gallery(path: Path, rows: list[dict], open_image, result: dict) -> Path:
    """{stem}.test_gallery.html: every row of test_captions.jsonl (image id, generated caption, references, the
    image's own CIDEr and BLEU-4) with its image, worst CIDEr first, and a text filter. `open_image(image_id)`
    gives the image; `result` is what test.json holds. Returns `path`."""
    ordered = sorted(rows, key=lambda r: (r["CIDEr"], r["BLEU-4"], r["image_id"]))
    body = "\n".join(gallery_row(n, r, open_image) for n, r in enumerate(progress_bar(ordered, desc="gallery",
                                                                                        unit="img"), 1))
    c, metrics = result["config"], result["metrics"]
    test_set = (f"every image of {result['test_dataset']}" if result.get("test_dataset")
                else f"the test split of {c['dataset']}")
    title = f"{Path(result['checkpoint'] or path.name).name}: test captions"
    summary = (f"{result['checkpoint'] or 'The untrained model'} on {len(rows)} images of {test_set}; corpus CIDEr "
               f"{metrics.get('CIDEr', 0):.3f}, BLEU-4 "
               f"{metrics.get('BLEU-4', 0):.3f}. Per image: CIDEr with the IDF of all these images (its mean is the "
               "corpus CIDEr) and sentence BLEU-4, by pycocoevalcap. Worst CIDEr first.")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{GALLERY_STYLE}</style></head>
<body><h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p>
<input id="filter" type="search" placeholder="filter: words of the captions or the image id" autofocus>
<span><span id="shown">{len(rows)}</span> of {len(rows)} shown</span>
<table><thead><tr><th>#</th><th>image</th><th>id</th><th>generated</th><th>references</th><th>CIDEr</th>
<th>BLEU-4</th></tr></thead><tbody>
{body}
</tbody></table><script>{GALLERY_SCRIPT}</script></body></html>
"""
    atomic_write(path, lambda fh: fh.write(page.encode()))
    return path
