"""The vertex search's warm-started programme against scipy's linprog, on the same polytopes."""

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from attacks.vertex_programme import VertexProgramme


def polytope(seed, rows=60, dim=6):
    """{c : A c >= 0, last . c = 1} for the row space of random non-negative sparse vectors."""
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.rand(dim, rows, generator=generator, dtype=torch.float64)
    vectors *= torch.rand(dim, rows, generator=generator, dtype=torch.float64) < 0.5
    vectors = torch.cat([vectors, torch.ones(dim, 1, dtype=torch.float64)], 1)
    basis = torch.linalg.qr(vectors.T)[0]
    return basis[:-1].numpy(), basis[-1].numpy()


@pytest.mark.parametrize("seed", range(3))
def test_each_direction_gives_the_optimum_linprog_gives(seed):
    rows, last = polytope(seed)
    programme = VertexProgramme(rows, last)
    generator = np.random.default_rng(seed)
    for _ in range(10):
        direction = generator.standard_normal(rows.shape[1])
        reference = linprog(
            -direction,
            A_ub=-rows,
            b_ub=np.zeros(rows.shape[0]),
            A_eq=last[None],
            b_eq=[1.0],
            bounds=[(None, None)] * rows.shape[1],
            method="highs",
        )
        vertex = programme.vertex(direction)
        assert reference.status == 0 and vertex is not None
        # The same optimum to the solver's feasibility tolerance (1e-7) on values of size 1.
        assert abs(direction @ vertex - direction @ reference.x) <= 1e-6
        assert (rows @ vertex).min() >= -1e-7 and abs(last @ vertex - 1) <= 1e-7


def test_an_unbounded_direction_gives_none_and_the_next_one_still_solves():
    # The half-plane {c : c_1 >= 0} in the plane c_0 = 1: unbounded along +c_1.
    programme = VertexProgramme(np.array([[0.0, 1.0]]), np.array([1.0, 0.0]))
    assert programme.vertex(np.array([0.0, 1.0])) is None
    vertex = programme.vertex(np.array([0.0, -1.0]))
    assert vertex is not None and np.allclose(vertex, [1.0, 0.0])


def test_building_a_programme_prints_nothing():
    # HiGHS prints a banner when a process builds its first solver: in a fresh interpreter.
    code = (
        "import numpy as np; from attacks.vertex_programme import VertexProgramme; "
        "print((VertexProgramme(np.array([[1.0, 0.0]]), np.array([0.0, 1.0]))"
        ".vertex(np.array([-1.0, 0.0])) + 0.0).tolist())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout == "[0.0, 1.0]\n" and done.stderr == ""


def test_ctrl_c_during_the_programmes_interrupts():
    # A process that solves programmes until stopped: SIGINT must reach Python and end it,
    # however many solves it lands among (the solver runs no Python callback).
    code = (
        "import numpy as np, sys; from attacks.vertex_programme import VertexProgramme; "
        "rng = np.random.default_rng(0); rows = np.abs(rng.standard_normal((400, 30))); "
        "programme = VertexProgramme(rows, np.ones(30)); print('ready', flush=True)\n"
        "while True: programme.vertex(rng.standard_normal(30))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout.readline() == "ready\n"
        time.sleep(1.0)  # many programmes solved by now: the signal lands inside one
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    # An uncaught KeyboardInterrupt ends the interpreter by SIGINT itself (Python 3.8+).
    assert proc.returncode == -signal.SIGINT and err.rstrip().endswith("KeyboardInterrupt")
