"""Several processes (torchrun + DistributedDataParallel): N processes give what one process gives at the
same global BATCH_SIZE, only rank 0 speaks and writes, evaluation shared out over the ranks gives the
one-process metrics, a killed rank stops the whole run within a minute and --resume finishes it.

Real torch.distributed with gloo on CPU: `python -m torch.distributed.run --standalone --nproc_per_node 2`
runs the script as a user would, on the tiny fixtures. The data set is chosen so that the awkward cases
happen: 79 images give 63 train images x 3 captions = 189 pairs, an odd count, so with BATCH_SIZE=2
(one pair per rank) the last micro-batch holds a single pair and rank 0's share of it is empty;
GRAD_ACCUM=2 makes every step accumulate (DDP's no_sync), the last step with a short micro-batch.
EVAL_BATCH_SIZE=3 makes the evaluation batches fall unevenly on the two ranks. Each run writes, through
an audit hook, which files every rank renamed into place (atomic writes end in os.replace)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import multimodal_transfer_learning as mtl
from conftest import (SCRIPT, error_lines, explain, leftover_temp_files, make_env, parallel, path_without_java,
                      run_fast_path_script, wandb_runs, weights, write_image_folder)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
LOG_LINE = re.compile(r"\d\d:\d\d:\d\d (INFO|WARNING|ERROR)\s+(.*)")
# Runs the script as torchrun would, recording the destination of every rename (atomic writes) per rank.
AUDITED = '''
import os, runpy, sys
record = open(os.environ["RENAMES_LOG"] + "." + os.environ.get("RANK", "plain"), "a")
def hook(event, args):
    if event == "os.rename":
        record.write(os.fspath(args[1]) + "\\n")
        record.flush()
sys.addaudithook(hook)
sys.argv[0] = {script!r}
runpy.run_path({script!r}, run_name="__main__")
'''


def launch(args: list[str], env: dict, processes: int, **popen) -> subprocess.Popen:
    """The script under torchrun (processes > 1) or plain python, through the audit wrapper."""
    wrapper = Path(env["CACHE_DIR"]).parent / "audited.py"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(AUDITED.format(script=str(SCRIPT)))
    command = [*TORCHRUN[:-1], str(processes)] if processes > 1 else [sys.executable]
    return subprocess.Popen([*command, str(wrapper), *args], env=env, cwd=wrapper.parent, stdin=subprocess.DEVNULL,
                            text=True, **popen)


def run(args: list[str], env: dict, processes: int, timeout: int = 400) -> subprocess.CompletedProcess:
    proc = launch(args, env, processes, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def renames(env: dict) -> dict[str, list[str]]:
    """{rank ("0", "1" or "plain"): [every file renamed into place, in order]}."""
    log = Path(env["RENAMES_LOG"])
    return {p.suffix[1:]: p.read_text().splitlines() for p in log.parent.glob(log.name + ".*")}


def log_lines(stderr: str, root: Path) -> Counter:
    """Our log lines, without time stamps, numbers and the run's folder (so that two runs compare)."""
    found = (m.group(1) + " " + m.group(2) for line in stderr.splitlines() for m in LOG_LINE.finditer(line))
    found = (re.sub(r"run-[\w-]+", "run-ID", line.replace(str(root), "ROOT")) for line in found)  # W&B run ids
    return Counter(re.sub(r"\d+(\.\d+)?", "N", line) for line in found)


# ---------------------------------------------------------------------------------------------
# The runs (module-wide: each is a few torchrun start-ups on two shared cores)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ddp_env(tmp_path_factory, tiny_lm_dir, tiny_clip_dir):
    root = tmp_path_factory.mktemp("distributed")
    data = write_image_folder(root / "images", 79)
    path = path_without_java(root / "path")

    def env(name: str, **overrides) -> dict[str, str]:
        settings = dict(BATCH_SIZE="2", GRAD_ACCUM="2", EVAL_BATCH_SIZE="3", VAL_CAPTION_IMAGES="4", PATH=path,
                        RENAMES_LOG=str(root / name / "renames"))
        return make_env(root / name, tiny_lm_dir, tiny_clip_dir, data, **{**settings, **overrides})
    return root, env


