"""Issue 24's everyday loop: ``decompose``'s linear programmes, and a run of 100,000 tries.

``decompose_lp`` times ``decompose`` on the default experiment's batches (FCN-3,
SYNTH_MNIST, K = 24), counts the vertex programmes it solves, and solves the same
programmes again the way it did before, each rebuilt from scratch by
``scipy.optimize.linprog`` (HiGHS too): programmes per second warm against cold.

``first_try`` starts ``attack.py --num_tries 100000`` and the same with 50 tries
and reads each one's progress bar and ``/proc/<pid>/status``: the seconds until the
first try is done and the resident-memory high-water mark after 50 tries (the
100,000-try run is then stopped with SIGINT).
"""

from __future__ import annotations

import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import Result, format_seconds, seconds

REPO = Path(__file__).resolve().parents[1]


def decompose_lp(settings) -> list[Result]:
    """decompose at K = 24 on FCN-3 (the default run's attack), and its programmes' rate."""
    from scipy.optimize import linprog

    from attacks import build_attack, vertex_programme
    from benchmarks.cases import shared_gradients, victim_batch

    batches = []
    for seed in range(settings.pick(5, 2)):
        model, images, labels = victim_batch("dnn", "SYNTH_MNIST", 10, (1, 28, 28), 24, seed)
        batches.append(shared_gradients(model, images, labels))
    attack = build_attack("decompose")
    programmes, solve_seconds = [], []
    original = vertex_programme.VertexProgramme.vertex

    def recorded(self, direction):
        started = time.perf_counter()
        vertex = original(self, direction)
        solve_seconds.append(time.perf_counter() - started)
        programmes.append((self, direction.copy()))
        return vertex

    per_try = []
    vertex_programme.VertexProgramme.vertex = recorded
    try:
        for shared in batches:
            attack(shared)  # warm-up: the first call builds what later ones reuse
            programmes.clear()
            solve_seconds.clear()
            per_try.append(seconds(lambda s=shared: attack(s)))
    finally:
        vertex_programme.VertexProgramme.vertex = original
    # The last batch's programmes, rebuilt and solved from scratch as linprog does.
    cold = []
    for programme, direction in programmes:
        rows, last = programme.constraints[:-1], programme.constraints[-1]
        started = time.perf_counter()
        linprog(
            -direction,
            A_ub=-rows,
            b_ub=np.zeros(len(rows)),
            A_eq=last[None],
            b_eq=[1.0],
            bounds=(None, None),
            method="highs",
        )
        cold.append(time.perf_counter() - started)
    median = statistics.median(per_try)
    warm_rate = len(solve_seconds) / sum(solve_seconds) if solve_seconds else float("nan")
    cold_rate = len(cold) / sum(cold) if cold else float("nan")
    return [
        Result.timed(
            "decompose_fcn3_k24",
            f"decompose, FCN-3 SYNTH_MNIST, K = 24, one batch ({len(batches)} batches)",
            per_try,
            value=median,
            value_text=f"{format_seconds(median)} per try; {len(programmes)} programmes in the "
            f"last batch: {warm_rate:.0f}/s warm (highspy), {cold_rate:.0f}/s rebuilt (linprog)",
            target="<= 100 ms",
            passed=median <= 0.1,
            details={"lp_per_s_warm": warm_rate, "lp_per_s_linprog": cold_rate},
        )
    ]


class _Watched:
    """A child ``attack.py`` whose progress bar is read on a thread (never a blocking read on
    the main one) and whose memory high-water mark is sampled at each progress line."""

    PROGRESS = re.compile(r"tries:.*?(\d+)/(\d+)")

    def __init__(self, argv: list[str], tries: int):
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "attack.py", *argv],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.tries = tries
        self.first_try: float | None = None
        self.done = 0
        self.peak_mib: float | None = None
        self.reached = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = ""
        while chunk := self.process.stderr.read1(4096):
            buffer = (buffer + chunk.decode(errors="replace"))[-4096:]
            for match in self.PROGRESS.finditer(buffer):
                self.done = max(self.done, int(match.group(1)))
            if self.done >= 1 and self.first_try is None:
                self.first_try = time.perf_counter() - self.started
            if not self.reached.is_set():
                # VmHWM only rises: the sample taken when the count is reached is the peak so far
                # (and the one before it a lower bound, should the process have exited).
                self._sample_memory()
                if self.done >= self.tries:
                    self.reached.set()
        # The bar's last refresh may never be drawn (it is cleared at the end): a run of
        # exactly ``tries`` tries that ended well got there.
        if self.process.wait() == 0:
            self.done = max(self.done, self.tries)
        self.reached.set()

    def _sample_memory(self) -> None:
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return
        if found := re.search(r"VmHWM:\s+(\d+) kB", status):
            self.peak_mib = int(found.group(1)) / 1024

    def stop(self, timeout: float = 60) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def first_try(settings) -> list[Result]:
    """attack.py --num_tries 100000 against 50: time to the first try, memory after 50."""
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for tries in (50, 100_000):
            argv = ["--num_tries", str(tries), "--log_dir", folder, "--exp_name", f"n{tries}"]
            watched = _Watched(argv, 50)
            watched.reached.wait(timeout=600)
            reached = watched.done >= 50
            watched.stop()
            if not reached:
                raise RuntimeError(f"attack.py --num_tries {tries} did not reach 50 tries")
            runs[tries] = watched
    few, many = runs[50], runs[100_000]
    ratio = many.peak_mib / few.peak_mib
    return [
        Result(
            "first_try_100000",
            "attack.py --num_tries 100000: seconds until the first try is done (50 tries: "
            f"{few.first_try:.1f} s)",
            "s",
            median=many.first_try,
            repeats=1,
            value=many.first_try,
            value_text=f"{many.first_try:.1f} s against {few.first_try:.1f} s for 50 tries",
            target="<= 10 s",
            passed=many.first_try <= 10,
        ),
        Result(
            "memory_100000_tries",
            "attack.py --num_tries 100000: resident-memory high-water mark after 50 tries, "
            "against a 50-try run's",
            "MiB",
            median=many.peak_mib,
            repeats=1,
            value=ratio,
            value_text=f"{many.peak_mib:.0f} MiB against {few.peak_mib:.0f} MiB ({ratio:.3f}x)",
            target="<= 1.1x",
            passed=ratio <= 1.1,
        ),
    ]
