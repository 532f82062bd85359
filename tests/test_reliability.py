"""Interrupted runs keep their tries, same seed gives the same run, bad numbers stay defined."""

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from experiment import runner
from experiment.cli import build_parser
from tests.conftest import REPO, answer_ctrl_c
from tests.helpers import StreamWatcher


def _comparable(results: dict) -> dict:
    """results.json without what legitimately differs between two runs: timings and output paths."""
    results = dict(results)
    results.pop("seconds_per_try")
    results["config"] = {
        k: v for k, v in results["config"].items() if k not in ("results", "log_dir")
    }
    return results


def test_same_seed_same_batches_and_counts_across_processes(tmp_path):
    # Three interpreters at once (seed 1234 twice, seed 7 once): each is mostly start-up.
    runs = {}
    for name, seed in (("a", "1234"), ("b", "1234"), ("c", "7")):
        cmd = [sys.executable, "attack.py", "--quiet", "--num_tries", "4", "--seed", seed]
        cmd += ["--log_dir", str(tmp_path / name), "--results", str(tmp_path / f"{name}.json")]
        runs[name] = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
    outputs = {}
    for name, proc in runs.items():
        try:
            _, err = proc.communicate(timeout=300)
        finally:
            proc.kill()
        assert proc.returncode == 0, err
        outputs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert _comparable(outputs["a"]) == _comparable(outputs["b"])
    assert outputs["c"]["tries"] != outputs["a"]["tries"]


def test_interrupted_run_keeps_finished_tries_marked_incomplete(tmp_path):
    results = tmp_path / "results.json"
    cmd = [
        sys.executable,
        "attack.py",
        "--num_tries",
        "100000",
        "--log_dir",
        str(tmp_path / "logs"),
    ]
    proc = subprocess.Popen(
        [*cmd, "--results", str(results)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # Wait until the progress bar shows a finished try: a try of every method takes a
        # fraction of a second, more on a loaded machine, so a fixed wait after the bar
        # appears could stop the run before its first try ends.
        stderr = StreamWatcher(proc.stderr)
        assert stderr.wait_for("1/100000", 240), stderr.text()[-2000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        err = stderr.finish()
    finally:
        proc.kill()
    assert proc.returncode == 143  # 128 + SIGTERM
    data = json.loads(results.read_text())
    assert data["status"] == "incomplete"
    assert data["tries_done"] == len(data["tries"]) >= 1
    run_dir = next((tmp_path / "logs" / "Experiment1").iterdir())
    assert json.loads((run_dir / "results.json").read_text()) == data
    assert not list(run_dir.glob(".results.json.*"))  # no temporary file left behind
    assert "marked incomplete" in err
    assert "interrupted (SIGTERM)" in err and "Traceback" not in err


def test_non_finite_gradients_give_defined_results(tmp_path):
    args = build_parser().parse_args(["--num_tries", "3", "--quiet", "--log_dir", str(tmp_path)])
    setup = runner.prepare(args)
    with torch.no_grad():
        setup.model.classifier.weight[0, 0] = float("nan")
    results = runner.run(setup, tmp_path)
    assert results["nonfinite_tries"] == 3
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    for method, summary in results["summary"].items():
        for value in summary.values():
            assert value is None or math.isfinite(value), method
    for attempt in results["tries"]:
        counts = attempt["methods"]["iLRG"]["counts"]
        assert all(isinstance(c, int) and 0 <= c <= 24 for c in counts)


class _RunsACommand:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_that_would_run_code_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "dnn_SYNTH_MNIST_Iter5.ckpt"
    torch.save(
        {"state_dict": {}, "hyper_parameters": {"model": "dnn"}, "payload": _RunsACommand(marker)},
        evil,
    )
    commands = {
        "attack.py": ["attack.py", "--checkpoint", str(evil)],
        "attack.py --checkpoints": ["attack.py", "--checkpoints", str(tmp_path / "*.ckpt")],
        "train.py": ["train.py", "--resume", str(evil), "--iter_train", "--iters", "5"],
    }
    # All three at once: each is an interpreter's start-up and one refused load.
    procs = {
        name: subprocess.Popen(
            [sys.executable, *args, "--log_dir", str(tmp_path / "logs" / name.split()[0])],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in commands.items()
    }
    for name, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=300)
        finally:
            proc.kill()
        assert proc.returncode == 2, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and str(evil) in lines[0] and "refused" in lines[0], (name, err)
        assert not marker.exists(), name


@pytest.mark.slow
def test_interrupted_training_leaves_a_checkpoint_to_resume_from(tmp_path):
    ckpt = tmp_path / "ckpt"
    cmd = [
        sys.executable,
        "train.py",
        *("--model_path", str(ckpt), "--log_dir", str(tmp_path / "logs"), "--quiet"),
        *(
            "--iter_train",
            "--iters",
            "1200",
            "--mid_save",
            "--iter_interval",
            "200",
            "--batch_size",
            "8",
        ),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=answer_ctrl_c,
    )
    try:
        deadline = time.monotonic() + 300
        while not (ckpt / "dnn_SYNTH_MNIST_Iter200.ckpt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    interrupted = ckpt / "dnn_SYNTH_MNIST_interrupted.ckpt"
    assert proc.returncode == 130, err
    assert (
        err.strip().splitlines()[-1] == f"train.py: interrupted; resume with --resume {interrupted}"
    )
    state = torch.load(interrupted, weights_only=True)
    assert 200 <= state["global_step"] < 1200
    resumed = subprocess.run(
        [*cmd, "--resume", str(interrupted)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    stages = sorted(
        int(p.stem.rsplit("Iter", 1)[1]) for p in ckpt.glob("dnn_SYNTH_MNIST_Iter*.ckpt")
    )
    assert stages == [0, 200, 400, 600, 800, 1000, 1200]
    assert (
        torch.load(ckpt / "dnn_SYNTH_MNIST_Iter1200.ckpt", weights_only=True)["global_step"] == 1200
    )


def test_a_full_disk_at_the_end_keeps_the_table_and_says_which_file(tmp_path, capsys, monkeypatch):
    """results.json cannot be written (ENOSPC): the table is on stdout already, and the one
    error line names the file and says where the results are."""
    import errno

    import attack
    from experiment import runner

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(runner, "write_json_atomic", full)
    code = attack.main(["--num_tries", "2", "--quiet", "--log_dir", str(tmp_path), "--no-compare"])
    out, err = capsys.readouterr()
    assert code == 2
    (folder,) = (tmp_path / "Experiment1").iterdir()
    assert err.strip().splitlines()[-1] == (
        f"attack.py: error: could not write {folder / 'results.json'}: No space left on device; "
        "the results are in the table above"
    )
    assert "defense: none" in out and out.count("iLRG") == 1


def test_checkpoints_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails half-way (a full disk) leaves neither a truncated checkpoint nor its
    temporary file; a write that succeeds leaves exactly the file."""
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

    from lightning_modules.checkpoints import atomic_checkpoint_io

    io = atomic_checkpoint_io()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, tmp_path / "a.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]
    assert torch.equal(torch.load(tmp_path / "a.ckpt")["state_dict"]["w"], torch.ones(3))

    def half_written(self, checkpoint, path, storage_options=None):
        with open(path, "wb") as handle:
            handle.write(b"PK\x03\x04 truncated")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", half_written)
    with pytest.raises(OSError, match="No space left on device"):
        io.save_checkpoint({"state_dict": {}}, tmp_path / "b.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]
