"""What a person looks at: the test gallery (one self-contained page of test images, captions, references and
per-image CIDEr/BLEU-4, worst first, with a text filter), screenshotted in a real headless browser; the recipe
alone saying in one line that the gallery needs workflow_tools.py; a console that shows only the settings that
differ from the defaults and no PTBTokenizer chatter; and caption metrics unchanged by keeping one METEOR JVM and
the PTB tokens of texts already seen."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

import multimodal_transfer_learning as mtl
import workflow_tools as tools
from conftest import COLOURS, ROOT, SCRIPT, explain, run_script, text

JAVA = pytest.mark.skipif(not shutil.which("java"), reason="needs Java (PTB tokenizer, METEOR)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER = pytest.mark.skipif(not CHROMIUM, reason="needs chromium (apt-get install chromium) for the screenshot")


@pytest.fixture(scope="module")
def tested(shared_env, trained):
    """Run A's checkpoints (see conftest's `trained`: 2 epochs on 40 images) copied and tested again, with Java
    on PATH; then the recipe copied alone into another folder and tested there (no Java: faster)."""
    root, env = shared_env
    out = {"models": root / "gallery" / "models", "alone_models": root / "gallery" / "alone-models"}
    for folder in (out["models"], out["alone_models"]):
        shutil.copytree(trained["A"] / "models", folder, ignore=shutil.ignore_patterns("*.test*", "results.csv"))
    out["test"] = run_script(["--test"], {**env("gallery", OUTPUT_DIR_MODELS=out["models"]), "PATH": os.environ["PATH"]})
    alone = root / "gallery" / "alone"
    alone.mkdir()
    shutil.copy(SCRIPT, alone)
    out["alone"] = subprocess.run([sys.executable, str(alone / SCRIPT.name), "--test"], cwd=alone, capture_output=True,
                                  env=env("gallery", OUTPUT_DIR_MODELS=out["alone_models"]), text=True, timeout=300)
    return out


class GalleryRows(HTMLParser):
    """The rows of a gallery page as their data-* attributes (and `hidden`, where set), and its images' src."""

    def __init__(self):
        super().__init__()
        self.rows, self.images = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-id" in attrs:
            self.rows.append(attrs)
        if tag == "img":
            self.images.append(attrs["src"])


def parse_gallery(html_text: str) -> GalleryRows:
    parser = GalleryRows()
    parser.feed(html_text)
    return parser


def captions_file(models: Path) -> list[dict]:
    return [json.loads(line) for line in (models / "2_clip_top1.test_captions.jsonl").read_text().splitlines()]


def test_the_gallery_holds_every_test_image_with_the_metrics_of_its_captions_file(tested):
    res = tested["test"]
    assert res.returncode == 0, explain(res)
    rows = captions_file(tested["models"])
    page = (tested["models"] / "2_clip_top1.test_gallery.html").read_text()
    gallery = parse_gallery(page)
    assert len(gallery.rows) == len(rows) == 4
    by_id = {r["image_id"]: r for r in rows}
    assert sorted(r["data-id"] for r in gallery.rows) == sorted(by_id)
    for shown in gallery.rows:
        assert float(shown["data-cider"]) == by_id[shown["data-id"]]["CIDEr"]
        assert float(shown["data-bleu4"]) == by_id[shown["data-id"]]["BLEU-4"]
    assert len(gallery.images) == 4 and all(src.startswith("data:image/png;base64,") for src in gallery.images)
    assert "http://" not in page and "https://" not in page  # nothing to fetch: it opens offline
    assert "2_clip_top1.test_gallery.html" in text(res)


