"""Dataset preparation: a directory of text -> byte-level BPE tokenizer + token shards.

    <dataset_dir>/tokenizer.json      HF `tokenizers` byte-level BPE
    <dataset_dir>/meta.json           vocab_size, dtype, token counts, source, seed, bos/eos ids
    <dataset_dir>/train.bin           flat token ids (numpy memmap, dtype from meta)
    <dataset_dir>/heldout.bin         held-out tokens, for evaluation
    <dataset_dir>/heldout_docs.jsonl  held-out raw documents

The default corpus is Debian's `manpages-ja` (gzipped roff under /usr/share/man/ja),
stripped to plain text. Any directory of `.txt` (one document per file) or `.jsonl` (one
`{"text": ...}` per line) files works too. Everything is deterministic for a seed: document
order, the held-out split and the tokenizer. Torch-free (tokenizers + numpy).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from controlplane.errors import CorruptFileError, UserError

MANPAGES_JA_DIR = Path("/usr/share/man/ja")
DEFAULT_SOURCE = "manpages-ja"
DEFAULT_MAX_BYTES = 4 * 1024 * 1024
BOS = "<|bos|>"
EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, BOS]
FORMAT_VERSION = 1


class DataSourceError(UserError):
    """The corpus source cannot be read (missing directory, no documents)."""


# --------------------------------------------------------------------------- roff -> text

_FONT_RE = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_SIZE_RE = re.compile(r"\\s[+-]?\d+")
_NAMED_CHAR_RE = re.compile(r"\\\((..)|\\\[([^\]]*)\]")
_STRING_RE = re.compile(r"\\\*(\(..|\[[^\]]*\]|.)")
_ESCAPE_ARG_RE = re.compile(r"\\[hvwlLDbxXkoSNYZRH]'[^']*'")
_NAMED = {
    "em": "—", "en": "–", "hy": "-", "bu": "•", "co": "©", "rg": "®", "lq": "“", "rq": "”",
    "oq": "‘", "cq": "’", "aq": "'", "dq": '"', "mi": "-", "pl": "+", "mu": "×", ">=": "≥",
    "<=": "≤", "->": "→", "<-": "←", "ti": "~", "ha": "^", "rs": "\\", "ba": "|", "de": "°",
}  # fmt: skip
# Requests whose arguments are running text (the rest are layout and are dropped).
_TEXT_MACROS = {
    "SH", "SS", "TP", "IP", "B", "I", "BI", "BR", "IB", "IR", "RB", "RI", "SM", "SB", "Nm", "Nd",
    "Sh", "Ss", "It", "Ar", "Fl", "Cm", "Pa", "Em", "Xr", "Dv", "Ev", "Fn", "Va", "Op", "Dq", "Ql",
}  # fmt: skip


def roff_to_text(src: str) -> str:
    """Strip roff/man markup to readable text (good enough for language-model data)."""
    lines: list[str] = []
    for raw in src.splitlines():
        line = raw.rstrip()
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].strip().split(None, 1)
            if not parts:
                continue
            name = parts[0]
            if name not in _TEXT_MACROS or len(parts) == 1:
                continue
            line = parts[1].replace('"', "")
            if name in ("BR", "RB", "BI", "IB", "IR", "RI"):
                line = line.replace(" ", "")
        line = _inline(line)
        if line.strip():
            lines.append(line.strip())
    return "\n".join(lines)


def _inline(line: str) -> str:
    line = line.split('\\"', 1)[0]  # trailing comment
    line = _FONT_RE.sub("", line)
    line = _SIZE_RE.sub("", line)
    line = _ESCAPE_ARG_RE.sub("", line)
    line = _STRING_RE.sub("", line)
    line = _NAMED_CHAR_RE.sub(lambda m: _NAMED.get(m.group(1) or m.group(2) or "", ""), line)
    for esc, rep in (("\\-", "-"), ("\\e", "\\"), ("\\&", ""), ("\\c", ""), ("\\ ", " "), ("\\~", " ")):
        line = line.replace(esc, rep)
    line = re.sub(r"\\[,/|^%0:!{}]", "", line)
    return line.replace("\\\\", "\\")


# --------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def _read_man(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    for enc in ("utf-8", "euc-jp"):
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            continue
    return raw.decode("utf-8", errors="replace")


def iter_documents(source: str | Path) -> Iterator[Document]:
    """Documents of a source in a stable (sorted) order."""
    if str(source) == DEFAULT_SOURCE:
        if not MANPAGES_JA_DIR.is_dir():
            raise DataSourceError(f"{MANPAGES_JA_DIR}: not found; install Debian's manpages-ja or give a directory")
        for path in sorted(MANPAGES_JA_DIR.rglob("*")):
            if path.is_file() and re.search(r"\.\d\w*(\.gz)?$", path.name):
                text = roff_to_text(_read_man(path))
                if text:
                    yield Document(str(path.relative_to(MANPAGES_JA_DIR)), text)
        return
    root = Path(source).expanduser()
    if not root.is_dir():
        raise DataSourceError(f"{source}: not a directory (give 'manpages-ja' or a directory of .txt/.jsonl files)")
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        rel = str(path.relative_to(root))
        if path.suffix == ".txt":
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                yield Document(rel, text)
        elif path.suffix == ".jsonl":
            with open(path, encoding="utf-8", errors="replace") as f:
                for i, line in enumerate(f):
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    text = rec.get("text") if isinstance(rec, dict) else rec if isinstance(rec, str) else None
                    if isinstance(text, str) and text.strip():
                        yield Document(f"{rel}:{i + 1}", text.strip())


def collect(source: str | Path, *, seed: int, max_bytes: int) -> list[Document]:
    """Shuffle documents with `seed`, then keep them until `max_bytes` of UTF-8 text."""
    docs = list(iter_documents(source))
    if not docs:
        raise DataSourceError(f"{source}: no documents (.txt or .jsonl with a 'text' field)")
    order = np.random.default_rng(seed).permutation(len(docs))
    kept, total = [], 0
    for i in order:
        size = len(docs[i].text.encode())
        if kept and total + size > max_bytes:
            continue
        kept.append(docs[i])
        total += size
    return kept


def split_heldout(n_docs: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out documents: a seeded choice of round(n*fraction) (>= 1 if n > 1)."""
    n_held = min(n_docs - 1, max(1, round(n_docs * fraction))) if n_docs > 1 else 0
    mask = np.zeros(n_docs, dtype=bool)
    mask[np.random.default_rng([seed, 1]).choice(n_docs, size=n_held, replace=False)] = True
    return mask


