"""A generated corpus of any size (kept out of git): Zipf-distributed pseudo-Japanese words.

`write_corpus(root, mb)` writes `.jsonl` files of documents of a few KB each. The vocabulary
is a seeded set of kana words with punctuation and Latin words mixed in, drawn with a Zipf
law so that token frequencies look like text. Same seed, same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

KANA = [chr(c) for c in range(0x3042, 0x3094)] + [chr(c) for c in range(0x30A2, 0x30F4)]
KANJI = [chr(c) for c in range(0x4E00, 0x4E00 + 600)]
TABLE = 1 << 20  # inverse-CDF table entries: every word of the vocabulary has at least a few
DOCS_PER_BATCH = 64


def vocabulary(seed: int, size: int = 3000) -> np.ndarray:
    rng = np.random.default_rng([seed, 1])
    words = ["、", "。", "は", "の", "\n", " "]  # the most frequent: pre-tokens stay short, as in real text
    for i in range(size):
        n = int(rng.integers(1, 5))
        pool = KANJI if i % 3 == 0 else KANA
        words.append("".join(pool[int(j)] for j in rng.integers(0, len(pool), n)))
    words += ["the", "data", "model", "GPU", "2026"]
    return np.array(words, dtype=object)


def write_corpus(root: Path, mb: float, seed: int = 0, files: int = 8, doc_words: int = 900) -> int:
    """Write about `mb` MB of jsonl under `root`; returns the bytes written.

    Fast enough for hundreds of MB: words are drawn through an inverse-CDF table of 2**20
    entries (one random integer per word); each word is JSON-escaped and encoded once, and a
    batch of documents is gathered from those bytes with numpy (the same bytes as `json.dumps`
    of each document, one line each)."""
    root.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary(seed)
    rng = np.random.default_rng([seed, 2])
    ranks = np.arange(1, len(vocab) + 1)
    p = 1.0 / ranks**1.1
    table = np.searchsorted(np.cumsum(p / p.sum()), (np.arange(TABLE) + 0.5) / TABLE, side="right")
    table = np.minimum(table, len(vocab) - 1)
    # the words' bytes, then a document's opening and closing as two more "words"
    pieces = [json.dumps(w, ensure_ascii=False)[1:-1].encode() for w in vocab] + [b'{"text": "', b'"}\n']
    flat = np.frombuffer(b"".join(pieces), dtype=np.uint8)
    lens = np.array([len(b) for b in pieces])
    starts = np.cumsum(lens) - lens
    tokens = np.empty((DOCS_PER_BATCH, doc_words + 2), dtype=np.int64)
    tokens[:, 0], tokens[:, -1] = len(vocab), len(vocab) + 1
    per_file = int(mb * 1024 * 1024 / files)
    total = 0
    for k in range(files):
        written = 0
        with open(root / f"part-{k:03d}.jsonl", "wb") as f:
            while written < per_file:
                tokens[:, 1:-1] = table[rng.integers(0, TABLE, size=(DOCS_PER_BATCH, doc_words))]
                n = lens[tokens.ravel()]
                ends = np.cumsum(n)
                at = np.repeat(starts[tokens.ravel()] - (ends - n), n) + np.arange(ends[-1])
                written += f.write(flat[at].tobytes())
        total += written
    return total
