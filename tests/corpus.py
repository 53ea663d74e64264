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
    """Write about `mb` MB of jsonl under `root`; returns the bytes written."""
    root.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary(seed)
    rng = np.random.default_rng([seed, 2])
    ranks = np.arange(1, len(vocab) + 1)
    p = 1.0 / ranks**1.1
    p /= p.sum()
    per_file = int(mb * 1024 * 1024 / files)
    total = 0
    for k in range(files):
        written = 0
        with open(root / f"part-{k:03d}.jsonl", "w", encoding="utf-8") as f:
            while written < per_file:
                idx = rng.choice(len(vocab), size=doc_words * 64, p=p)
                for d in range(64):
                    text = "".join(vocab[idx[d * doc_words : (d + 1) * doc_words]])
                    line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                    f.write(line)
                    written += len(line.encode())
        total += written
    return total
