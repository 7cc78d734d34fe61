"""The repository stands alone: its documentation covers every variable and option, and nothing in it
points outside the repository."""
import dataclasses
import re
import subprocess
from pathlib import Path

import multimodal_transfer_learning as mtl

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / n for n in names if not n.endswith((".png", ".jpg"))]


def test_no_file_points_outside_the_repository():
    outside = re.compile(r"\.\./shared|/work/")
    offenders = [str(p.relative_to(ROOT)) for p in tracked_text_files()
                 if p.is_file() and p.name != "test_docs.py" and outside.search(p.read_text(errors="replace"))]
    assert offenders == []


def test_the_readme_and_env_example_name_every_variable():
    example = (ROOT / ".env.example").read_text()
    readme_words = set(re.findall(r"[A-Z][A-Z0-9_]+", README))
    for f in dataclasses.fields(mtl.Config):
        name = f.name.upper()
        assert name in readme_words, f"{name} is not in README.md"
        if not f.metadata["secret"]:
            assert re.search(rf"^{name}=", example, re.M), f"{name} is not in .env.example"


def test_the_readme_names_every_command_line_option():
    parser_options = re.findall(r"add_argument\(\s*\"(--[a-z-]+)\"", (ROOT / "multimodal_transfer_learning.py").read_text())
    assert len(parser_options) >= 15
    missing = [o for o in parser_options if not re.search(rf"(?<![\w-]){o}(?![\w-])", README)]
    assert missing == []


def test_the_readme_has_no_unfilled_figures():
    assert "{{" not in README and "TODO" not in README


def test_ci_runs_the_readmes_commands_as_they_stand():
    """.ci/run is the README's set-up and test commands, nothing else, so the two cannot drift apart."""
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith(("#", "set ", "cd "))]
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", README, re.S))
    readme_commands = {line.split("  #")[0].strip() for line in blocks.splitlines()}
    assert commands and [c for c in commands if c not in readme_commands] == []
    assert commands[-1] == "python -m pytest -q tests"
