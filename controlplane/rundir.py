"""The run directory: the contract between a job and the control plane.

    <storage>/runs/<run_id>/
        spec.json          the frozen RunSpec (and the cluster it ran on)
        events.jsonl       append-only: one JSON object a line, each with `ts`, `type`, `attempt`
        checkpoints/       step_<N>/ directories, committed atomically (controlplane.checkpoint)
        artifacts/         exported models, reports
        logs/              driver and worker logs
        fence              the current attempt number; an older attempt must stop writing

Jobs import this module (it needs neither Ray nor torch). Readers tolerate a torn last line
and fields they do not know.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane.errors import CorruptFileError

# Event types written by jobs and the supervisor.
EV_START = "start"
EV_HEARTBEAT = "heartbeat"
EV_STEP = "step"
EV_CHECKPOINT = "checkpoint"
EV_FAILURE = "failure"
EV_END = "end"

# Status commands read this much of the end of events.jsonl, never the whole of a long run's file.
RECENT_BYTES = 4 << 20


class FencedError(RuntimeError):
    """This attempt was superseded by a newer one and must stop writing."""


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def of(cls, storage_root: str | Path, run_id: str) -> RunDir:
        return cls(Path(storage_root).expanduser() / "runs" / run_id)

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def spec_file(self) -> Path:
        return self.path / "spec.json"

    @property
    def events_file(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def artifacts(self) -> Path:
        return self.path / "artifacts"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def fence_file(self) -> Path:
        return self.path / "fence"

    @property
    def interval_file(self) -> Path:
        return self.path / "checkpoint_interval"

    def create(self) -> RunDir:
        for d in (self.path, self.checkpoints, self.artifacts, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        return self

    # ---------------------------------------------------------------- frozen spec

    def write_spec(self, record: dict[str, Any]) -> None:
        write_atomic(self.spec_file, json.dumps(record, indent=2, sort_keys=True).encode())

    def read_spec(self) -> dict[str, Any]:
        try:
            return json.loads(self.spec_file.read_text())
        except FileNotFoundError:
            raise CorruptFileError(f"{self.spec_file}: missing frozen spec") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptFileError(f"{self.spec_file}: not valid JSON ({exc})") from None

    # ---------------------------------------------------------------- fencing

    def set_fence(self, attempt: int) -> None:
        write_atomic(self.fence_file, str(attempt).encode())

    def current_fence(self) -> int:
        try:
            return int(self.fence_file.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def set_checkpoint_interval(self, steps: int) -> None:
        """The supervisor's checkpoint interval for `interval_steps: auto` (the job rereads it)."""
        write_atomic(self.interval_file, f"{steps}\n".encode())

    def checkpoint_interval(self) -> int | None:
        try:
            value = int(self.interval_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return value if value > 0 else None

    def check_fence(self, attempt: int) -> None:
        current = self.current_fence()
        if current > attempt:
            raise FencedError(f"attempt {attempt} is fenced: attempt {current} owns {self.path}")

    # ---------------------------------------------------------------- events

    def append_event(self, type_: str, attempt: int, **fields: Any) -> dict[str, Any]:
        event = {"ts": time.time(), "type": type_, "attempt": attempt, **fields}
        line = json.dumps(event, separators=(",", ":"), default=str) + "\n"
        # O_APPEND writes of one line under PIPE_BUF are atomic among local writers.
        fd = os.open(self.events_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        return event

    def iter_events(self, offset: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield (offset after the line, event) from byte `offset`; a torn last line is skipped."""
        if not self.events_file.exists():
            return
        with open(self.events_file, "rb") as f:
            f.seek(offset)
            pos = offset
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # torn tail: a writer is mid-line, or died there
                pos += len(raw)
                try:
                    event = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if isinstance(event, dict):
                    yield pos, event

    def events(self, types: set[str] | None = None) -> list[dict[str, Any]]:
        return [e for _, e in self.iter_events() if types is None or e.get("type") in types]

    def recent_offset(self, max_bytes: int = RECENT_BYTES) -> int:
        """Byte offset of the first whole line within the last `max_bytes` of events.jsonl."""
        try:
            size = self.events_file.stat().st_size
        except FileNotFoundError:
            return 0
        if size <= max_bytes:
            return 0
        with open(self.events_file, "rb") as f:
            f.seek(size - max_bytes - 1)
            return size - max_bytes - 1 + len(f.readline())

    def recent_events(self, max_bytes: int = RECENT_BYTES, types: set[str] | None = None) -> list[dict[str, Any]]:
        """The events in the last `max_bytes` of events.jsonl (all of them in a smaller file):
        what a status line needs, at a cost that does not grow with the run's age."""
        return [
            e for _, e in self.iter_events(self.recent_offset(max_bytes)) if types is None or e.get("type") in types
        ]

    def metrics_start(self) -> dict[str, Any] | None:
        """The newest recent `start` event that names the attempt's training metrics URL (rank 0's)."""
        starts = [e for e in self.recent_events(types={"start"}) if e.get("metrics_url")]
        return starts[-1] if starts else None

    def first_event(self, type_: str, max_bytes: int = 1 << 20) -> dict[str, Any] | None:
        """The first event of a type, looked for within the first `max_bytes` of events.jsonl."""
        for pos, e in self.iter_events():
            if e.get("type") == type_:
                return e
            if pos >= max_bytes:
                break
        return None


class EventTail:
    """Follows a run's events.jsonl: each `poll()` returns the complete lines added since the last."""

    def __init__(self, run_dir: RunDir, offset: int = 0):
        self.run_dir = run_dir
        self.offset = offset

    def poll(self) -> list[dict[str, Any]]:
        out = []
        for self.offset, event in self.run_dir.iter_events(self.offset):  # noqa: B020
            out.append(event)
        return out


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file, fsync, rename: readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
