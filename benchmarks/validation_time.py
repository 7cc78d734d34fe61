#!/usr/bin/env python3
"""Where one validation of the demo spends its time, and what the caption metrics cost before and after
keeping their Java processes.

    python multimodal_transfer_learning.py --train --demo      # first: the demo's last checkpoint
    python benchmarks/validation_time.py

One validation = `mtl.evaluate` on the val split: the loss over every (image, caption) pair, a caption
per image, then BLEU/METEOR/ROUGE-L/CIDEr. The caption metrics are timed both ways on the same captions:
* before: what every validation used to do: pycocoevalcap's PTBTokenizer (one JVM for the references,
  one for the predictions) and a new METEOR JVM, whose paraphrase tables load before the first score;
* now: `mtl.caption_metrics` as training calls it: at its first validation (new texts tokenized in one
  JVM, METEOR's JVM started), at a later one (only the new captions tokenized, the same METEOR JVM), and
  with captions it has seen before (no JVM started at all).
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import multimodal_transfer_learning as mtl  # noqa: E402
import workflow_tools as tools  # noqa: E402


def timed(what: str, fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    print(f"  {what:<58} {time.perf_counter() - start:6.2f} s", flush=True)
    return out


def caption_metrics_before(predictions: dict, references: dict) -> dict:
    """The caption metrics as every validation computed them before: two PTB JVMs and a METEOR JVM per call."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    gts = timed("PTB tokenizer JVM, references", PTBTokenizer().tokenize,
                {k: [{"caption": c} for c in references[k]] for k in predictions})
    res = timed("PTB tokenizer JVM, generated captions", PTBTokenizer().tokenize,
                {k: [{"caption": predictions[k]}] for k in predictions})
    meteor = Meteor()  # starts the JVM, which loads its paraphrase tables before it answers the first score
    score = timed("METEOR JVM started, tables loaded, scored", lambda: meteor.compute_score(gts, res)[0])
    meteor.meteor_p.kill()
    meteor.meteor_p.wait()
    meteor.lock = threading.Lock()
    bleu = timed("BLEU, ROUGE-L, CIDEr (Python)", lambda: (Bleu(4).compute_score(gts, res, verbose=0)[0],
                                                            Rouge().compute_score(gts, res)[0],
                                                            Cider().compute_score(gts, res)[0]))
    return {"METEOR": score, "BLEU-4": bleu[0][3], "ROUGE-L": bleu[1], "CIDEr": bleu[2]}


def main() -> None:
    torch.set_num_threads(1)  # as --demo runs
    cfg = mtl.load_config(mtl.read_environment(None, demo=True))
    cfg = tools.demo_config(cfg, tools.make_demo_files(cfg))
    m = mtl.load_trained(cfg, None)
    splits, _, _ = mtl.prepare_data(m.cfg, mtl.load_records(m.cfg), m.encoder, m.model)
    val = splits["val"]
    print(f"one validation of {m.path} ({len(val.ids)} images, {len(val.pairs)} captions):")
    timed("val loss", mtl.split_loss, m.model, val, m.cfg)
    generated = timed("generated captions", mtl.generate_captions, m.model, val.features, m.cfg)
    predictions, references = dict(zip(val.ids, generated)), dict(zip(val.ids, val.references))
    print("caption metrics, before (every validation):")
    before = caption_metrics_before(predictions, references)
    print("caption metrics, now:")
    now = timed("first validation of a run", mtl.caption_metrics, predictions, references)
    later = {k: f"{v} ." if n % 2 else v for n, (k, v) in enumerate(predictions.items())}  # new texts to tokenize
    timed("a later validation (half the captions new)", mtl.caption_metrics, later, references)
    timed("a later validation (captions seen before)", mtl.caption_metrics, predictions, references)
    same = all(abs(now[k] - v) < 1e-12 for k, v in before.items())
    print(f"same metrics before and now: {same} ({', '.join(f'{k} {v:.4f}' for k, v in now.items())})")


if __name__ == "__main__":
    main()
