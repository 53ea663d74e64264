"""The tokenizer, and the work of one unit: read it, split it, tokenize it, write its shards.

`tokenize_unit` is what every worker runs (in this process, in a local process pool or in a
Ray Data actor): it streams the unit's documents in batches of about 1 MB of text, so its
memory is bounded by the batch, not by the unit or the corpus. Its shard files are written
beside their final names, fsynced and renamed; then the unit's completion record (token and
document counts, checksums, the hash of the input it read) is written the same way. A
prepare killed at any moment leaves finished units with a record and at most one torn unit
without one, which the next prepare redoes.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from controlplane.checkpoint import sha256_file
from controlplane.data.store import SHARD_DIR, shard_name
from controlplane.data.text import Document, ReadStats, Unit, heldout_draw, iter_unit
from controlplane.errors import UserError

BOS = "<|bos|>"
EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, BOS]
PROGRESS_DIR = "progress"
BATCH_TEXT_BYTES = 1 << 20


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (HF tokenizers) with `<|endoftext|>` and `<|bos|>` specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def load_tokenizer_file(path: Path):
    """A user's tokenizer.json; it must know `<|endoftext|>` (every document ends with it)."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise UserError(f"--tokenizer {path}: not a readable tokenizers JSON file ({str(exc)[:120]})") from None
    if tok.token_to_id(EOS) is None:
        raise UserError(f"--tokenizer {path}: has no {EOS!r} token (every document ends with it)")
    return tok


@lru_cache(maxsize=2)
def _tokenizer(path: str, sha256: str):
    from tokenizers import Tokenizer

    raw = Path(path).read_bytes()
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise UserError(f"{path}: changed while the prepare ran (sha256 differs)")
    return Tokenizer.from_str(raw.decode())


class _ShardWriter:
    """Appends documents' token ids to `<name>.bin` and their end offsets to `<name>.idx`."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path, self.dtype = path, dtype
        self.tmp = path.with_name(f".{path.name}.bin.tmp")
        self.f = open(self.tmp, "wb")  # noqa: SIM115 - closed (fsynced, renamed) by close()
        self.h = hashlib.sha256()
        self.ends: list[int] = [0]
        self.tokens = 0

    def write(self, ids: list[np.ndarray]) -> None:
        if not ids:
            return
        block = np.concatenate(ids).astype(self.dtype, copy=False)
        data = block.tobytes()
        self.f.write(data)
        self.h.update(data)
        for a in ids:
            self.tokens += len(a)
            self.ends.append(self.tokens)

    def close(self) -> dict[str, Any]:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        idx = np.asarray(self.ends, dtype=np.int64).tobytes()
        idx_tmp = self.path.with_name(f".{self.path.name}.idx.tmp")
        _write_durable(idx_tmp, idx)
        os.replace(self.tmp, self.path.with_suffix(".bin"))
        os.replace(idx_tmp, self.path.with_suffix(".idx"))
        return {
            "name": self.path.name,
            "tokens": self.tokens,
            "docs": len(self.ends) - 1,
            "sha256": self.h.hexdigest(),
            "idx_sha256": hashlib.sha256(idx).hexdigest(),
        }


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_durable(tmp, json.dumps(obj, indent=1, sort_keys=True).encode())
    os.replace(tmp, path)


def record_path(out: Path, index: int) -> Path:
    return out / PROGRESS_DIR / f"{index:05d}.json"


def tokenize_unit(unit: Unit, job: dict[str, Any], force_heldout: str | None = None) -> dict[str, Any]:
    """Tokenize one unit into its train and held-out shards; returns (and records) its completion record.

    `job`: out, seed, heldout_fraction, text_field, tokenizer (path), tokenizer_sha256, dtype.
    """
    out = Path(job["out"])
    tok = _tokenizer(job["tokenizer"], job["tokenizer_sha256"])
    eos = tok.token_to_id(EOS)
    # the ids only: offsets are not kept, which saves about a sixth of the tokenizer's time
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    dtype = np.dtype(job["dtype"])
    fraction, seed = float(job["heldout_fraction"]), int(job["seed"])
    shard_dir = out / SHARD_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    writers = {s: _ShardWriter(shard_dir / shard_name(unit.index, s), dtype) for s in ("train", "heldout")}
    pending: dict[str, list[str]] = {"train": [], "heldout": []}
    size = 0
    stats = ReadStats()
    input_hash = hashlib.sha256()
    min_draw, min_key = 2.0, None

    def flush() -> None:
        nonlocal size
        for split, texts in pending.items():
            if texts:
                encs = encode(texts, add_special_tokens=False)
                writers[split].write([np.asarray([*e.ids, eos], dtype=np.int64) for e in encs])
                texts.clear()
        size = 0

    doc: Document
    for doc in iter_unit(unit, job["text_field"], stats):
        input_hash.update(doc.key.encode() + b"\x00" + doc.text.encode() + b"\x00")
        u = heldout_draw(seed, unit.source, doc.key)
        held = u < fraction or doc.key == force_heldout
        if not held and u < min_draw:
            min_draw, min_key = u, doc.key
        pending["heldout" if held else "train"].append(doc.text)
        size += len(doc.text)
        if size >= BATCH_TEXT_BYTES:
            flush()
    flush()
    shards = {split: w.close() for split, w in writers.items()}
    rec = {
        "unit": unit.index,
        "source": unit.source,
        "shards": shards,
        "input_sha256": input_hash.hexdigest(),
        "input_bytes": unit.size,
        "invalid_utf8": stats.invalid_utf8,
        "empty": stats.empty,
        "docs": stats.docs,
        "min_train_draw": min_draw if min_key is not None else None,
        "min_train_key": min_key,
        "forced_heldout": force_heldout,
        "plan": job["plan_sha256"],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "pid": os.getpid(),
    }
    write_json_atomic(record_path(out, unit.index), rec)
    return rec


def verify_record(out: Path, rec: dict[str, Any], itemsize: int, full: bool = False) -> bool:
    """Both shards of a recorded unit exist at their recorded sizes (a truncated shard fails) and,
    with `full`, hash to their recorded checksums (an edited one fails too)."""
    for s in rec["shards"].values():
        base = out / SHARD_DIR / s["name"]
        bin_path, idx_path = base.with_suffix(".bin"), base.with_suffix(".idx")
        try:
            if bin_path.stat().st_size != s["tokens"] * itemsize or idx_path.stat().st_size != (s["docs"] + 1) * 8:
                return False
            if full and (sha256_file(bin_path) != s["sha256"] or sha256_file(idx_path) != s["idx_sha256"]):
                return False
        except OSError:
            return False
    return True
