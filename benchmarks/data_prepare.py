"""`llmctl data prepare` on Ray Data (2 workers) vs a single-process loop, same files, same tokenizer.

Generates a corpus (default 48 MB of jsonl, `tests/corpus.py`), trains one tokenizer on a
sample, then in the same run:

- baseline: one process reads every file line by line, `json.loads`, `Tokenizer.encode`
  (one thread) and appends the ids to one token file;
- llmctl: `prepare(engine="ray", workers=2, tokenizer=...)` on a fresh local Ray cluster of
  2 CPUs, shards, indexes, checksums and manifest included; the wall time counts the Ray Data
  actors' start.

The two are measured in interleaved rounds (baseline, then llmctl, `--rounds` times) on one
Ray cluster started once, after its own processes have settled. Prints tokens/s of each per
round and the median ratio (goal >= 1.7 on 2 cores), then the projected time for
2T tokens on the reference cluster's training nodes (node_count x cpus_per_node from
examples/cluster-reference.yaml, one worker per CPU at the measured per-worker rate).

    python benchmarks/data_prepare.py [--mb 48] [--unit-mb 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the baseline is one thread; the pool's workers are too

import numpy as np  # noqa: E402

from controlplane import data  # noqa: E402
from controlplane.data.tokenize import train_tokenizer  # noqa: E402
from controlplane.spec import ClusterSpec, load_spec  # noqa: E402
from tests.corpus import write_corpus  # noqa: E402


def baseline(files: list[Path], tokenizer: Path, out: Path) -> tuple[int, float]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    eos = tok.token_to_id(data.EOS)
    n = 0
    t0 = time.perf_counter()
    with open(out, "wb") as f:
        for path in files:
            with open(path, encoding="utf-8") as src:
                for line in src:
                    text = json.loads(line)["text"].strip()  # as prepare reads a document
                    if not text:
                        continue
                    ids = tok.encode(text, add_special_tokens=False).ids
                    ids.append(eos)
                    np.asarray(ids, dtype=np.uint16).tofile(f)
                    n += len(ids)
    return n, time.perf_counter() - t0


def _cpu_times() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def settle(quiet: float = 0.5, limit: float = 30.0) -> None:
    """Wait (bounded) until the machine's CPU use over one second falls below `quiet` cores."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        a = _cpu_times()
        time.sleep(1.0)
        b = _cpu_times()
        total = sum(b) - sum(a)
        idle = (b[3] + b[4]) - (a[3] + a[4])  # idle + iowait
        if (total - idle) / max(1, total) * (os.cpu_count() or 1) < quiet:
            return


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=48.0)
    p.add_argument("--unit-mb", type=float, default=4.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    import ray

    with tempfile.TemporaryDirectory(prefix="data-prepare-") as tmp:
        work = Path(tmp)
        size = write_corpus(work / "corpus", args.mb, seed=0, files=8)
        files = sorted((work / "corpus").glob("*.jsonl"))
        sample = []
        with open(files[0], encoding="utf-8") as f:
            for line, _ in zip(f, range(800), strict=False):
                sample.append(json.loads(line)["text"])
        tok = train_tokenizer(sample, 4096)
        tokenizer = work / "tokenizer.json"
        tok.save(str(tokenizer))
        print(f"corpus: {size / 1e6:.1f} MB in {len(files)} jsonl files, vocab {tok.get_vocab_size()}")

        ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        settle()  # the new cluster's own processes finish starting before anything is timed
        ratios = []
        try:
            for r in range(args.rounds):  # interleaved, so both sides see the same machine
                base_tokens, base_s = baseline(files, tokenizer, work / "baseline.bin")
                base_rate = base_tokens / base_s
                t0 = time.perf_counter()
                meta = data.prepare(
                    work / "corpus",
                    work / f"ds-{r}",
                    tokenizer=tokenizer,
                    engine="ray",
                    workers=args.workers,
                    unit_bytes=int(args.unit_mb * 1024 * 1024),
                )
                ray_s = time.perf_counter() - t0
                ray_tokens = meta["train_tokens"] + meta["heldout_tokens"]
                assert ray_tokens == base_tokens, (ray_tokens, base_tokens)  # the same work, token for token
                ray_rate = ray_tokens / ray_s
                ratios.append(ray_rate / base_rate)
                print(
                    f"round {r + 1}: single-process loop {base_tokens:,} tokens in {base_s:.1f}s = "
                    f"{base_rate:,.0f} tokens/s; data prepare, Ray Data, {args.workers} workers: {ray_s:.1f}s = "
                    f"{ray_rate:,.0f} tokens/s ({meta['units']} units, actor start included; peak worker RSS "
                    f"{meta['peak_worker_rss_bytes'] / 2**20:.0f} MiB); ratio {ratios[-1]:.2f}x"
                )
        finally:
            ray.shutdown()
        print(
            f"ratio: {statistics.median(ratios):.2f}x median of {len(ratios)} rounds "
            f"(range {min(ratios):.2f}-{max(ratios):.2f}; goal >= 1.7 on 2 cores)"
        )

        ref = load_spec(ClusterSpec, REPO / "examples" / "cluster-reference.yaml")
        train = [g for g in ref.node_groups if g.role == "train"]
        cpus = sum(g.node_count * g.cpus_per_node for g in train)
        nodes = sum(g.node_count for g in train)
        per_worker = ray_rate / args.workers
        days = 2e12 / (per_worker * cpus) / 86400
        print(
            f"projected: 2T tokens on the reference cluster's {nodes} x {train[0].cpus_per_node} CPUs "
            f"({cpus:,} workers at {per_worker:,.0f} tokens/s each) = {days * 24:.1f} h ({days * 1440:.1f} min)"
        )


if __name__ == "__main__":
    main()
