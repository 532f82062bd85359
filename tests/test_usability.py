"""What a new user hits first: output paths, bad numbers, missing data, printed commands, streams.

Each bug is checked the way a user meets it: a subprocess, its exit code, the first
words of its one-line message, and that nothing was created or lost.
"""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import attack
import train
from tests.conftest import REPO, answer_ctrl_c

# A proxy that refuses at once: nothing in these tests can download, with or without a network.
NO_NETWORK = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}


def run(script: str, *args, cwd=REPO, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **NO_NETWORK},
    )


def one_line_error(proc: subprocess.CompletedProcess, start: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(start), lines[0]
    return lines[0]


def tree(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder nothing can be written to: chmod 555, or for root (whom chmod does not stop) /sys."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except OSError:
        yield folder
    else:
        (folder / "probe").unlink()
        yield Path("/sys")
    folder.chmod(0o755)


# --- 1. output locations are checked before any work -------------------------------------------


@pytest.mark.parametrize(
    ("script", "option", "where"),
    [
        ("attack.py", "--log_dir", "file"),
        pytest.param("attack.py", "--log_dir", "unwritable", marks=pytest.mark.slow),
        pytest.param("attack.py", "--results", "folder", marks=pytest.mark.slow),
        ("attack.py", "--results", "unwritable"),
        ("train.py", "--model_path", "unwritable"),
        pytest.param("train.py", "--model_path", "file", marks=pytest.mark.slow),
        pytest.param("train.py", "--log_dir", "file", marks=pytest.mark.slow),
    ],
)
def test_output_locations_are_checked_before_any_work(tmp_path, unwritable, script, option, where):
    existing_file = tmp_path / "a_file"
    existing_file.write_text("keep me\n")
    target = {
        "file": existing_file,
        "folder": tmp_path,
        "unwritable": unwritable / ("out.json" if option == "--results" else "out"),
    }[where]
    defaults = {"--log_dir": tmp_path / "logs", "--model_path": tmp_path / "ckpt"}
    if script == "attack.py":
        args = ["--num_tries", "2", "--quiet", "--log_dir", defaults["--log_dir"]]
    else:
        args = ["--iter_train", "--iters", "20", "--quiet", *("--batch_size", "8")]
        args += ["--log_dir", defaults["--log_dir"], "--model_path", defaults["--model_path"]]
    before = tree(tmp_path)
    proc = run(script, *args, option, target)
    one_line_error(proc, f"{script}: error: {option} ")
    assert "Traceback" not in proc.stderr
    assert tree(tmp_path) == before  # no run folder, no checkpoint folder, no results
    assert existing_file.read_text() == "keep me\n"


# --- 2. floats are finite and in range, checked at parse time -----------------------------------


@pytest.mark.parametrize(
    ("entry", "args", "message"),
    [
        (attack, ["--alpha", "nan"], "argument --alpha: must be a finite number > 0, got nan"),
        (attack, ["--alpha", "inf"], "argument --alpha: must be a finite number > 0, got inf"),
        (attack, ["--norm_guard", "inf"], "argument --norm_guard: must be a finite number >= 0"),
        (attack, ["--noise_std=-inf"], "argument --noise_std: must be a finite number >= 0"),
        (attack, ["--clip_bound", "inf"], "argument --clip_bound: must be a finite number > 0"),
        (attack, ["--rec_lr", "0"], "argument --rec_lr: must be a finite number > 0, got 0"),
        (attack, ["--ratio", "nan"], "argument --ratio: must be a finite number >= 0 and < 0.5"),
        (train, ["--lr", "-1"], "argument --lr: must be a finite number > 0, got -1"),
        (train, ["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
        (train, ["--weight_decay", "inf"], "argument --weight_decay: must be a finite number >= 0"),
        (train, ["--val_fraction", "1"], "argument --val_fraction: must be a finite number > 0"),
    ],
)
def test_bad_floats_fail_at_parse_time(tmp_path, capsys, entry, args, message):
    argv = ["--log_dir", str(tmp_path / "logs"), *args]
    with pytest.raises(SystemExit) as stop:
        entry.main(argv)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{entry.__name__}.py: error: {message}"), lines
    assert not (tmp_path / "logs").exists()


def test_bad_float_in_a_config_file_is_refused(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("alpha: .nan\n")
    with pytest.raises(SystemExit) as stop:
        attack.main(["--config", str(config), "--log_dir", str(tmp_path / "logs")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"attack.py: error: {config}: bad value nan for alpha"), err


def test_negative_lr_leaves_nothing_to_resume_from(tmp_path):
    proc = run("train.py", "--lr", "-1", "--model_path", tmp_path / "ckpt", "--log_dir", tmp_path)
    one_line_error(proc, "train.py: error: argument --lr: must be a finite number > 0, got -1")
    assert tree(tmp_path) == set()  # in particular no dnn_SYNTH_MNIST_interrupted.ckpt


# --- 5. a missing MNIST split ----------------------------------------------------------------


def test_missing_mnist_split_names_its_own_files_and_creates_nothing(tmp_path):
    proc = run(
        "attack.py",
        *("--dataset", "MNIST_GRAY", "--split", "val", "--data_root", tmp_path / "data"),
        *("--log_dir", tmp_path / "logs"),
    )
    line = one_line_error(
        proc,
        "attack.py: error: MNIST val split not found: expected t10k-images-idx3-ubyte(.gz) and "
        f"t10k-labels-idx1-ubyte(.gz) in {tmp_path / 'data' / 'MNIST' / 'raw'} (",
    )
    # offline, or a registry-only network that answers the mirrors with an error
    assert line.endswith("(no network to download it)") or "(download failed: " in line
    assert "train-" not in line
    assert tree(tmp_path) == set()  # no empty data/MNIST/raw, no run folder


# --- 6. the train.py command printed for a missing checkpoint runs as printed -------------------


def missing_checkpoint_command(tmp_path, shared_data, capsys) -> list[str]:
    argv = ["--trained_model", "--iter_train", "--iters", "5", "--model_path", tmp_path / "ckpt"]
    argv += ["--dataset", "MNIST_GRAY", "--data_root", shared_data, "--split", "val"]
    assert attack.main([*map(str, argv), "--log_dir", str(tmp_path / "logs")]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("attack.py: error: checkpoint ") and "\n" not in line, line
    return shlex.split(line.split("; make it with: ", 1)[1])


def test_missing_checkpoint_command_partitions_the_only_split(tmp_path, shared_data, capsys):
    words = missing_checkpoint_command(tmp_path, shared_data, capsys)
    # The shipped data hold only MNIST's test split: train.py must partition it.
    assert words[:2] == ["python", "train.py"]
    assert words[-2:] == ["--train_partition", "val"]
    assert tree(tmp_path) == set()


@pytest.mark.slow
def test_missing_checkpoint_command_runs_as_printed(tmp_path, shared_data, capsys):
    words = missing_checkpoint_command(tmp_path, shared_data, capsys)
    # Run from a scratch folder so train.py's default logs/ lands there, not in the repository.
    proc = run(*words[1:], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "ckpt" / "dnn_MNIST_GRAY_Iter5.ckpt").is_file()


# --- 7 and 8. the table on stdout, logs on stderr; result files honour the umask ----------------


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """``attack.py --num_tries 2`` under umask 027, with --results; (process, tmp folder)."""
    root = tmp_path_factory.mktemp("default_run")
    proc = subprocess.run(
        [sys.executable, "attack.py", "--num_tries", "2", "--log_dir", str(root / "logs")]
        + ["--results", str(root / "out" / "results.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.umask(0o027),
    )
    assert proc.returncode == 0, proc.stderr
    return proc, root


def test_table_goes_to_stdout_and_logs_to_stderr(default_run):
    proc, _ = default_run
    assert proc.stdout.lstrip().startswith(
        "dnn on SYNTH_MNIST (train, untrained), K = 24, 2 tries (random), FedSGD (one gradient)\n"
        "defense: none\nmethod"
    ), proc.stdout
    assert "iLRG" in proc.stdout and "run folder" not in proc.stdout
    assert proc.stderr.startswith("run folder: ") and "LeAcc" not in proc.stderr


def test_result_files_follow_the_umask(default_run):
    _, root = default_run
    run_dir = next((root / "logs" / "Experiment1").iterdir())
    for path in (run_dir / "results.json", root / "out" / "results.json", run_dir / "run.log"):
        assert path.stat().st_mode & 0o777 == 0o640, path


def test_stages_json_follows_the_umask(tmp_path):
    from experiment.runs import write_json_atomic

    previous = os.umask(0o022)
    try:
        path = write_json_atomic(tmp_path / "stages.json", {"status": "complete"})
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


# --- 9. signals: 143 for SIGTERM, a quiet 130 for Ctrl-C during start-up -----------------------


def test_ctrl_c_during_start_up_exits_130_quietly(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "attack.py", "--log_dir", str(tmp_path / "logs")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=answer_ctrl_c,
    )
    try:
        time.sleep(1.5)  # past the interpreter's own start, inside the imports and data loading
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip() == "attack.py: interrupted" and out == ""
    assert not (tmp_path / "logs").exists()


# SIGTERM during the tries: tests/test_reliability.py::test_interrupted_run_keeps_finished_tries_marked_incomplete


# --- 11. did you mean ------------------------------------------------------------------------


def test_mistyped_option_gets_a_suggestion(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        attack.main(["--num_tires", "3", "--log_dir", str(tmp_path / "logs")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "attack.py: error: unrecognized arguments: --num_tires 3; did you mean --num_tries?"
    )


def test_mistyped_config_key_gets_a_suggestion(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("num_tires: 3\n")
    with pytest.raises(SystemExit) as stop:
        train.main(["--config", str(config)])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"train.py: error: config file {config}: unknown option 'num_tires'; did you mean num_workers?"
    )


# --- 13. train.py says only what concerns the user ------------------------------------------


def test_train_py_prints_no_advert_or_deprecation(tmp_path):
    proc = run("train.py", "--dryrun", "--batch_size", "8", "--n_dim", "16", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "Tip:" not in proc.stderr and "litlogger" not in proc.stderr
    assert "deprecated" not in proc.stderr


# --- 3. a run stopped mid-epoch resumes to the very same weights ------------------------------


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_gives_identical_stage_checkpoints(tmp_path, shared_data):
    import torch

    def command(model_path):
        return [
            sys.executable,
            "train.py",
            *("--dataset", "MNIST_GRAY", "--data_root", str(shared_data)),
            *("--train_partition", "val", "--batch_size", "64", "--n_dim", "32", "--quiet"),
            *("--iter_train", "--iters", "400", "--mid_save", "--iter_interval", "100"),
            *("--model_path", str(model_path), "--log_dir", str(tmp_path / "logs")),
        ]

    reference = subprocess.run(
        command(tmp_path / "whole"), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert reference.returncode == 0, reference.stderr[-2000:]

    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(
        command(stopped), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while not (stopped / "dnn_MNIST_GRAY_Iter100.ckpt").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "no Iter100 checkpoint"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    interrupted = stopped / "dnn_MNIST_GRAY_interrupted.ckpt"
    assert proc.returncode == 143, err
    assert (
        err.strip().splitlines()[-1] == f"train.py: interrupted; resume with --resume {interrupted}"
    )
    state = torch.load(interrupted, weights_only=True)
    # 9000 training images in batches of 64: 141 batches an epoch, so step 100..399 is mid-epoch
    # unless it is 141 or 282 exactly.
    assert 100 <= state["global_step"] < 400 and state["global_step"] % 141 != 0, state[
        "global_step"
    ]
    resumed = subprocess.run(
        [*command(stopped), "--resume", str(interrupted)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "dataloader is not resumable" not in resumed.stderr  # it is now
    names = sorted(p.name for p in (tmp_path / "whole").glob("*_Iter*.ckpt"))
    assert names == sorted(p.name for p in stopped.glob("*_Iter*.ckpt"))
    assert len(names) == 5  # stages 0, 100, 200, 300, 400
    for name in names:
        whole = torch.load(tmp_path / "whole" / name, weights_only=True)["state_dict"]
        again = torch.load(stopped / name, weights_only=True)["state_dict"]
        assert whole.keys() == again.keys()
        assert all(torch.equal(whole[key], again[key]) for key in whole), name


# --- 4. a run that fails before its first try: no torchmetrics warnings, no empty table ---------


def test_scores_without_tries_are_undefined_without_warnings():
    import math
    import warnings

    from experiment.report import MethodScores, format_table

    scores = {"iLRG": MethodScores(restores_counts=True)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchmetrics warns on compute() before update()
        assert all(math.isnan(value) for value in scores["iLRG"].summary().values())
        format_table(scores)


def test_the_table_lines_up_with_a_long_method_name():
    from experiment.report import MethodScores, format_table

    scores = {name: MethodScores(restores_counts=True) for name in ("iLRG", "decompose")}
    header, rule, *rows = format_table(scores).splitlines()
    assert len(rule) == len(header) and all(len(row) == len(header) for row in rows)
    assert rows[1].startswith("decompose  ") and header.startswith("method     ")


# --- 10. each stage's validation accuracy, from its checkpoint, in stages.json -----------------


def test_stage_sweep_reports_each_checkpoints_validation_accuracy(tmp_path, shared_data, capsys):
    import json

    common = ["--dataset", "MNIST_GRAY", "--data_root", str(shared_data), "--quiet"]
    argv = [*common, "--train_partition", "val", "--val_fraction", "0.8", "--batch_size", "250"]
    argv += ["--n_dim", "16", "--epochs", "2", "--mid_save", "--epoch_interval", "1"]
    argv += ["--model_path", str(tmp_path / "ckpt"), "--log_dir", str(tmp_path / "logs")]
    assert train.main(argv) == 0
    results = tmp_path / "stages.json"
    pattern = str(tmp_path / "ckpt" / "dnn_MNIST_GRAY_Epoch*.ckpt")
    argv = [*common, "--split", "val", "--checkpoints", pattern, "--num_tries", "2"]
    argv += ["--num_images", "8", "--log_dir", str(tmp_path / "logs"), "--results", str(results)]
    assert attack.main(argv) == 0
    records = json.loads(results.read_text())["results"]
    assert [r["stage"] for r in records] == [0, 1, 2]
    assert records[0]["val_acc"] is None  # the untrained weights were never validated
    assert [r["val_step"] for r in records[1:]] == [8, 16]  # 2000 images in batches of 250
    assert all(0 <= r["val_acc"] <= 1 for r in records[1:]), records
    assert "stage" in capsys.readouterr().out  # the stage table is a result: stdout
    run_dir = next((tmp_path / "logs" / "Experiment1").iterdir())
    assert (run_dir / "stages.png").stat().st_size > 0
