"""Checkpoint directories with a manifest of checksums, committed atomically.

    checkpoints/
        step_000000120/          committed: manifest.json + the files it lists
        .staging-step_000000140-<nonce>/   being written; never loaded

A writer fills a staging directory, then `commit()` hashes every file, writes
`manifest.json` last, fsyncs, and renames the directory into place. A sharded writer (one
process per rank) hashes its own files where it wrote them (`hash_files`) and hands the
entries to `commit(hashed=...)`, which hashes only what no rank did. A reader trusts a
checkpoint only if `verify()` passes: every listed file present with its size and sha256.
`newest_verified()` walks back from the newest step, so a partial or corrupt checkpoint
is skipped in favour of the previous one. Torch-free: the job and the control plane share it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane.rundir import fsync_dir

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d{9})$")


def step_dirname(step: int) -> str:
    return f"step_{step:09d}"


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    manifest: dict[str, Any]

    @property
    def bytes(self) -> int:
        return sum(f["bytes"] for f in self.manifest.get("files", {}).values())


class CheckpointCorrupt(Exception):
    """A checkpoint that must not be loaded; the message says why."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def staging_dir(root: Path, step: int, tag: str | None = None) -> Path:
    """A fresh staging directory; with `tag`, a name every rank of one save derives alike."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f".staging-{step_dirname(step)}-{tag or uuid.uuid4().hex[:8]}"
    path.mkdir(exist_ok=tag is not None)
    return path


def _entry(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _threads(n: int) -> int:
    return max(1, min(n, 8, os.cpu_count() or 1))


def hash_files(base: Path, paths: list[Path]) -> dict[str, dict[str, Any]]:
    """fsync and hash `paths` (under `base`) in parallel threads (hashlib releases the GIL)."""
    with ThreadPoolExecutor(_threads(len(paths))) as pool:
        entries = list(pool.map(_entry, paths))
    return {str(p.relative_to(base)): e for p, e in zip(paths, entries, strict=True)}


def commit(
    staging: Path,
    root: Path,
    step: int,
    meta: dict[str, Any] | None = None,
    hashed: dict[str, dict[str, Any]] | None = None,
) -> CheckpointInfo:
    """Hash the staged files (those not in `hashed`), write the manifest last, rename atomically."""
    present = [p for p in sorted(staging.rglob("*")) if p.is_file() and p.name != MANIFEST]
    hashed = dict(hashed or {})
    names = {str(p.relative_to(staging)) for p in present}
    missing = sorted(set(hashed) - names)
    if missing:
        raise CheckpointCorrupt(f"{staging.name}: hashed files not staged: {', '.join(missing[:3])}")
    files = {**hash_files(staging, [p for p in present if str(p.relative_to(staging)) not in hashed]), **hashed}
    files = dict(sorted(files.items()))
    manifest = {
        "format": FORMAT_VERSION,
        "step": step,
        "committed_at": time.time(),
        "files": files,
        "meta": meta or {},
    }
    with open(staging / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(staging)
    final = root / step_dirname(step)
    if final.exists():  # a re-run of the same step (e.g. after a rollback): replace it
        shutil.rmtree(final)
    os.rename(staging, final)
    fsync_dir(root)
    return CheckpointInfo(step, final, manifest)


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{path.name}: no manifest (incomplete write)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointCorrupt(f"{path.name}: manifest is not valid JSON") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointCorrupt(f"{path.name}: manifest has no file list")
    return manifest


def verify(path: Path, *, full: bool = True) -> CheckpointInfo:
    """Check every listed file: present, same size, and (if `full`) same sha256."""
    match = _STEP_RE.match(path.name)
    if not match:
        raise CheckpointCorrupt(f"{path.name}: not a committed checkpoint directory")
    manifest = read_manifest(path)
    step = int(match.group(1))
    if manifest.get("step") != step:
        raise CheckpointCorrupt(f"{path.name}: manifest says step {manifest.get('step')}")
    entries = manifest["files"]
    for name, entry in entries.items():
        f = path / name
        if not f.is_file():
            raise CheckpointCorrupt(f"{path.name}: missing file {name}")
        size = f.stat().st_size
        if size != entry.get("bytes"):
            raise CheckpointCorrupt(f"{path.name}: {name} has {size} bytes, manifest says {entry.get('bytes')}")
    if full:  # the shards of a sharded checkpoint are hashed in parallel
        names = sorted(entries)
        with ThreadPoolExecutor(_threads(len(names))) as pool:
            sums = list(pool.map(lambda n: sha256_file(path / n), names))
        for name, digest in zip(names, sums, strict=True):
            if digest != entries[name].get("sha256"):
                raise CheckpointCorrupt(f"{path.name}: {name} checksum mismatch")
    return CheckpointInfo(step, path, manifest)


def committed_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir())


def newest_verified(
    root: Path, *, max_step: int | None = None, full: bool = True
) -> tuple[CheckpointInfo | None, list[tuple[int, str]]]:
    """The newest checkpoint that verifies (at or below `max_step`), and those skipped with why."""
    skipped: list[tuple[int, str]] = []
    for step in reversed(committed_steps(root)):
        if max_step is not None and step > max_step:
            continue
        try:
            return verify(root / step_dirname(step), full=full), skipped
        except CheckpointCorrupt as exc:
            skipped.append((step, str(exc)))
    return None, skipped


def prune(root: Path, keep_last: int, protect: set[int] | None = None) -> list[int]:
    """Remove all but the newest `keep_last` committed checkpoints and stale staging dirs."""
    steps = committed_steps(root)
    protect = protect or set()
    removed = [s for s in steps[:-keep_last] if s not in protect] if keep_last > 0 else []
    for s in removed:
        shutil.rmtree(root / step_dirname(s), ignore_errors=True)
    return removed


def clean_staging(root: Path, older_than_s: float = 0.0) -> int:
    """Remove staging directories left by writers that died (older than `older_than_s`)."""
    if not root.is_dir():
        return 0
    now, n = time.time(), 0
    for p in root.iterdir():
        if p.name.startswith(".staging-") and now - p.stat().st_mtime >= older_than_s:
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n
