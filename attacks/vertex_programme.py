"""The vertex search's linear programme, built once and re-solved from its last basis.

``decompose`` asks one polytope {c : Q c >= 0, q_last . c = 1} for a vertex in
one direction after another: the constraints never change, only the objective.
``scipy.optimize.linprog`` rebuilds and solves each programme from scratch
(about 150 ms on a VGG head's 2,700 live units x 64 coordinates, most of it
presolve and the first simplex phase); HiGHS through ``highspy`` keeps the
model, and after a change of the objective alone the last optimal basis is
still feasible, so the simplex starts from the vertex found last and walks
only as far as the new one (about 40 ms there, 54 instead of about 200
iterations).
"""

from __future__ import annotations

import os
import sys

import highspy
import numpy as np

_banner_hidden = False


def quiet_solver() -> highspy.Highs:
    """A HiGHS instance that prints nothing and calls no Python code while it solves. HiGHS
    writes its banner to the C-level stdout
    when a process builds its first instance, before any option can turn output off, so that
    one construction runs with file descriptor 1 on the null device."""
    global _banner_hidden
    if _banner_hidden:
        solver = highspy.Highs()
    else:
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 1)
                solver = highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        _banner_hidden = True
    solver.setOptionValue("output_flag", False)
    # highspy's wrapper registers a Python callback that the solver calls during its runs: a
    # Ctrl-C handled there raises KeyboardInterrupt inside the C++ solve, which need not pass
    # it on (in a scan of SIGINTs into attack.py's default run, one run of about 70 finished
    # as if none had come; none of 76 once the callbacks were off). Without them the signal
    # waits for the run to return, tens of milliseconds, and then interrupts as anywhere.
    solver.disableCallbacks()
    return solver


class VertexProgramme:
    """max d . c  subject to  rows @ c >= 0  and  last . c = 1, for a sequence of directions d."""

    def __init__(self, rows: np.ndarray, last: np.ndarray) -> None:
        constraints = np.vstack([rows, last[None]])
        num_rows, num_cols = constraints.shape
        infinity = highspy.kHighsInf
        programme = highspy.HighsLp()
        programme.num_col_ = num_cols
        programme.num_row_ = num_rows
        programme.col_cost_ = np.zeros(num_cols)
        programme.col_lower_ = np.full(num_cols, -infinity)
        programme.col_upper_ = np.full(num_cols, infinity)
        programme.row_lower_ = np.concatenate([np.zeros(num_rows - 1), [1.0]])
        programme.row_upper_ = np.concatenate([np.full(num_rows - 1, infinity), [1.0]])
        matrix = programme.a_matrix_
        matrix.format_ = highspy.MatrixFormat.kColwise
        matrix.start_ = np.arange(0, constraints.size + 1, num_rows, dtype=np.int32)
        matrix.index_ = np.tile(np.arange(num_rows, dtype=np.int32), num_cols)
        matrix.value_ = np.ascontiguousarray(constraints.T).ravel()
        #: the rows then ``last``: kept so that a benchmark can solve the same programme afresh
        self.constraints = constraints
        self._solver = quiet_solver()
        self._solver.passModel(programme)
        self._columns = np.arange(num_cols, dtype=np.int32)

    def vertex(self, direction: np.ndarray) -> np.ndarray | None:
        """The vertex furthest along ``direction``; None where the polytope is unbounded that
        way or the solver gives no optimum (HiGHS minimises, so the cost is -direction)."""
        self._solver.changeColsCost(self._columns.size, self._columns, -direction)
        self._solver.run()
        if self._solver.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            return None
        return np.array(self._solver.getSolution().col_value)
