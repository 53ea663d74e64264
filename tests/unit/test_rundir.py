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


def _write_steps(rd: RunDir, n: int, pad: int = 0) -> list[int]:
    """n step events (each line padded to a chosen size); returns each line's end offset."""
    import json

    lines, ends, pos = [], [], 0
    for i in range(1, n + 1):
        line = json.dumps({"ts": float(i), "type": "step", "attempt": 1, "step": i, "pad": "x" * pad}) + "\n"
        lines.append(line)
        pos += len(line)
        ends.append(pos)
    rd.events_file.write_text("".join(lines))
    return ends


def test_recent_events_read_only_the_end_and_start_on_a_whole_line(tmp_path):
    rd = RunDir(tmp_path / "r").create()
    assert rd.recent_events() == [] and rd.recent_offset() == 0  # no file yet
    ends = _write_steps(rd, 100, pad=50)
    size = ends[-1]
    assert rd.recent_offset(size) == 0 and len(rd.recent_events(size)) == 100  # fits: everything
    for window in (1, 57, 500, ends[-1] - ends[40], ends[-1] - ends[40] + 1, size - 1):
        got = [e["step"] for e in rd.recent_events(window)]
        start = rd.recent_offset(window)
        assert start in (0, *ends) and size - start <= window  # a line boundary inside the window
        assert got == list(range(100 - len(got) + 1, 101))  # a suffix of whole events
        assert len(got) >= (window - 150) // 150  # and no whole line in the window is dropped
    assert [e["step"] for e in rd.recent_events(ends[-1] - ends[40])] == list(range(42, 101))
    assert rd.first_event("step")["step"] == 1 and rd.first_event("end") is None


def test_status_of_a_long_run_reads_its_recent_events(tmp_path, monkeypatch):
    """A run whose events.jsonl outgrew the window: progress from its end, first loss from its
    head, checkpoints from the ledger; the CLI says it looked at a window."""
    import json

    from typer.testing import CliRunner

    from controlplane.cli.main import app
    from controlplane.context import Context
    from controlplane.rundir import RECENT_BYTES
    from controlplane.spec import RunSpec, dump_spec

    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path / "home"))
    ctx = Context.load()
    rd = RunDir.of(ctx.storage, "long-run").create()
    ctx.ledger.create_run("long-run", "long", dump_spec(RunSpec()), {}, str(rd.path))
    n = RECENT_BYTES // 100 + 5_000  # ~100-byte lines: the file is larger than the window
    head = [{"ts": 0.0, "type": "start", "attempt": 1, "resume_step": 0}]
    head += [{"ts": 1.0 + i, "type": "step", "attempt": 1, "step": i, "loss": 9.0 - i / n, "tokens": i * 10}
             for i in range(1, n + 1)]  # fmt: skip
    rd.events_file.write_text("".join(json.dumps(e) + "\n" for e in head))
    assert rd.events_file.stat().st_size > RECENT_BYTES
    ctx.ledger.record_checkpoint("long-run", 50, str(rd.checkpoints / "step_00000050"), 1, 1, None)
    res = CliRunner().invoke(app, ["run", "status", "long-run", "--json"])
    assert res.exit_code == 0, res.output
    p = json.loads(res.stdout)["progress"]
    assert p["step"] == n and p["first_loss"] == 9.0 - 1 / n
    assert p["checkpoints"] == 1 and p["last_checkpoint_step"] == 50
    assert p["events_window"]["from_byte"] > 0 and p["events_window"]["bytes"] <= RECENT_BYTES
    table = CliRunner().invoke(app, ["run", "status", "long-run"])
    assert table.exit_code == 0 and f"step {n}/" in table.output and "recent events: the last 4 MiB" in table.output
    listing = CliRunner().invoke(app, ["run", "list", "--json"])
    assert json.loads(listing.stdout)[0]["step"] == n
