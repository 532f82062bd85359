"""Run the attacks' small tensor operations on one CPU thread.

An analytic attack is a few dozen operations on arrays of at most a few million
entries and thin factorizations (a QR of 2048 x 34, an SVD of 34 x 2048). With
several intra-op threads each operation forks and joins them; on a machine whose
cores are shared with other jobs a descheduled helper thread then holds every
join for a scheduler time slice. Measured on a loaded 2-core machine: an
element-wise pass over 1000 x 2048 doubles took 16 ms on two threads and
0.5 ms on one, a QR of 2048 x 34 180 ms and 0.7 ms.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_cpu_thread(device: torch.device | str) -> Iterator[None]:
    """Torch's intra-op thread count set to one while the block runs on the CPU, then restored."""
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
