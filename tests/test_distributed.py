"""attack.py's tries spread over two CPU processes (Lightning's ddp) give the one-process run.

Every try draws its randomness from (seed, try index): the ``random`` guesses, the dp
defense's noise and the FedAvg client's shuffles below all depend on it, so a try run
by the second process must equal the same try run alone.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.helpers import StreamWatcher

#: what may differ between the runs: how they ran, not what they found
HOW_IT_RAN = {"config", "seconds_per_try", "processes"}


def attack_process(tmp_path, name, *args):
    results = tmp_path / f"{name}.json"
    cmd = [sys.executable, "attack.py", *args, "--log_dir", str(tmp_path / "logs")]
    cmd += ["--exp_name", name, "--results", str(results), "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(results.read_text()), proc


@pytest.mark.slow
def test_two_ddp_processes_give_the_one_process_run_on_real_mnist(tmp_path, shared_data):
    # Real MNIST; every method (random included), dp noise and two local epochs of FedAvg:
    # the three per-try random streams.
    options = ["--dataset", "MNIST_GRAY", "--data_root", str(shared_data), "--split", "fit_train"]
    options += ["--train_partition", "val", "--num_images", "16", "--num_tries", "5"]
    options += ["--local_epochs", "2", "--local_batch_size", "8"]
    options += ["--defense", "--defense_method", "dp", "--noise_std", "1e-3"]
    # and an extension, whose summary must cover the other process's tries too
    options += ["--analysis"]
    one, _ = attack_process(tmp_path, "one", *options)
    two, proc = attack_process(
        tmp_path, "two", *options, "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"
    )
    assert one["processes"] == 1 and two["processes"] == 2
    assert one["status"] == two["status"] == "complete"
    assert two["tries_done"] == 5 and len(two["tries"]) == 5
    # Exactly equal, to the last bit: the per-try counts in index order, every summary and
    # spread, the auxiliary data, defense and protocol records.
    assert {k: v for k, v in two.items() if k not in HOW_IT_RAN} == {
        k: v for k, v in one.items() if k not in HOW_IT_RAN
    }
    assert "random" in two["summary"] and two["defense"]["method"] == "dp"
    assert two["analysis"]["tries"] == 5 and len(two["tries"][1]["analysis"]) > 0
    assert two["config"]["devices"] == 2 and two["config"]["strategy"] == "ddp"
    # One run folder, written by the first process only; the second said nothing.
    (folder,) = (tmp_path / "logs" / "two").iterdir()
    assert json.loads((folder / "results.json").read_text()) == two
    assert proc.stdout.count("defense: dp") == 1


@pytest.mark.slow
def test_the_seeded_random_streams_are_per_try(tmp_path):
    # Three tries run alone give the first three of five: nothing a try draws depends on
    # the tries after it (or on how many there are).
    options = ["--attacks", "random", "--no-compare", "--local_epochs", "2"]
    options += ["--local_batch_size", "8", "--defense", "--defense_method", "dp"]
    five, _ = attack_process(tmp_path, "five", *options, "--num_tries", "5")
    three, _ = attack_process(tmp_path, "three", *options, "--num_tries", "3")
    assert three["tries"] == five["tries"][:3]
    guesses = [t["methods"]["random"]["counts"] for t in five["tries"]]
    assert len({tuple(g) for g in guesses}) == 5  # a fresh guess per try


def test_more_processes_than_tries_is_refused_before_anything_starts(tmp_path, capsys):
    import attack

    code = attack.main(["--devices", "3", "--num_tries", "2", "--log_dir", str(tmp_path / "logs")])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "attack.py: error: --devices 3 x --num_nodes 1 = 3 processes for 2 tries: each process "
        "needs a try; use at most 2 processes or more --num_tries"
    )
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_a_missing_peer_is_one_line_after_the_peer_timeout(tmp_path):
    """--num_nodes 2 with no second node: the wait ends after --peer_timeout, in one line with
    exit 2, and the run folder says the run failed with no try done."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "attack.py", "--num_nodes", "2", "--peer_timeout", "5", "--num_tries", "4",
         "--quiet", "--log_dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
        env={**os.environ, "MASTER_PORT": str(free_port())},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("attack.py: error:")]
    assert len(errors) == 1 and "did not all answer within --peer_timeout 5 s" in errors[0]
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - started < 120
    (results,) = tmp_path.glob("Experiment1/version_*/results.json")
    record = json.loads(results.read_text())
    assert record["status"] == "failed" and record["tries_done"] == 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_two_processes(tmp_path, num_tries):
    """attack.py on two CPU processes, its progress bar read on a thread; returns (process,
    stderr watcher) once 20 tries are done."""
    cmd = [sys.executable, "attack.py", "--accelerator", "cpu", "--devices", "2", "--strategy"]
    cmd += ["ddp", "--num_tries", str(num_tries), "--log_dir", str(tmp_path / "logs")]
    cmd += ["--results", str(tmp_path / "results.json")]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "MASTER_PORT": str(free_port())},
    )  # fmt: skip
    stdout, stderr = StreamWatcher(proc.stdout), StreamWatcher(proc.stderr)
    if not stderr.wait_for(f"20/{num_tries}", 240):
        proc.kill()
        pytest.fail(f"no 20 tries within 240 s: {stderr.text()[-2000:]}")
    return proc, stdout, stderr


