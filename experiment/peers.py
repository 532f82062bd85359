"""The processes of a multi-process run, and how the first one hears from the others.

Every other process sends each finished try to the first through the process group's
key-value store (the TCP store the processes met at) as soon as it is done, beats a
heartbeat every second, and at the end writes whether it finished or why it stopped.
The first process never waits inside a collective: between its own tries and at the
end it polls the store, so it answers SIGINT/SIGTERM at every moment, and when another
process dies, stops or falls silent it ends the run within seconds, keeping every try
it has received (a collective such as ``all_gather_object`` would block it in C++,
where no signal handler runs, until the peer timeout).

The keys of one run are prefixed by its number in the process (a stage sweep runs one
per stage, all on one process group).
"""

from __future__ import annotations

import pickle
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from user_errors import UserError

#: seconds between a process's heartbeats
HEARTBEAT_S = 1.0
#: a process whose heartbeat has not moved for this long is taken as lost (its host down,
#: the network cut); generous, since a loaded machine may starve the beating thread
SILENT_S = 30.0
#: how often the first process looks at the store while it waits for the others
POLL_S = 0.2
#: what a process that ran its whole share writes as its end
FINISHED = "finished"

_runs_started = 0


class PeerFailed(UserError):
    """Another process of the run died, stopped or fell silent; the message names it."""


def next_run_key() -> str:
    """The key prefix of the next run in this process (the same sequence on every process,
    since every process runs the same stages in the same order)."""
    global _runs_started
    _runs_started += 1
    return f"attack/{_runs_started}"


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    if returncode > 128 and returncode - 128 in signal.valid_signals():
        return f"exited with code {returncode} ({signal.Signals(returncode - 128).name})"
    return f"exited with code {returncode}"


@dataclass
class Peers:
    """One run's view of the store: ``rank`` of ``world_size`` processes, which share the tries
    by index (process r runs r, r + W, ..., in that order). ``children``: the processes this
    one started on its machine (Popen objects of ranks 1, 2, ...), watched directly."""

    store: object
    rank: int
    world_size: int
    key: str
    children: Sequence = ()
    received: list = field(default_factory=list)
    #: set by the heartbeat thread when the store (the first process) cannot be reached
    lost_first: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        others = range(1, self.world_size)
        self._taken = dict.fromkeys(others, 0)
        self._beats = dict.fromkeys(others, -1)
        self._beat_seen = dict.fromkeys(others, time.monotonic())
        self._stop_beating = threading.Event()

    # --- every process but the first --------------------------------------------------------

    def start_heartbeat(self) -> None:
        threading.Thread(target=self._beat, name="heartbeat", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop_beating.is_set():
            try:
                self.store.add(f"{self.key}/beat/{self.rank}", 1)
            except Exception:  # the store lives in the first process: it is gone
                self.lost_first.set()
                return
            self._stop_beating.wait(HEARTBEAT_S)

    def check_first(self) -> None:
        """Raise :class:`PeerFailed` once the first process cannot be reached."""
        if self.lost_first.is_set():
            raise self._lost_first()

    def _lost_first(self) -> PeerFailed:
        return PeerFailed(
            f"process {self.rank} of {self.world_size} lost the first process (rank 0), which "
            "collects and writes the results"
        )

    def send(self, outcome) -> None:
        self.check_first()
        try:
            self.store.set(f"{self.key}/try/{outcome.index}", pickle.dumps(outcome))
            # counted after the value is set: a count of n means the first n tries can be read
            self.store.add(f"{self.key}/sent/{self.rank}", 1)
        except Exception:  # the store lives in the first process: it is gone
            raise self._lost_first() from None

    def end(self, how: str = FINISHED) -> None:
        """Say how this process's share ended (best effort: the first may be gone)."""
        self._stop_beating.set()
        try:
            self.store.set(f"{self.key}/end/{self.rank}", how)
        except Exception:
            pass

    # --- the first process ----------------------------------------------------------------------

    def poll(self) -> bool:
        """Take the tries sent so far; True once every other process has finished its share.
        Raises :class:`PeerFailed` naming a process that stopped, died or fell silent."""
        self.receive()
        finished = 0
        for rank in self._taken:
            end = self._end_of(rank)
            if end == FINISHED:
                finished += 1
            elif end is not None:
                raise PeerFailed(self._failure(rank, end))
            else:
                self._check_alive(rank)
        if finished == len(self._taken):
            self.receive()  # a try sent just before the end
            return True
        return False

    def wait(self) -> None:
        """Poll until every other process has finished; a signal handler runs between polls."""
        while not self.poll():
            time.sleep(POLL_S)

    def receive(self) -> None:
        for rank, taken in self._taken.items():
            sent = self.store.add(f"{self.key}/sent/{rank}", 0)
            for position in range(taken, sent):
                key = f"{self.key}/try/{rank + position * self.world_size}"
                self.received.append(pickle.loads(self.store.get(key)))
                self.store.delete_key(key)
            self._taken[rank] = sent

    def _end_of(self, rank: int) -> str | None:
        key = f"{self.key}/end/{rank}"
        return self.store.get(key).decode() if self.store.check([key]) else None

    def _check_alive(self, rank: int) -> None:
        child = self._child(rank)
        if child is not None and child.poll() is not None:
            # It may have written its end just after the look above.
            end = self._end_of(rank)
            if end == FINISHED:
                return
            raise PeerFailed(self._failure(rank, end, child))
        beats = self.store.add(f"{self.key}/beat/{rank}", 0)
        now = time.monotonic()
        if beats != self._beats[rank]:
            self._beats[rank], self._beat_seen[rank] = beats, now
        elif now - self._beat_seen[rank] > SILENT_S:
            raise PeerFailed(
                f"process {rank} of {self.world_size} has sent no heartbeat for {SILENT_S:g} s "
                f"(after {self._taken[rank]} tries)"
            )

    def _child(self, rank: int):
        return self.children[rank - 1] if 0 < rank <= len(self.children) else None

    def _failure(self, rank: int, end: str | None, child=None) -> str:
        how = end or describe_exit(child.returncode)
        pid = f" (pid {child.pid})" if child is not None else ""
        return f"process {rank} of {self.world_size}{pid} {how} after {self._taken[rank]} tries"
