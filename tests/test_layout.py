"""The layout: the recipe file runs alone (copied without workflow_tools.py it trains and tests, and the
workflow commands say in one line what they need), the tools share the running script's module instead
of importing a second copy, and the recipe's sections follow a run from top to bottom."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

from conftest import ROOT, SCRIPT, error_lines, explain

# The order a run takes, as the section headings of the recipe must show it.
RUN_ORDER = ["Config", "Logging", "Processes", "Data", "Vision encoder", "Adapter, language model", "Training",
             "Evaluation", "Checkpoints", "Weights & Biases", "Support", "Runs", "Command line"]


def test_the_recipe_alone_trains_and_tests_and_the_tools_commands_name_the_missing_file(tmp_path, base_env):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(SCRIPT, alone)
    env = {**base_env, "EPOCHS": "1"}

    def run(*args):
        return subprocess.run([sys.executable, str(alone / SCRIPT.name), *args], env=env, cwd=alone,
                              capture_output=True, text=True, timeout=600)
    for job in ("--train", "--test"):
        res = run(job)
        assert res.returncode == 0, explain(res)
    assert sorted(p.name for p in alone.iterdir()) == [SCRIPT.name]  # nothing imported from beside it
    (alone / "variant.env").write_text("TOP_K=0\n")
    for args in (["--sweep", "variant.env"], ["--compare"], ["--export", str(tmp_path / "export")], ["--train", "--demo"]):
        res = run(*args)
        (line,) = error_lines(res)
        assert res.returncode == 1 and "needs workflow_tools.py beside multimodal_transfer_learning.py" in line, explain(res)
        assert ("--demo" if "--demo" in args else args[0]) in line
        assert "Traceback" not in res.stderr


def test_the_tools_use_the_running_script_as_their_recipe_module(tmp_path):
    """Run as a script, the recipe is the module __main__: workflow_tools must get that very module (one DIST,
    one Config), not import the file a second time under its own name."""
    probe = f"""
import runpy, sys
sys.argv = ["multimodal_transfer_learning.py", "--compare", {str(tmp_path)!r}]
try:
    runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
except SystemExit:
    pass
import workflow_tools
print(workflow_tools.mtl.__name__, workflow_tools.mtl.__file__)
"""
    res = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert res.stdout.split() == ["__main__", str(SCRIPT)], explain(res)


def test_the_recipe_sections_follow_a_run():
    headings = re.findall(r"^# =+\n# (.+)\n# =+$", SCRIPT.read_text(), re.M)
    positions = [next((i for i, h in enumerate(headings) if h.startswith(name)), None) for name in RUN_ORDER]
    assert None not in positions, list(zip(RUN_ORDER, positions))
    assert positions == sorted(positions), headings