@pytest.fixture(scope="module")
def handmade(tmp_path_factory):
    """A gallery written from rows with known metrics: shapes of four colours, one image unreadable, one
    caption with HTML in it."""
    from conftest import draw
    rows, images = [], {}
    for n, colour in enumerate([*COLOURS, *COLOURS]):
        image_id = f"img/{n:02d}.png"
        images[image_id] = draw(colour, "circle" if n % 2 else "square", 64)
        rows.append({"image_id": image_id, "generated": f"a {colour} {'circle' if n % 3 else '<b>square</b>'}",
                     "references": [f"a {colour} shape", f"the shape is {colour}"], "CIDEr": (n * 7 % 8) / 4,
                     "BLEU-4": n / 10})

    def open_image(image_id):
        if image_id == "img/03.png":
            raise FileNotFoundError(image_id)
        return images[image_id]
    path = tmp_path_factory.mktemp("handmade") / "3_clip_top1.test_gallery.html"
    result = {"checkpoint": "models/3_clip_top1.pt", "test_dataset": "", "config": {"dataset": "my-images"},
              "metrics": {"CIDEr": 0.875, "BLEU-4": 0.35}}
    assert tools.write_gallery(path, rows, open_image, result) == path
    return path, rows


def test_the_gallery_puts_the_worst_first_and_shows_captions_as_text(handmade):
    path, rows = handmade
    page = path.read_text()
    shown = parse_gallery(page).rows
    assert [float(r["data-cider"]) for r in shown] == sorted(r["CIDEr"] for r in rows)
    ties = [(float(r["data-cider"]), float(r["data-bleu4"])) for r in shown]
    assert ties == sorted(ties)  # equal CIDEr: the lower BLEU-4 first
    assert "&lt;b&gt;square&lt;/b&gt;" in page and "<b>square" not in page
    assert "image unreadable: FileNotFoundError" in page and len(parse_gallery(page).images) == len(rows) - 1
    assert "models/3_clip_top1.pt on 8 images of the test split of my-images" in page


@JAVA
def test_per_image_metrics_are_pycocoevalcaps_and_no_ptbtokenizer_line_reaches_the_console(tested):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    res = tested["test"]
    assert "PTBTokenizer" not in res.stdout + res.stderr
    rows = captions_file(tested["models"])
    gts = PTBTokenizer().tokenize({r["image_id"]: [{"caption": c} for c in r["references"]] for r in rows})
    hyp = PTBTokenizer().tokenize({r["image_id"]: [{"caption": r["generated"]}] for r in rows})
    ids = list(gts)
    cider = dict(zip(ids, Cider().compute_score(gts, {i: hyp[i] for i in ids})[1]))
    bleu4 = dict(zip(ids, Bleu(4).compute_score(gts, {i: hyp[i] for i in ids}, verbose=0)[1][3]))
    for r in rows:
        assert r["CIDEr"] == pytest.approx(cider[r["image_id"]], abs=1e-12)
        assert r["BLEU-4"] == pytest.approx(bleu4[r["image_id"]], abs=1e-12)
    metrics = json.loads((tested["models"] / "2_clip_top1.test.json").read_text())["metrics"]
    assert metrics["CIDEr"] == pytest.approx(sum(cider.values()) / len(cider), abs=1e-9)
    assert isinstance(metrics["METEOR"], float)


def test_the_recipe_alone_tests_and_says_in_one_line_that_the_gallery_needs_workflow_tools(tested):
    res, models = tested["alone"], tested["alone_models"]
    assert res.returncode == 0, explain(res)
    lines = [line for line in text(res).splitlines() if "test gallery" in line or "test_gallery" in line]
    assert len(lines) == 1 and "needs workflow_tools.py" in lines[0], lines
    assert (models / "2_clip_top1.test.json").is_file() and (models / "2_clip_top1.test_captions.jsonl").is_file()
    assert not (models / "2_clip_top1.test_gallery.html").exists()


def chromium(*args: str, folder: Path) -> subprocess.CompletedProcess:
    """Headless Chromium, offline: no sandbox (root in CI), no GPU, no network services, its own profile."""
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={folder / 'profile'}", "--window-size=1200,900", *args],
                          capture_output=True, text=True, timeout=180)


