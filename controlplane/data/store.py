"""A prepared dataset on disk, read side: the manifest and memory-mapped token shards.

    <dataset>/meta.json                 the manifest, written last (a dataset without it is unfinished)
    <dataset>/tokenizer.json            HF `tokenizers` byte-level BPE
    <dataset>/shards/NNNNN-train.bin    token ids of unit NNNNN (uint16, or uint32 past 65,536 ids)
    <dataset>/shards/NNNNN-train.idx    int64 document boundaries: offsets 0, end of doc 1, ..., tokens
    <dataset>/shards/NNNNN-heldout.bin  the unit's held-out documents, same layout
    <dataset>/progress/                 per-unit completion records of a prepare (for its restart)

Every document ends with `<|endoftext|>`. A shard is opened as a read-only `np.memmap`, never
read whole, so a corpus larger than RAM costs only the pages a step touches. Numpy only: the
training job and the evaluator import this without Ray.

Format 1 (a single `train.bin` / `heldout.bin`) is still read, as one shard.
"""

from __future__ import annotations

import contextlib
import json
import mmap
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from controlplane.errors import CorruptFileError

META_FILE = "meta.json"
SHARD_DIR = "shards"
SPLITS = ("train", "heldout")


def shard_name(index: int, split: str) -> str:
    return f"{index:05d}-{split}"


def read_meta(dataset_dir: str | Path) -> dict[str, Any]:
    path = Path(dataset_dir) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        hint = " (an interrupted prepare resumes when run again)" if (Path(dataset_dir) / "progress").is_dir() else ""
        raise CorruptFileError(f"{path}: missing; run `llmctl data prepare` first{hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{path}: not a JSON object")
    for key in ("vocab_size", "dtype", "train_tokens"):
        if key not in meta:
            raise CorruptFileError(f"{path}: no {key!r}")
    return meta


@dataclass(frozen=True)
class ShardRef:
    path: Path
    tokens: int
    source: str


class TokenStore:
    """The shards of one split of a prepared dataset, each memory-mapped on first use."""

    def __init__(self, dataset_dir: str | Path, split: str = "train") -> None:
        self.dir = Path(dataset_dir)
        self.meta = read_meta(self.dir)
        self.split = split
        self.dtype = np.dtype(self.meta["dtype"])
        self.shards = _shard_refs(self.dir, self.meta, split, self.dtype)
        self._maps: dict[int, np.ndarray] = {}

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def shard(self, k: int) -> np.ndarray:
        m = self._maps.get(k)
        if m is None:
            ref = self.shards[k]
            if ref.tokens == 0:
                m = np.zeros(0, dtype=self.dtype)
            else:
                m = np.memmap(ref.path, dtype=self.dtype, mode="r", shape=(ref.tokens,))
                _advise_random(m)
            self._maps[k] = m
        return m

    def windows_per_shard(self, seq_len: int) -> np.ndarray:
        """Windows of `seq_len + 1` tokens (stride `seq_len`) in each shard; none crosses a shard."""
        n = np.array([s.tokens for s in self.shards], dtype=np.int64)
        return np.maximum(0, (n - 1) // seq_len)

    @cached_property
    def sources(self) -> list[str]:
        return sorted({s.source for s in self.shards})


def _advise_random(m: np.memmap) -> None:
    """Windows are read in shuffled order: readahead would fetch pages no sample needs."""
    raw = getattr(m, "_mmap", None)
    if raw is not None and hasattr(mmap, "MADV_RANDOM"):
        with contextlib.suppress(OSError, ValueError):
            raw.madvise(mmap.MADV_RANDOM)


def _shard_refs(root: Path, meta: dict[str, Any], split: str, dtype: np.dtype) -> list[ShardRef]:
    if int(meta.get("format", 1)) < 2:
        path = root / f"{split}.bin"
        if not path.is_file():
            raise CorruptFileError(f"{path}: missing")
        return [ShardRef(path, path.stat().st_size // dtype.itemsize, str(meta.get("source", "")))]
    refs = []
    for rec in meta.get("shards", []):
        if rec.get("split") != split:
            continue
        path = root / SHARD_DIR / f"{rec['name']}.bin"
        tokens = int(rec["tokens"])
        if tokens and (not path.is_file() or path.stat().st_size != tokens * dtype.itemsize):
            raise CorruptFileError(f"{path}: missing or not {tokens} tokens as {root / META_FILE} records")
        refs.append(ShardRef(path, tokens, str(rec["source"])))
    return refs


def load_tokens(dataset_dir: str | Path, split: str = "train") -> np.ndarray:
    """All tokens of a split as one array (small datasets and tests; the job uses TokenStore)."""
    store = TokenStore(dataset_dir, split)
    parts = [store.shard(k) for k in range(len(store.shards))]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=store.dtype)


def heldout_by_source(dataset_dir: str | Path, max_tokens: int) -> dict[str, np.ndarray]:
    """Each source's held-out tokens (at most `max_tokens` of each), memory-mapped where possible."""
    store = TokenStore(dataset_dir, "heldout")
    out: dict[str, list[np.ndarray]] = {}
    for k, ref in enumerate(store.shards):
        have = sum(len(a) for a in out.get(ref.source, []))
        if have >= max_tokens or ref.tokens == 0:
            continue
        out.setdefault(ref.source, []).append(store.shard(k)[: max_tokens - have])
    return {s: (parts[0] if len(parts) == 1 else np.concatenate(parts)) for s, parts in out.items()}