# --------------------------------------------------------------------------- tokenizer + shards


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


def encode_docs(tok: Any, texts: list[str], eos_id: int, dtype: np.dtype) -> np.ndarray:
    pieces = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        pieces.append(np.asarray(enc.ids, dtype=dtype))
        pieces.append(np.asarray([eos_id], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def prepare(
    source: str | Path,
    out: Path,
    *,
    vocab_size: int = 4096,
    heldout_fraction: float = 0.02,
    seed: int = 0,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict[str, Any]:
    """Build tokenizer and shards into `out` (written beside, renamed into place); returns meta."""
    if not 256 <= vocab_size <= 262144:
        raise UserError(f"--vocab-size {vocab_size}: expected 256..262144")
    if not 0 < heldout_fraction < 0.5:
        raise UserError(f"--heldout-fraction {heldout_fraction}: expected a value in (0, 0.5)")
    t0 = time.monotonic()
    docs = collect(source, seed=seed, max_bytes=max_bytes)
    if len(docs) < 2:
        raise DataSourceError(f"{source}: need at least 2 documents to hold one out, found {len(docs)}")
    held = split_heldout(len(docs), heldout_fraction, seed)
    train_texts = [d.text for d, h in zip(docs, held, strict=True) if not h]
    held_docs = [d for d, h in zip(docs, held, strict=True) if h]
    tok = train_tokenizer(train_texts, vocab_size)
    real_vocab = tok.get_vocab_size()
    dtype = np.dtype(np.uint16 if real_vocab <= 65536 else np.uint32)
    eos_id, bos_id = tok.token_to_id(EOS), tok.token_to_id(BOS)
    train_ids = encode_docs(tok, train_texts, eos_id, dtype)
    held_ids = encode_docs(tok, [d.text for d in held_docs], eos_id, dtype)

    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tok.save(str(tmp / "tokenizer.json"))
    train_ids.tofile(tmp / "train.bin")
    held_ids.tofile(tmp / "heldout.bin")
    with open(tmp / "heldout_docs.jsonl", "w", encoding="utf-8") as f:
        for d in held_docs:
            f.write(json.dumps({"name": d.name, "text": d.text}, ensure_ascii=False) + "\n")
    meta = {
        "format": FORMAT_VERSION,
        "vocab_size": real_vocab,
        "dtype": dtype.name,
        "train_tokens": int(train_ids.size),
        "heldout_tokens": int(held_ids.size),
        "train_docs": len(train_texts),
        "heldout_docs": len(held_docs),
        "text_bytes": sum(len(d.text.encode()) for d in docs),
        "source": str(source),
        "seed": seed,
        "heldout_fraction": heldout_fraction,
        "max_bytes": max_bytes,
        "bos_id": bos_id,
        "eos_id": eos_id,
        "prepare_s": round(time.monotonic() - t0, 3),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return meta


# --------------------------------------------------------------------------- reading


def read_meta(dataset_dir: str | Path) -> dict[str, Any]:
    path = Path(dataset_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptFileError(f"{path}: missing; run `llmctl data prepare` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path}: not valid JSON ({exc})") from None
    for key in ("vocab_size", "dtype", "train_tokens"):
        if key not in meta:
            raise CorruptFileError(f"{path}: no {key!r}")
    return meta


def load_tokens(dataset_dir: str | Path, split: str = "train") -> np.ndarray:
    """The flat token array of a split, memory-mapped read-only."""
    meta = read_meta(dataset_dir)
    path = Path(dataset_dir) / f"{split}.bin"
    if not path.is_file():
        raise CorruptFileError(f"{path}: missing")
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
