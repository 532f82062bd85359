"""The per-try add-ons of the attack experiment (error analysis, reconstruction) and what they see."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class TryContext:
    """Everything one try produced, for the extensions (analysis, reconstruction) to look at.

    ``labels`` and ``true_counts`` are the client's secrets: extensions use them
    only to score, never to attack.
    """

    index: int
    indices: torch.Tensor
    labels: torch.Tensor
    true_counts: torch.Tensor
    grads: dict[str, torch.Tensor]
    shared: object
    restorations: dict[str, object]
    load_chunks: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


class Extension:
    """A per-try add-on to the experiment. ``key`` names its part of results.json."""

    key = "extension"

    def bind(self, run_dir: Path, writer=None) -> None:
        """Called once before the first try with the run folder and the TensorBoard writer."""

    def on_try(self, ctx: TryContext) -> dict | None:
        return None

    def collect(self, entries: list[tuple[int, dict | None]]) -> None:
        """Called once after the last try with every try's (index, entry) in index order,
        also those other processes ran: the state ``summary`` and ``table`` read becomes
        theirs (``restore``), and the tries this process did not log go to the writer
        (``log_entry``; an extension records what it logged in ``logged``)."""
        present = [(index, entry) for index, entry in entries if entry is not None]
        self.restore([entry for _, entry in present])
        for index, entry in present:
            if index not in getattr(self, "logged", ()):
                self.log_entry(index, entry)

    def restore(self, entries: list[dict]) -> None:
        """Make the per-try entries (index order) the state that ``summary`` reads."""

    def log_entry(self, index: int, entry: dict) -> None:
        """Write one try's per-try scalars to the writer, if there is one."""

    def summary(self) -> dict:
        return {}

    def table(self) -> str | None:
        return None
