#!/usr/bin/env python3
"""The demo comparisons of the README over several seeds: the same sweep once per SEED (each seed draws
its own synthetic images and its own random encoder and LM), then each variant's test metrics as the mean
and the min-max over the seeds. Training at the demo's learning rate is chaotic: one seed's figure, or
another CPU's rounding, moves by more than the differences between variants, so a single run reads as
more exact than it is.

    python benchmarks/demo_seeds.py position     # DEMO_TASK=position: docs/position/{mlp,qformer}.env, 12 epochs
    python benchmarks/demo_seeds.py ablations    # docs/ablations/*.env (6 epochs) and the untrained baseline
    python benchmarks/demo_seeds.py position --seeds 1 2 3 --out .data/seeds

Writes {out}/{study}/seed{S}/ (the sweeps; a rerun skips what is finished) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "multimodal_transfer_learning.py"
STUDIES = {"position": {"files": ["docs/position/mlp.env", "docs/position/qformer.env"], "env": {"DEMO_TASK": "position"}},
           "ablations": {"files": sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "ablations").glob("*.env")),
                         "env": {}, "untrained": True}}
SHOWN = ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L", "loss", "Recall@1", "T2I-Recall@1")
PLACES = ("on the left", "on the right", "at the top", "at the bottom")


def run(args: list[str], env: dict) -> None:
    print("$", " ".join(f"{k}={v}" for k, v in env.items()), "python", SCRIPT.name, *args, flush=True)
    subprocess.run([sys.executable, str(SCRIPT), *args], env={**os.environ, **env}, cwd=ROOT, check=True)


def right_places(captions_file: Path) -> float:
    """Share of generated captions that name their image's place (the position demo's references all do)."""
    rows = [json.loads(line) for line in captions_file.read_text().splitlines() if line.strip()]
    named = [[p for p in PLACES if p in r["generated"]] == [p for p in PLACES if p in r["references"][0]] for r in rows]
    return sum(named) / len(named)


def seed_results(folder: Path, study: str) -> dict[str, dict[str, float]]:
    """{variant: {metric: value}} from every results.csv under one seed's folder (the newest row per run)."""
    out = {}
    for path in sorted(folder.rglob("results.csv")):
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                name = path.parent.name if row["untrained"] == "no" else "untrained"
                values = {m: float(row[m]) for m in SHOWN if row.get(m)}
                if study == "position" and row["untrained"] == "no":
                    stem = Path(row["checkpoint"]).stem
                    values["right places"] = right_places(path.parent / f"{stem}.test_captions.jsonl")
                out[name] = values
    return out


def table(per_seed: dict[int, dict[str, dict[str, float]]]) -> str:
    variants = sorted({v for results in per_seed.values() for v in results})
    metrics = [m for m in (*SHOWN, "right places") if any(m in r.get(v, {}) for r in per_seed.values() for v in r)]
    lines = [f"| variant ({len(per_seed)} seeds: mean, min–max) | " + " | ".join(metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for v in variants:
        cells = []
        for m in metrics:
            values = [r[v][m] for r in per_seed.values() if m in r.get(v, {})]
            cells.append(f"{statistics.mean(values):.3f} ({min(values):.3f}–{max(values):.3f})"
                         if len(values) == len(per_seed) else "missing")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", choices=sorted(STUDIES))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--out", type=Path, default=ROOT / ".data" / "seeds")
    args = p.parse_args()
    study = STUDIES[args.study]
    per_seed = {}
    for seed in args.seeds:
        folder = (args.out / args.study / f"seed{seed}").resolve()
        env = {**study["env"], "SEED": str(seed), "OUTPUT_DIR_MODELS": str(folder), "CACHE_DIR": str(args.out / "cache"),
               "WANDB_MODE": "disabled"}
        run(["--sweep", *study["files"], "--demo"], env)
        if study.get("untrained") and not (folder / "results.csv").is_file():
            run(["--test", "--untrained", "--demo"], env)
        per_seed[seed] = seed_results(folder, args.study)
    print(table(per_seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