@BROWSER
def test_a_headless_browser_shows_the_gallery_and_its_filter_hides_the_rows_without_the_words(handmade, tmp_path):
    page, rows = handmade
    shot = tmp_path / "gallery.png"
    res = chromium(f"--screenshot={shot}", page.as_uri(), folder=tmp_path)
    assert shot.is_file(), res.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 900)
    colours = dict((c, n) for n, c in image.getcolors(maxcolors=1 << 20))
    white = sum(n for c, n in colours.items() if min(c) >= 250)
    assert len(colours) > 50 and white < 0.95 * image.width * image.height  # text, table lines, thumbnails
    for colour in COLOURS.values():  # each colour's thumbnails are drawn (scaled up without smoothing)
        assert colours.get(colour, 0) > 500, colour

    dom = chromium("--dump-dom", f"{page.as_uri()}#red%20circle", folder=tmp_path).stdout
    shown = parse_gallery(dom).rows
    visible = {r["data-id"] for r in shown if "hidden" not in r}
    assert visible == {r["image_id"] for r in rows if "red" in r["generated"] and "circle" in r["generated"]}
    assert 0 < len(visible) < len(rows) and f'<span id="shown">{len(visible)}</span>' in dom


# ---------------------------------------------------------------------------------------------
# The console
# ---------------------------------------------------------------------------------------------

def banner_rows(res) -> list[str]:
    """The rows of the start banner's settings table: the indented lines after its header."""
    lines = text(res).splitlines()
    start = next(i for i, line in enumerate(lines) if "settings that differ from the defaults:" in line)
    rows = []
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        rows.append(line.split())
    return lines[start], rows


@pytest.mark.parametrize("changed", [{}, {"TOP_K": "1", "EPOCHS": "5"}])
def test_the_banner_lists_only_the_settings_that_differ_from_the_defaults(tmp_path, changed):
    """With the .env a user copies from .env.example, and with two variables changed on top of it. The run
    then stops at the hub dataset (offline here): the banner comes first."""
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HF_"))}
    env.update({"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1", **changed})
    res = run_script(["--train"], env, cwd=tmp_path)
    assert res.returncode == 1 and "lmms-lab/flickr30k could not be fetched" in res.stderr, explain(res)
    header, rows = banner_rows(res)
    assert rows == [[k, v] for k, v in changed.items()]
    assert header.endswith("none") == (not changed)
    assert "config:" not in res.stderr  # the whole configuration is no longer printed


# ---------------------------------------------------------------------------------------------
# Validation speed: the same numbers with one METEOR JVM and the PTB tokens of texts seen before
# ---------------------------------------------------------------------------------------------

def demo_evaluation(epoch: int, n: int = 40) -> tuple[dict, dict]:
    """(predictions, references) of n demo images as an epoch's validation would see them: the references fixed,
    the predictions changing from epoch to epoch (some right, some wrong words, punctuation, an empty one)."""
    references, predictions = {}, {}
    for i in range(n):
        _, captions, _ = tools.demo_item("shapes", i, seed=42)
        references[f"{i:05d}"] = captions
        words = captions[(i + epoch) % 5].split()
        if (i + epoch) % 3 == 0:
            words[-1] = "triangle" if words[-1] != "triangle" else "circle"
        predictions[f"{i:05d}"] = "" if i == epoch else " ".join(words) + ("." if i % 4 == 0 else "")
    return predictions, references


@JAVA
def test_caption_metrics_equal_a_fresh_coco_toolkit_at_every_evaluation_with_one_meteor_jvm():
    """What every validation used to do (a PTB tokenizer JVM per call, a METEOR JVM per evaluation) against
    what it does now (tokens of texts seen before reused, one METEOR JVM for the process)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    jvms = set()
    for epoch in (1, 2):
        predictions, references = demo_evaluation(epoch)
        got = mtl.caption_metrics(predictions, references)
        jvms.add(mtl._METEOR.meteor_p.pid)
        gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in references[k]] for k in predictions})
        res = PTBTokenizer().tokenize({k: [{"caption": predictions[k]}] for k in predictions})
        meteor = Meteor()
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        expected = {**{f"BLEU-{n + 1}": b for n, b in enumerate(bleu)}, "METEOR": meteor.compute_score(gts, res)[0],
                    "ROUGE-L": Rouge().compute_score(gts, res)[0], "CIDEr": Cider().compute_score(gts, res)[0]}
        del meteor
        assert got == pytest.approx(expected, abs=1e-12), epoch
    assert len(jvms) == 1  # one METEOR process served both evaluations
