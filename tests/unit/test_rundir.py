"""The run directory: events survive torn lines; fencing stops an old attempt."""

from __future__ import annotations

import pytest

from controlplane.errors import CorruptFileError
from controlplane.rundir import EventTail, FencedError, RunDir


def test_events_roundtrip_and_torn_tail(tmp_path):
    rd = RunDir(tmp_path / "r").create()
    rd.append_event("step", 1, step=1, loss=2.5)
    rd.append_event("step", 1, step=2, loss=2.4)
    with open(rd.events_file, "a") as f:
        f.write('{"type": "step", "step": 3')  # a writer died mid-line
    events = rd.events()
    assert [e["step"] for e in events] == [1, 2]
    assert all("ts" in e and e["attempt"] == 1 for e in events)


def test_tail_returns_only_new_complete_lines(tmp_path):
    rd = RunDir(tmp_path / "r").create()
    tail = EventTail(rd)
    assert tail.poll() == []
    rd.append_event("heartbeat", 1, rank=0)
    assert [e["type"] for e in tail.poll()] == ["heartbeat"]
    assert tail.poll() == []
    with open(rd.events_file, "a") as f:
        f.write('{"type": "step"')
    assert tail.poll() == []
    with open(rd.events_file, "a") as f:
        f.write(', "step": 5}\n')
    assert tail.poll()[0]["step"] == 5


def test_fence(tmp_path):
    rd = RunDir(tmp_path / "r").create()
    rd.set_fence(2)
    rd.check_fence(2)
    rd.check_fence(3)
    with pytest.raises(FencedError):
        rd.check_fence(1)


def test_spec_read_errors(tmp_path):
    rd = RunDir(tmp_path / "r").create()
    with pytest.raises(CorruptFileError, match="missing"):
        rd.read_spec()
    rd.spec_file.write_text("{")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        rd.read_spec()