@pytest.mark.slow
@pytest.mark.parametrize("target", ["worker", "first"])
def test_a_process_that_dies_or_is_stopped_ends_the_run_within_seconds_keeping_every_try(
    tmp_path, target
):
    """SIGKILL to the second process, or SIGTERM to the first while both work: the first
    stops within seconds, prints the table, and results.json holds every try the two had
    finished (the second's came as they were done), each the try a one-process run gives."""
    proc, stdout, stderr = start_two_processes(tmp_path, 400)
    try:
        (worker,) = children_of(proc.pid)
        os.kill(
            worker if target == "worker" else proc.pid,
            signal.SIGKILL if target == "worker" else signal.SIGTERM,
        )
        stopped = time.monotonic()
        proc.wait(timeout=60)
        ended_in = time.monotonic() - stopped
        err = stderr.finish()
    finally:
        proc.kill()
    assert ended_in < 20, ended_in
    data = json.loads((tmp_path / "results.json").read_text())
    done = data["tries_done"]
    assert data["status"] == "incomplete" and 20 <= done < 400 and len(data["tries"]) == done
    assert data["try_indices"] == sorted(data["try_indices"])
    assert {i % 2 for i in data["try_indices"]} == {0, 1}  # both processes' tries
    assert "Traceback" not in err and "decompose" in stdout.finish()
    errors = [line for line in err.splitlines() if line.startswith("attack.py: error:")]
    if target == "worker":
        assert proc.returncode == 2
        assert len(errors) == 1 and re.fullmatch(
            rf"attack\.py: error: process 1 of 2 \(pid {worker}\) was killed by SIGKILL after "
            rf"\d+ tries; results\.json keeps the {done} finished tries of 400, marked incomplete",
            errors[0],
        ), errors
        assert data["error"].startswith(f"process 1 of 2 (pid {worker}) was killed by SIGKILL")
    else:
        assert proc.returncode == 143 and errors == []
        assert f"interrupted (SIGTERM) after {done} of 400 tries" in err
    # Each try is a function of (seed, index) alone: the first ten are a ten-try run's.
    if target == "worker":
        ten, _ = attack_process(tmp_path, "ten", "--num_tries", "10")
        kept = dict(zip(data["try_indices"], data["tries"]))
        for index, record in enumerate(ten["tries"]):
            if index in kept:
                assert kept[index]["true_counts"] == record["true_counts"]
                assert kept[index]["methods"] == record["methods"]


def children_of(pid: int) -> list[int]:
    """The processes ``pid`` started (Linux's /proc; Lightning starts the second at once)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = [
            int(path.parent.name)
            for path in Path("/proc").glob("[0-9]*/stat")
            if _parent_of(path) == pid
        ]
        if found:
            return found
        time.sleep(0.1)
    return []


def _parent_of(stat_path) -> int | None:
    try:
        # "pid (name) state ppid ...": the name may hold spaces, so split after its ")"
        return int(stat_path.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
