import os
import signal
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def answer_ctrl_c() -> None:
    """``preexec_fn`` for a child the test stops with SIGINT: a suite started as a background
    job (``cmd &`` without job control) ignores SIGINT, and children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data sets laid beside the repository (../shared/data)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real data expected at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _few_threads():
    # Two cores: keep torch from oversubscribing when tests spawn subprocesses.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