@pytest.fixture(scope="module")
def runs(ddp_env):
    """The same training (2 epochs) by one process and by two, side by side."""
    root, env = ddp_env
    envs = {"one": env("one"), "two": env("two")}
    res = parallel({"one": lambda: run(["--train"], envs["one"], processes=1),
                    "two": lambda: run(["--train"], envs["two"], processes=2)})
    for name in res:
        assert res[name].returncode == 0, explain(res[name])
    return {name: (res[name], envs[name], root / name) for name in res}


def stop_in_epoch_2(env: dict, how: str) -> tuple[int, float, str]:
    """Start two processes and, as soon as rank 0 starts epoch 2, either SIGKILL rank 1 ("kill") or press
    Ctrl-C (SIGINT to the whole process group, as a terminal does: "ctrl-c"); returns (exit code,
    seconds from then to the end of torchrun, stderr)."""
    folder = Path(env["CACHE_DIR"]).parent
    folder.mkdir(parents=True, exist_ok=True)
    err_path = folder / "stderr.txt"
    with open(err_path, "w") as err:
        proc = launch(["--train"], env, processes=2, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while "epoch 2/2" not in err_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proc.poll() is None and "epoch 2/2" in err_path.read_text(), err_path.read_text()[-3000:]
            if how == "kill":
                os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
            else:
                os.killpg(proc.pid, signal.SIGINT)
            stopped = time.monotonic()
            code = proc.wait(timeout=120)
            return code, time.monotonic() - stopped, err_path.read_text()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def rank_pid(torchrun_pid: int, rank: int) -> int:
    """The process torchrun started as RANK=rank (a child of its agent)."""
    for pid in Path("/proc").iterdir():
        try:
            stat = (pid / "stat").read_text()
            environ = (pid / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == torchrun_pid and f"RANK={rank}".encode() in environ:
            return int(pid.name)
    raise AssertionError(f"no rank {rank} under torchrun {torchrun_pid}")


@pytest.fixture(scope="module")
def killed_and_resumed(ddp_env, runs):
    """A two-process run whose rank 1 dies mid-epoch 2, then the same torchrun with --resume; beside it,
    --test of the two-process run's checkpoint by one process and by two, both reading the feature cache
    that run wrote (DECODING=sample: each caption must come out the same wherever it is drawn), a global
    batch that does not divide, and Ctrl-C."""
    root, env = ddp_env
    env_k = env("killed")
    test_envs = {}
    for name in ("test_one", "test_two"):  # --test writes beside the checkpoint: one copy each
        test_envs[name] = env(name, DECODING="sample", RETRIEVAL_POOL="3", CACHE_DIR=str(root / "two" / "cache"))
        shutil.copytree(runs["two"][2] / "models", root / name / "models")

    def kill_then_resume():
        code, seconds, stderr = stop_in_epoch_2(env_k, "kill")
        after_kill = sorted(p.name for p in (root / "killed" / "models").glob("*.pt"))
        return code, seconds, stderr, after_kill, run(["--train", "--resume"], env_k, processes=2)

    def the_others():
        one = run(["--test"], test_envs["test_one"], processes=1)
        two = run(["--test"], test_envs["test_two"], processes=2)
        odd = run(["--train"], env("odd", BATCH_SIZE="3"), processes=2, timeout=200)
        caption = run(["--caption", "x.png"], env("caption"), processes=2, timeout=200)
        return one, two, odd, caption, stop_in_epoch_2(env("ctrl-c"), "ctrl-c")
    res = parallel({"killed": kill_then_resume, "others": the_others})
    code, seconds, stderr, after_kill, resumed = res["killed"]
    one, two, odd, caption, ctrl_c = res["others"]
    return {"code": code, "seconds": seconds, "stderr": stderr, "after_kill": after_kill, "resumed": resumed,
            "env": env_k, "folder": root / "killed", "test_one": one, "test_two": two, "odd": odd, "caption": caption,
            "env_test_one": test_envs["test_one"], "env_test_two": test_envs["test_two"],
            "ctrl-c": ctrl_c, "root": root}


# ---------------------------------------------------------------------------------------------
# Same meaning at any scale
# ---------------------------------------------------------------------------------------------

def test_two_processes_train_the_weights_one_process_trains(runs):
    one, two = (runs[k][2] / "models" for k in ("one", "two"))
    for epoch in (1, 2):
        a, b = (torch.load(m / f"{epoch}_clip_top1.pt", weights_only=True) for m in (one, two))
        assert set(a["model"]) == set(b["model"])
        diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
        assert diff <= 1e-5, f"epoch {epoch}: max weight difference {diff}"
        assert a["step"] == b["step"] == 48 * epoch  # 95 micro-batches of the global batch, 2 per step
        assert b["metrics"]["train_loss"] == pytest.approx(a["metrics"]["train_loss"], abs=1e-5)
        assert b["metrics"]["loss"] == pytest.approx(a["metrics"]["loss"], abs=1e-5)
        captions = {k: v for k, v in a["metrics"].items() if k not in ("loss", "train_loss", "train_seconds")}
        assert captions and {k: b["metrics"][k] for k in captions} == captions
    first = torch.load(one / "1_clip_top1.pt", weights_only=True)["model"]["adapter.net.0.weight"]
    assert not torch.equal(first, weights(one / "2_clip_top1.pt")["adapter.net.0.weight"])  # it trained


def test_two_processes_train_a_qformer_as_one_process_does(ddp_env):
    """ADAPTER=qformer: rank 0 alone writes the patch-token cache while rank 1 waits, then both read it
    memory-mapped and take their shares of every batch; the weights are the one-process weights.
    Except the attention's key biases: softmax ignores a shift shared by all keys, so their true
    gradient is zero and what they get is rounding noise, which AdamW scales up to full-size steps
    in both runs alike (seen: 8e-5 apart after 48 steps, while the loss agrees to every digit)."""
    _, env = ddp_env
    envs = {n: env(f"qformer-{n}", ADAPTER="qformer", EPOCHS="1") for n in ("one", "two")}
    res = parallel({"one": lambda: run(["--train"], envs["one"], processes=1),
                    "two": lambda: run(["--train"], envs["two"], processes=2)})
    for name in res:
        assert res[name].returncode == 0, explain(res[name])
    one, two = (weights(Path(envs[k]["OUTPUT_DIR_MODELS"]) / "1_clip_qformer_top1.pt") for k in ("one", "two"))
    assert set(one) == set(two) and any(k.startswith("adapter.") for k in one)
    for k in [k for k in one if k.endswith("in_proj_bias")]:
        width = one[k].numel() // 3
        one[k], two[k] = (torch.cat([w[:width], w[2 * width:]]) for w in (one[k], two[k]))  # without the keys'
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    assert diff <= 1e-5, f"max weight difference {diff}"
    written = renames(envs["two"])
    cache = str(Path(envs["two"]["CACHE_DIR"]) / "features")
    assert [p for p in written["1"] if p.startswith(cache)] == [], "rank 1 wrote to the feature cache"
    assert any(p.startswith(cache) for p in written["0"]), written


# ---------------------------------------------------------------------------------------------
# One voice
# ---------------------------------------------------------------------------------------------

def test_checkpoints_history_and_feature_cache_are_written_by_rank_0_only(runs):
    _, env, folder = runs["two"]
    written = renames(env)
    assert set(written) == {"0", "1"}, written
    assert [p for p in written["1"] if str(folder) in p] == [], "rank 1 wrote files"
    names = Counter(Path(p).name for p in written["0"])
    # epoch 1's checkpoint is written, then rewritten without the optimizer state once epoch 2's exists
    assert names["1_clip_top1.pt"] == 2 and names["2_clip_top1.pt"] == 1, names
    assert names["clip_top1.history.jsonl"] == 2, names  # a line per epoch
    history = [json.loads(line) for line in (folder / "models" / "clip_top1.history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2]
    assert sum(n for name, n in names.items() if name.endswith(".pt") and "clip-" in name) == 1, names  # features
    assert sorted(p.name for p in (folder / "models").glob("*.pt")) == ["1_clip_top1.pt", "2_clip_top1.pt"]
    assert leftover_temp_files(folder / "models") == []


def test_two_processes_share_the_image_encoding_out_and_cache_what_one_process_caches(runs):
    caches = {k: list((runs[k][2] / "cache" / "features").glob("*.pt")) for k in ("one", "two")}
    assert [p.name for p in caches["one"]] == [p.name for p in caches["two"]] and len(caches["one"]) == 1, caches
    one, two = (torch.load(caches[k][0], weights_only=True) for k in ("one", "two"))
    assert two["ids"] == one["ids"] and len(one["ids"]) == 79 and two["bad"] == one["bad"] == {}
    torch.testing.assert_close(two["features"], one["features"], rtol=0, atol=1e-6)  # batches differ: rounding
    assert "encoding images: " in runs["two"][0].stderr  # rank 0's bar: its share only
    assert re.search(r"encoding images: .*\b0/39 ", runs["two"][0].stderr), "rank 0 encodes its 39 of 79"


def test_only_rank_0_logs_shows_progress_and_talks_to_wandb(runs):
    (one, _, folder_one), (two, env, folder_two) = runs["one"], runs["two"]
    lines_one, lines_two = log_lines(one.stderr, folder_one), log_lines(two.stderr, folder_two)
    only_two = lines_two - lines_one
    assert set(only_two) == {"INFO torchrun: N processes (gloo), this one on cpu",
                             "INFO BATCH_SIZE=N is the global batch: N pairs on each of the N processes"}, only_two
    assert sum(only_two.values()) == 2 and not lines_one - lines_two, lines_one - lines_two
    assert "[rank 1]" not in two.stderr and "[rank1]" not in two.stderr
    for bar in ("epoch 1/2:", "epoch 2/2:", "loss:", "generating:"):
        assert two.stderr.count(bar) == one.stderr.count(bar) > 0, bar
    runs = wandb_runs(Path(env["WANDB_DIR"]))
    assert [r["exit_code"] for rs in runs.values() for r in rs] == [0], runs


def test_a_global_batch_that_does_not_divide_exits_2_naming_both(killed_and_resumed):
    res = killed_and_resumed["odd"]
    assert res.returncode != 0, explain(res)
    (line,) = error_lines(res)  # rank 1 meets the same configuration error and leaves it to rank 0
    assert "BATCH_SIZE=3" in line and "WORLD_SIZE=2" in line, line
    assert re.search(r"exitcode\s*: 2", res.stderr), res.stderr[-2000:]  # torchrun's summary of the ranks
    assert not (killed_and_resumed["root"] / "odd" / "models").exists()


def test_commands_other_than_train_and_test_refuse_several_processes(killed_and_resumed):
    res = killed_and_resumed["caption"]
    assert res.returncode != 0, explain(res)
    (line,) = error_lines(res)
    assert "only --train and --test" in line and "plain python" in line, line
    assert re.search(r"exitcode\s*: 2", res.stderr), res.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Evaluation shared out over the ranks
# ---------------------------------------------------------------------------------------------

def test_sharded_evaluation_gives_exactly_the_one_process_metrics_and_captions(killed_and_resumed):
    root = killed_and_resumed["root"]
    for name in ("test_one", "test_two"):
        assert killed_and_resumed[name].returncode == 0, explain(killed_and_resumed[name])
    for name in ("test_one", "test_two"):  # both read the cache the two-process training wrote
        assert "image features: read 79 from cache" in killed_and_resumed[name].stderr
        assert not [p for ps in renames(killed_and_resumed["env_" + name]).values() for p in ps if "/features/" in p]
    one, two = (json.loads((root / n / "models" / "2_clip_top1.test.json").read_text()) for n in ("test_one", "test_two"))
    assert one["metrics"]["num_images"] == 8 and one["metrics"]["retrieval_pool"] == 3
    assert two["metrics"] == one["metrics"]
    captions = [(root / n / "models" / "2_clip_top1.test_captions.jsonl").read_text() for n in ("test_one", "test_two")]
    assert captions[0] == captions[1] and captions[0].count("\n") == 8
    assert killed_and_resumed["test_two"].stdout == killed_and_resumed["test_one"].stdout.replace("test_one", "test_two")


# ---------------------------------------------------------------------------------------------
# A rank that dies
# ---------------------------------------------------------------------------------------------

def test_a_killed_rank_stops_the_whole_run_within_a_minute(killed_and_resumed):
    k = killed_and_resumed
    assert k["code"] != 0 and k["seconds"] < 60, (k["code"], k["seconds"], k["stderr"][-3000:])
    assert k["after_kill"] == ["1_clip_top1.pt"]  # killed in epoch 2: epoch 1's checkpoint is whole, no other
    assert leftover_temp_files(k["folder"] / "models") == []
    # rank 0 says in one line what happened and how to go on; no traceback of the script's own
    assert "--train --resume" in k["stderr"], k["stderr"][-3000:]
    assert "multimodal_transfer_learning.py\", line" not in k["stderr"] and "[rank0]:" not in k["stderr"]


def test_ctrl_c_stops_every_rank_with_one_line_and_the_resume_hint(killed_and_resumed):
    code, seconds, stderr = killed_and_resumed["ctrl-c"]
    assert code != 0 and seconds < 60, (code, seconds, stderr[-3000:])
    ours = [m.group(0) for line in stderr.splitlines() for m in LOG_LINE.finditer(line) if "stopped" in m.group(0)]
    assert len(ours) == 1 and "Ctrl-C" in ours[0] and "--train --resume" in ours[0], ours  # rank 0's, alone
    assert "multimodal_transfer_learning.py\", line" not in stderr and "[rank" not in stderr
    models = killed_and_resumed["root"] / "ctrl-c" / "models"
    assert sorted(p.name for p in models.glob("*.pt")) == ["1_clip_top1.pt"] and leftover_temp_files(models) == []


def test_resume_after_a_killed_rank_finishes_with_the_uninterrupted_weights(killed_and_resumed, runs):
    res = killed_and_resumed["resumed"]
    assert res.returncode == 0, explain(res)
    assert "resuming from" in res.stderr and "epoch 1/2" not in res.stderr
    resumed = weights(killed_and_resumed["folder"] / "models" / "2_clip_top1.pt")
    uninterrupted = weights(runs["two"][2] / "models" / "2_clip_top1.pt")
    diff = max((resumed[k] - uninterrupted[k]).abs().max().item() for k in uninterrupted)
    assert diff <= 1e-6, f"max weight difference {diff}"


# ---------------------------------------------------------------------------------------------
# The rank arithmetic
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shares_of_a_batch_cover_it_once_in_order_and_differ_by_at_most_one(world):
    for n in range(0, 20):
        shares = [mtl.Dist(rank, world).share(n) for rank in range(world)]
        assert [i for s in shares for i in range(n)[s]] == list(range(n)), (n, shares)
        sizes = [len(range(n)[s]) for s in shares]
        assert max(sizes) - min(sizes) <= 1 and sizes[0] == min(sizes), (n, sizes)  # rank 0 takes the least


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_evaluation_batches_are_the_one_process_batches_dealt_out(world):
    for n, size in [(0, 4), (1, 4), (10, 3), (24, 3), (17, 64)]:
        one_process = mtl.Dist().my_batches(n, size)
        assert one_process == [range(s, min(s + size, n)) for s in range(0, n, size)]
        dealt = sorted((b for rank in range(world) for b in mtl.Dist(rank, world).my_batches(n, size)),
                       key=lambda r: r.start)
        assert dealt == one_process, (n, size, world)


def test_a_plain_process_is_not_distributed_and_torchrun_variables_are_read():
    assert mtl.read_torchrun_environment({}) == mtl.Dist()
    assert not mtl.Dist().launched and mtl.Dist().is_main
    dist = mtl.read_torchrun_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (dist.rank, dist.world_size, dist.local_rank, dist.launched, dist.is_main) == (3, 4, 1, True, False)
    with pytest.raises(mtl.UserError) as e:
        mtl.read_torchrun_environment({"WORLD_SIZE": "4"})
    assert e.value.exit_code == 2 and "torchrun" in str(e.value)


# ---------------------------------------------------------------------------------------------
# The compiled fast path: no rank compiles while the others wait
# ---------------------------------------------------------------------------------------------

def test_under_torchrun_every_graph_compiles_before_training(base_env):
    """Counted from TORCH_LOGS=recompiles (the light aot_eager backend stands in for inductor: dynamo
    decides the graphs): all training and evaluation graphs compile in `use_fast_path`, none later."""
    stderr, buckets = run_fast_path_script({**base_env, "MAX_CAPTION_TOKENS": "23", "BATCH_SIZE": "4",
                                            "EVAL_BATCH_SIZE": "8"}, up_front=True)
    before, after = stderr.split("compiled up front")
    assert before.count("Recompiling function") + 1 == 4 * buckets, before[-3000:]  # see test_training.py
    assert after.count("Recompiling function") == 0, after[-3000:]
