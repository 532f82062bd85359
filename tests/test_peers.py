"""How the first process of a multi-process run hears from the others (experiment.peers),
on torch's real stores: every try received, and each way a process can end, named."""

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import pytest
import torch.distributed as dist

from experiment import peers as peers_module
from experiment.peers import PeerFailed, Peers, describe_exit


@dataclass
class Outcome:
    index: int


def pair(store, world_size=2, children=()):
    first = Peers(store, 0, world_size, "run/1", children=children)
    others = [Peers(store, rank, world_size, "run/1") for rank in range(1, world_size)]
    return first, others


def test_the_first_receives_every_try_as_it_is_sent_and_sees_the_finish():
    first, (second, third) = pair(dist.HashStore(), world_size=3)
    second.send(Outcome(1))
    assert first.poll() is False
    assert [o.index for o in first.received] == [1]
    second.send(Outcome(4))
    for index in (2, 5):
        third.send(Outcome(index))
    second.end()
    assert first.poll() is False  # the third has not finished
    third.end()
    assert first.poll() is True
    assert sorted(o.index for o in first.received) == [1, 2, 4, 5]
    # each try is taken once, and its value removed from the store
    assert first.poll() is True and len(first.received) == 4
    assert not first.store.check(["run/1/try/1"])


def test_a_process_that_was_stopped_is_named_with_how_and_its_tries():
    first, (second,) = pair(dist.HashStore())
    second.send(Outcome(1))
    second.end("was stopped by SIGTERM")
    with pytest.raises(PeerFailed) as failed:
        first.poll()
    assert str(failed.value) == "process 1 of 2 was stopped by SIGTERM after 1 tries"
    assert [o.index for o in first.received] == [1]


def test_a_child_that_died_is_named_with_its_pid_and_signal():
    child = subprocess.Popen(
        [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    )
    child.wait(timeout=60)
    first, _ = pair(dist.HashStore(), children=[child])
    with pytest.raises(PeerFailed) as failed:
        first.poll()
    assert (
        str(failed.value) == f"process 1 of 2 (pid {child.pid}) was killed by SIGKILL after 0 tries"
    )


def test_a_child_that_exited_after_finishing_is_not_a_failure():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=60)
    first, (second,) = pair(dist.HashStore(), children=[child])
    second.end()
    assert first.poll() is True


def test_a_process_silent_for_too_long_is_lost(monkeypatch):
    monkeypatch.setattr(peers_module, "SILENT_S", 0.3)
    first, _ = pair(dist.HashStore())
    assert first.poll() is False  # the first look starts the clock
    time.sleep(0.5)
    with pytest.raises(PeerFailed, match=r"^process 1 of 2 has sent no heartbeat for 0\.3 s"):
        first.poll()


def test_a_beating_process_is_not_lost(monkeypatch):
    monkeypatch.setattr(peers_module, "SILENT_S", 0.3)
    monkeypatch.setattr(peers_module, "HEARTBEAT_S", 0.05)
    first, (second,) = pair(dist.HashStore())
    second.start_heartbeat()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert first.poll() is False
        time.sleep(0.05)
    second.end()
    assert first.poll() is True


def test_a_process_that_loses_the_first_stops_with_one_line(monkeypatch):
    monkeypatch.setattr(peers_module, "HEARTBEAT_S", 0.05)
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=5))
    _, (second,) = pair(client)
    second.send(Outcome(1))
    del server  # the first process, which hosts the store, is gone
    with pytest.raises(PeerFailed) as failed:
        second.send(Outcome(3))
    assert str(failed.value) == (
        "process 1 of 2 lost the first process (rank 0), which collects and writes the results"
    )
    second.start_heartbeat()
    assert second.lost_first.wait(5)
    with pytest.raises(PeerFailed):
        second.check_first()


def test_exits_are_described_by_signal_or_code():
    assert describe_exit(-int(signal.SIGKILL)) == "was killed by SIGKILL"
    assert describe_exit(143) == "exited with code 143 (SIGTERM)"
    assert describe_exit(2) == "exited with code 2"
