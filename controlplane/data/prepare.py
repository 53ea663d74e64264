"""`llmctl data prepare`: sources -> tokenizer + token shards + manifest, restartable.

1. Resolve the sources and cut them into units (`text.plan_units`; independent of workers).
2. The tokenizer: `--tokenizer FILE`, or byte-level BPE trained on a seeded sample of the
   training documents (units in a seeded order, held-out documents excluded, up to
   `sample_bytes`).
3. Every unit without a valid completion record is tokenized into its shards by an engine:
   `local` (this process, or a process pool of `workers`), or `ray` (Ray Data `map_batches`
   over an actor pool on the cluster's CPUs). The record of a finished unit carries its
   checksums; on a restart, recorded units whose shards still verify (sizes; with `verify`,
   checksums) are kept and the rest (a torn unit, a truncated or edited shard) are redone.
   A change of inputs, seed or tokenizer starts over.
4. A source where no document fell in the held-out split holds out its training document of
   lowest draw (that one unit is redone), so every source with two documents has a held-out part.
5. The manifest (`meta.json`) is written last: sources with their hashes, tokens and documents
   per source and split, skipped documents, the tokenizer hash, the seed and every shard.

Documents go to the held-out split by a draw fixed by (seed, source, document key) below
`heldout_fraction`: the split is by fraction and the same whoever tokenizes the unit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from controlplane.checkpoint import sha256_file
from controlplane.data.store import META_FILE, SHARD_DIR
from controlplane.data.text import (
    DEFAULT_TEXT_FIELD,
    UNIT_BYTES,
    DataSourceError,
    ReadStats,
    Source,
    Unit,
    heldout_draw,
    iter_unit,
    plan_units,
    resolve_sources,
)
from controlplane.data.tokenize import (
    BOS,
    EOS,
    PROGRESS_DIR,
    load_tokenizer_file,
    record_path,
    tokenize_unit,
    train_tokenizer,
    verify_record,
    write_json_atomic,
)
from controlplane.errors import UserError

FORMAT_VERSION = 2
DEFAULT_SAMPLE_BYTES = 8 * 1024 * 1024
MAX_INVALID_RATIO = 0.5
PLAN_FILE = "plan.json"


@dataclass
class PrepareOptions:
    vocab_size: int = 4096
    heldout_fraction: float = 0.02
    seed: int = 0
    text_field: str = DEFAULT_TEXT_FIELD
    tokenizer: Path | None = None
    sample_bytes: int = DEFAULT_SAMPLE_BYTES
    unit_bytes: int = UNIT_BYTES
    engine: str = "local"  # local | ray
    verify: bool = False  # on a restart, re-hash every finished shard (else their sizes are checked)
    min_ray_units: int = 1  # fewer pending units than this run in this process (no parallelism to gain)
    workers: int = 1  # processes (local) or Ray Data actors (ray; 0: one per CPU of the cluster)
    ray_address: str | None = None
    ray_env: dict[str, str] | None = field(default=None, repr=False)  # set only while connected (token auth)
    progress: Callable[[str, dict[str, Any]], None] | None = field(default=None, repr=False)

    def check(self) -> None:
        if not 256 <= self.vocab_size <= 262144:
            raise UserError(f"--vocab-size {self.vocab_size}: expected 256..262144")
        if not 0 < self.heldout_fraction < 0.5:
            raise UserError(f"--heldout-fraction {self.heldout_fraction}: expected a value in (0, 0.5)")
        if self.workers < (1 if self.engine == "local" else 0):  # on Ray, 0 is every CPU of the cluster
            raise UserError(f"--workers {self.workers}: expected at least 1")
        if self.unit_bytes < 1024:
            raise UserError(f"--unit-mb: expected at least 1 KiB per unit, got {self.unit_bytes} bytes")
        if self.sample_bytes < 1024:
            raise UserError(f"--sample-mb: expected at least 1 KiB, got {self.sample_bytes} bytes")
        if not self.text_field:
            raise UserError("--text-field: expected a field name")
        if self.engine not in ("local", "ray"):
            raise UserError(f"engine {self.engine!r}: expected 'local' or 'ray'")


def prepare(sources: str | Path | list[str | Path], out: Path, **kw: Any) -> dict[str, Any]:
    """Prepare `sources` into `out`; returns the manifest. Keyword arguments: PrepareOptions."""
    opts = PrepareOptions(**kw)
    opts.check()
    specs = [str(s) for s in ([sources] if isinstance(sources, str | Path) else sources)]
    t0 = time.monotonic()
    out = Path(out).expanduser()
    srcs = resolve_sources(specs)
    units = plan_units(srcs, opts.text_field, opts.unit_bytes)
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan_record(srcs, units, opts)
    tok_path = out / "tokenizer.json"
    prev = _read_json(out / PROGRESS_DIR / PLAN_FILE)
    if prev and prev.get("key") == plan["key"] and _sha_file(tok_path) == prev.get("tokenizer_sha256"):
        plan = prev  # a restart: the tokenizer of the interrupted prepare is the one its shards used
    else:
        _clear(out)
        tok = load_tokenizer_file(opts.tokenizer) if opts.tokenizer else _train_on_sample(srcs, units, opts)
        tmp = out / ".tokenizer.json.tmp"
        tok.save(str(tmp))
        os.replace(tmp, tok_path)
        vocab = tok.get_vocab_size()
        plan.update(
            tokenizer_sha256=_sha_file(tok_path),
            vocab_size=vocab,
            dtype="uint16" if vocab <= 65536 else "uint32",
            eos_id=tok.token_to_id(EOS),
            bos_id=tok.token_to_id(BOS),
        )
        (out / PROGRESS_DIR).mkdir(exist_ok=True)
        write_json_atomic(out / PROGRESS_DIR / PLAN_FILE, plan)
    job = {
        "out": str(out.resolve()),
        "seed": opts.seed,
        "heldout_fraction": opts.heldout_fraction,
        "text_field": opts.text_field,
        "tokenizer": str(tok_path.resolve()),
        "tokenizer_sha256": plan["tokenizer_sha256"],
        "dtype": plan["dtype"],
        "plan_sha256": plan["key"],
    }
    itemsize = np.dtype(plan["dtype"]).itemsize
    records, reused = _valid_records(out, units, plan["key"], itemsize, opts.verify)
    todo = [u for u in units if u.index not in records]
    engine = _engine(opts, len(todo))
    if opts.progress:
        opts.progress("plan", {"units": len(units), "todo": len(todo), "bytes": sum(u.size for u in todo)})
    for rec in engine(todo, job, {}):
        records[rec["unit"]] = rec
        if opts.progress:
            opts.progress("unit", rec)
    _check_sources(srcs, units, records)
    redo = _force_heldout(srcs, units, records)
    if redo:
        for rec in engine([units[i] for i in redo], job, redo):
            records[rec["unit"]] = rec
    meta = _manifest(srcs, units, records, plan, opts)
    meta["prepare_s"] = round(time.monotonic() - t0, 3)
    meta["resumed_units"] = reused
    write_json_atomic(out / META_FILE, meta)
    return meta


# --------------------------------------------------------------------------- plan and restart


def _plan_record(srcs: list[Source], units: list[Unit], opts: PrepareOptions) -> dict[str, Any]:
    body = {
        "format": FORMAT_VERSION,
        "units": [u.to_json() for u in units],
        "seed": opts.seed,
        "heldout_fraction": opts.heldout_fraction,
        "text_field": opts.text_field,
        "vocab_size_asked": opts.vocab_size,
        "sample_bytes": opts.sample_bytes,
        "tokenizer_file_sha256": _sha_file(opts.tokenizer) if opts.tokenizer else None,
        "sizes": [_stat_key(Path(u.root), u.files) for u in units],
    }
    key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return {"key": key, "sources": [s.name for s in srcs], "units": len(units)}


def _stat_key(root: Path, files: tuple[str, ...]) -> list[list[int]]:
    out = []
    for f in files:
        st = (root / f).stat()
        out.append([st.st_size, st.st_mtime_ns])
    return out


def _valid_records(out: Path, units: list[Unit], key: str, itemsize: int, full: bool) -> tuple[dict[int, dict], int]:
    records: dict[int, dict] = {}
    for u in units:
        rec = _read_json(record_path(out, u.index))
        if rec and rec.get("plan") == key and verify_record(out, rec, itemsize, full):
            records[u.index] = rec
    return records, len(records)


def _clear(out: Path) -> None:
    """A different plan: what an earlier prepare left here goes (only llmctl's own files)."""
    for name in (META_FILE, "tokenizer.json", "train.bin", "heldout.bin", "heldout_docs.jsonl"):
        (out / name).unlink(missing_ok=True)
    for d in (SHARD_DIR, PROGRESS_DIR):
        shutil.rmtree(out / d, ignore_errors=True)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _sha_file(path: Path | None) -> str | None:
    return sha256_file(Path(path)) if path is not None and Path(path).is_file() else None


# --------------------------------------------------------------------------- tokenizer sample


def sample_texts(srcs: list[Source], units: list[Unit], opts: PrepareOptions) -> tuple[list[str], ReadStats]:
    """Training documents for the tokenizer: units in a seeded order, held-out documents left out."""
    texts: list[str] = []
    total = 0
    stats = ReadStats()
    order = np.random.default_rng([opts.seed, 3]).permutation(len(units))
    for i in order:
        unit = units[int(i)]
        for doc in iter_unit(unit, opts.text_field, stats):
            if heldout_draw(opts.seed, unit.source, doc.key) < opts.heldout_fraction:
                continue
            texts.append(doc.text)
            total += len(doc.text.encode())
            if total >= opts.sample_bytes:
                return texts, stats
    return texts, stats


def _train_on_sample(srcs: list[Source], units: list[Unit], opts: PrepareOptions):
    texts, stats = sample_texts(srcs, units, opts)
    if not texts:
        names = ", ".join(s.spec for s in srcs)
        raise DataSourceError(f"{names}: no usable documents to train the tokenizer on ({_found(stats, srcs)})")
    return train_tokenizer(texts, opts.vocab_size)


def _found(stats: ReadStats, srcs: list[Source]) -> str:
    files = sum(len(s.files) for s in srcs)
    other = sum(len(s.skipped) for s in srcs)
    parts = [f"{files} file(s) read", f"{stats.docs} usable document(s)"]
    parts.append(f"{stats.invalid_utf8} not valid UTF-8 (skipped)")
    if stats.empty:
        parts.append(f"{stats.empty} empty (skipped)")
    if other:
        parts.append(f"{other} file(s) of other kinds skipped")
    return ", ".join(parts)


# --------------------------------------------------------------------------- checks after the pass


def _source_stats(units: list[Unit], records: dict[int, dict], name: str) -> ReadStats:
    st = ReadStats()
    for u in units:
        if u.source == name:
            r = records[u.index]
            st.docs += r["docs"]
            st.invalid_utf8 += r["invalid_utf8"]
            st.empty += r["empty"]
    return st


def _check_sources(srcs: list[Source], units: list[Unit], records: dict[int, dict]) -> None:
    total = 0
    for src in srcs:
        st = _source_stats(units, records, src.name)
        seen = st.docs + st.invalid_utf8
        if st.invalid_utf8 and st.invalid_utf8 > MAX_INVALID_RATIO * seen:
            raise DataSourceError(
                f"{src.spec}: {st.invalid_utf8} of {seen} documents are not valid UTF-8; refusing a source "
                f"that is mostly invalid (is it text?)"
            )
        if st.docs == 0:
            raise DataSourceError(f"{src.spec}: no usable documents ({_found(st, [src])})")
        total += st.docs
    if total < 2:
        raise DataSourceError(
            f"{', '.join(s.spec for s in srcs)}: need at least 2 documents (one to train on, one to hold out); "
            f"{_found(_all_stats(units, records), srcs)}"
        )


def _all_stats(units: list[Unit], records: dict[int, dict]) -> ReadStats:
    st = ReadStats()
    for r in records.values():
        st.docs += r["docs"]
        st.invalid_utf8 += r["invalid_utf8"]
        st.empty += r["empty"]
    return st


def _force_heldout(srcs: list[Source], units: list[Unit], records: dict[int, dict]) -> dict[int, str]:
    """unit -> document key, for sources with two or more documents and none held out."""
    redo: dict[int, str] = {}
    for src in srcs:
        recs = [records[u.index] for u in units if u.source == src.name]
        if sum(r["shards"]["heldout"]["docs"] for r in recs) or sum(r["docs"] for r in recs) < 2:
            continue
        if any(r.get("forced_heldout") for r in recs):
            continue
        best = min((r for r in recs if r["min_train_key"] is not None), key=lambda r: r["min_train_draw"])
        redo[best["unit"]] = best["min_train_key"]
    return redo


# --------------------------------------------------------------------------- manifest


def _manifest(srcs, units, records, plan, opts) -> dict[str, Any]:
    shards, sources = [], []
    for src in srcs:
        recs = [records[u.index] for u in units if u.source == src.name]
        st = _source_stats(units, records, src.name)
        h = hashlib.sha256()
        for r in recs:
            h.update(r["input_sha256"].encode())
        entry = {
            "name": src.name,
            "spec": src.spec,
            "root": src.root,
            "files": len(src.files),
            "skipped_files": len(src.skipped),
            "input_bytes": sum(r["input_bytes"] for r in recs),
            "sha256": h.hexdigest(),
            "docs": st.docs,
            "invalid_utf8_docs": st.invalid_utf8,
            "empty_docs": st.empty,
        }
        for split in ("train", "heldout"):
            entry[f"{split}_tokens"] = sum(r["shards"][split]["tokens"] for r in recs)
            entry[f"{split}_docs"] = sum(r["shards"][split]["docs"] for r in recs)
        sources.append(entry)
        for r in recs:
            for split in ("train", "heldout"):
                s = r["shards"][split]
                shards.append({"split": split, "source": src.name, "unit": r["unit"], **s})
    total = {k: sum(s[k] for s in sources) for k in ("train_tokens", "heldout_tokens", "train_docs", "heldout_docs")}
    return {
        "format": FORMAT_VERSION,
        "vocab_size": plan["vocab_size"],
        "dtype": plan["dtype"],
        "bos_id": plan["bos_id"],
        "eos_id": plan["eos_id"],
        "tokenizer_sha256": plan["tokenizer_sha256"],
        "tokenizer": str(opts.tokenizer) if opts.tokenizer else "trained",
        "seed": opts.seed,
        "heldout_fraction": opts.heldout_fraction,
        "text_field": opts.text_field,
        "source": ", ".join(s.spec for s in srcs),
        "sources": sources,
        **total,
        "invalid_utf8_docs": sum(s["invalid_utf8_docs"] for s in sources),
        "text_bytes": sum(s["input_bytes"] for s in sources),
        "units": len(units),
        "shards": shards,
        "peak_worker_rss_bytes": max((r.get("peak_rss_bytes", 0) for r in records.values()), default=0),
    }


# --------------------------------------------------------------------------- engines

Engine = Callable[[list[Unit], dict[str, Any], dict[int, str]], Iterable[dict[str, Any]]]


def _engine(opts: PrepareOptions, n_units: int) -> Engine:
    if opts.engine == "ray" and n_units >= opts.min_ray_units:
        from controlplane.data.ray_engine import ray_engine

        return ray_engine(opts.ray_address, opts.workers, opts.ray_env)
    if opts.engine == "ray" or opts.workers <= 1 or n_units <= 1:
        return _in_process
    return lambda units, job, forced: _process_pool(units, job, forced, opts.workers)


def _in_process(units: list[Unit], job: dict[str, Any], forced: dict[int, str]) -> Iterator[dict[str, Any]]:
    for u in units:
        yield tokenize_unit(u, job, forced.get(u.index))


def _process_pool(units, job, forced, workers: int) -> Iterator[dict[str, Any]]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(units)), mp_context=ctx, initializer=_one_thread) as pool:
        futures = [pool.submit(tokenize_unit, u, job, forced.get(u.index)) for u in units]
        for fut in as_completed(futures):
            yield fut.result()


def _one_thread() -> None:
    """One tokenizer thread per worker process: the pool is the parallelism."""
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
