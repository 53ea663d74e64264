"""Reading a corpus: sources, their work units, and the documents of a unit.

A *source* is what the user names on the command line: `manpages-ja` (Debian's Japanese
manual pages, gzipped roff, stripped to text), a file, or a directory of `.txt` (one document
per file), `.jsonl` / `.jsonl.gz` (one JSON object per line, the text under a named field) and
`.parquet` (a string column of that name) files.

A source is cut into *units*, the pieces one worker tokenizes into one shard: a byte range of
a `.jsonl` file that starts and ends on a line boundary, a whole `.jsonl.gz` (gzip is not
seekable), one Parquet row group, or a group of `.txt`/man files. The cut depends only on the
files and `unit_bytes`, never on the number of workers, so the shards are the same whoever
writes them.

Bad input is one clear line naming the file (and line): an unreadable file, a line that is not
JSON or has no text field, an empty source. A document that is not valid UTF-8 is counted and
skipped; the caller refuses a source where most documents are.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from controlplane.errors import UserError

MANPAGES_JA_DIR = Path("/usr/share/man/ja")
DEFAULT_SOURCE = "manpages-ja"
DEFAULT_TEXT_FIELD = "text"
UNIT_BYTES = 32 * 1024 * 1024
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
_MAN_RE = re.compile(r"\.\d\w*(\.gz)?$")


class DataSourceError(UserError):
    """The corpus cannot be read: a missing or unreadable file, a malformed line, no documents."""


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


# --------------------------------------------------------------------------- sources and units


@dataclass(frozen=True)
class Source:
    name: str  # unique within a prepare: the manifest's key
    spec: str  # what the user wrote
    root: str  # directory the file names are relative to
    files: tuple[str, ...]  # relative, sorted
    skipped: tuple[str, ...]  # files of no known kind


@dataclass(frozen=True)
class Unit:
    """One shard's worth of input (see the module docstring)."""

    index: int
    source: str
    kind: str  # txt | man | jsonl | jsonl.gz | parquet
    root: str
    files: tuple[str, ...]
    start: int = 0  # jsonl: byte offset of the first line; parquet: row group
    end: int = 0  # jsonl: byte offset past the last line
    size: int = 0  # input bytes (for progress)

    def to_json(self) -> dict:
        return {**asdict(self), "files": list(self.files)}

    @classmethod
    def from_json(cls, d: dict) -> Unit:
        return cls(**{**d, "files": tuple(d["files"])})


@dataclass(frozen=True)
class Document:
    key: str  # file, file@byte offset (jsonl) or file:row (parquet); with source and seed: the held-out draw
    text: str


def kind_of(path: Path) -> str | None:
    name = path.name
    for suffix in (".jsonl.gz", ".jsonl", ".txt", ".parquet"):
        if name.endswith(suffix):
            return suffix[1:]
    return None


def resolve_sources(specs: list[str]) -> list[Source]:
    """The named sources with their files, in a stable order; one clear error for a bad name."""
    if not specs:
        raise DataSourceError("no source given (name 'manpages-ja', files or directories)")
    out: list[Source] = []
    names: set[str] = set()
    for spec in specs:
        if spec == DEFAULT_SOURCE:
            if not MANPAGES_JA_DIR.is_dir():
                raise DataSourceError(f"{MANPAGES_JA_DIR}: not found; install Debian's manpages-ja or give a directory")
            files = sorted(str(p.relative_to(MANPAGES_JA_DIR)) for p in MANPAGES_JA_DIR.rglob("*") if _is_man(p))
            src = Source(DEFAULT_SOURCE, spec, str(MANPAGES_JA_DIR), tuple(files), ())
        else:
            path = Path(spec).expanduser()
            if path.is_file():
                if kind_of(path) is None:
                    raise DataSourceError(f"{spec}: not a .txt, .jsonl, .jsonl.gz or .parquet file")
                src = Source(path.name, spec, str(path.parent.resolve()), (path.name,), ())
            elif path.is_dir():
                found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
                rel = [str(p.relative_to(path)) for p in found]
                known = tuple(r for r, p in zip(rel, found, strict=True) if kind_of(p))
                skipped = tuple(r for r, p in zip(rel, found, strict=True) if not kind_of(p))
                src = Source(path.resolve().name, spec, str(path.resolve()), known, skipped)
            elif path.exists():
                raise DataSourceError(f"{spec}: not a regular file or directory")
            else:
                raise DataSourceError(
                    f"{spec}: not found (give 'manpages-ja', or .txt/.jsonl/.jsonl.gz/.parquet files or directories)"
                )
        if not src.files:
            extra = f"; skipped {len(src.skipped)} file(s) of other kinds, e.g. {src.skipped[0]}" if src.skipped else ""
            raise DataSourceError(f"{spec}: no .txt, .jsonl, .jsonl.gz or .parquet files{extra}")
        name, k = src.name, 2
        while name in names:
            name, k = f"{src.name}-{k}", k + 1
        names.add(name)
        out.append(Source(name, src.spec, src.root, src.files, src.skipped))
    return out


def _is_man(p: Path) -> bool:
    return p.is_file() and bool(_MAN_RE.search(p.name))


def plan_units(sources: list[Source], text_field: str, unit_bytes: int = UNIT_BYTES) -> list[Unit]:
    """Cut every source into units. Pure in the file contents and `unit_bytes`."""
    units: list[Unit] = []

    def add(**kw) -> None:
        units.append(Unit(index=len(units), **kw))

    for src in sources:
        root = Path(src.root)
        small_kind = "man" if src.name == DEFAULT_SOURCE and src.spec == DEFAULT_SOURCE else "txt"
        group: list[str] = []
        group_size = 0
        for rel in src.files:
            path = root / rel
            size = _size(path)
            kind = small_kind if small_kind == "man" else kind_of(path)
            if kind in ("txt", "man"):
                if group and group_size + size > unit_bytes:
                    add(source=src.name, kind=small_kind, root=src.root, files=tuple(group), size=group_size)
                    group, group_size = [], 0
                group.append(rel)
                group_size += size
            elif kind == "jsonl":
                for start, end in _line_ranges(path, unit_bytes):
                    add(source=src.name, kind=kind, root=src.root, files=(rel,), start=start, end=end,
                        size=end - start)  # fmt: skip
            elif kind == "jsonl.gz":
                add(source=src.name, kind=kind, root=src.root, files=(rel,), size=size)
            elif kind == "parquet":
                groups = _parquet_row_groups(path, text_field)
                for g in range(groups):
                    add(source=src.name, kind=kind, root=src.root, files=(rel,), start=g, size=size // max(1, groups))
        if group:
            add(source=src.name, kind=small_kind, root=src.root, files=tuple(group), size=group_size)
    return units


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise DataSourceError(f"{path}: cannot read ({exc.strerror})") from None


def _open_binary(path: Path):
    try:
        return open(path, "rb")
    except OSError as exc:
        raise DataSourceError(f"{path}: cannot read ({exc.strerror})") from None


def _line_ranges(path: Path, unit_bytes: int) -> Iterator[tuple[int, int]]:
    """(start, end) of consecutive pieces of about `unit_bytes`, each cut just after a newline.

    Reads only the line at each cut, never the file: planning costs O(units), not O(bytes)."""
    size = _size(path)
    start = 0
    with _open_binary(path) as f:
        while start < size:
            end = start + unit_bytes
            if end >= size:
                end = size
            else:
                f.seek(end)
                end = min(size, end + len(f.readline()))
            yield start, end
            start = end


def _line_number(path: Path, offset: int) -> int:
    """1-based number of the line starting at byte `offset` (counted only to report an error)."""
    n = 1
    with _open_binary(path) as f:
        left = offset
        while left > 0 and (chunk := f.read(min(1 << 22, left))):
            n += chunk.count(b"\n")
            left -= len(chunk)
    return n


def _parquet_row_groups(path: Path, text_field: str) -> int:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        from controlplane.errors import MissingDependencyError

        raise MissingDependencyError("reading .parquet needs pyarrow: pip install 'ray[data]'") from None
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataSourceError(f"{path}: not a readable Parquet file ({exc})") from None
    if text_field not in pf.schema_arrow.names:
        raise DataSourceError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    return pf.num_row_groups


# --------------------------------------------------------------------------- documents of a unit


@dataclass
class ReadStats:
    docs: int = 0
    invalid_utf8: int = 0  # documents skipped
    empty: int = 0  # documents with no text after stripping


def iter_unit(unit: Unit, text_field: str, stats: ReadStats) -> Iterator[Document]:
    """The documents of a unit in file order; invalid UTF-8 is counted in `stats` and skipped."""
    root = Path(unit.root)
    if unit.kind in ("txt", "man"):
        for rel in unit.files:
            path = root / rel
            with _open_binary(path) as f:
                raw = f.read()
            if unit.kind == "man":
                text = roff_to_text(_decode_man(gzip.decompress(raw) if path.suffix == ".gz" else raw))
            else:
                text = _decode(raw, stats)
                if text is None:
                    continue
            yield from _doc(rel, text, stats)
    elif unit.kind in ("jsonl", "jsonl.gz"):
        path = root / unit.files[0]
        yield from _iter_jsonl(path, unit, text_field, stats)
    elif unit.kind == "parquet":
        import pyarrow.parquet as pq

        path = root / unit.files[0]
        table = pq.ParquetFile(path).read_row_group(unit.start, columns=[text_field])
        first = sum(pq.ParquetFile(path).metadata.row_group(g).num_rows for g in range(unit.start))
        for i, value in enumerate(table.column(0).to_pylist()):
            if value is None:
                stats.empty += 1
                continue
            if not isinstance(value, str):
                raise DataSourceError(f"{path}: row {first + i}: column {text_field!r} is not a string")
            yield from _doc(f"{unit.files[0]}:{first + i}", value, stats)
    else:  # pragma: no cover - plan_units makes only the kinds above
        raise ValueError(f"unknown unit kind {unit.kind!r}")


def _iter_jsonl(path: Path, unit: Unit, text_field: str, stats: ReadStats) -> Iterator[Document]:
    """Documents keyed by file and byte offset (a cut never changes a key); errors name the line."""
    try:
        gz = unit.kind == "jsonl.gz"
        with gzip.open(path, "rb") if gz else _open_binary(path) as f:
            start = 0 if gz else unit.start
            pos = start
            for i, raw in enumerate(_lines(f, start, None if gz else unit.end)):
                offset, pos = pos, pos + len(raw)
                if not raw.strip():
                    continue
                line = _decode(raw, stats)
                if line is None:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataSourceError(f"{_where(path, start, offset, i)}: not valid JSON ({exc.msg})") from None
                text = rec.get(text_field) if isinstance(rec, dict) else None
                if not isinstance(text, str):
                    raise DataSourceError(
                        f"{_where(path, start, offset, i)}: no string field {text_field!r} (set --text-field)"
                    )
                yield from _doc(f"{unit.files[0]}@{offset}", text, stats)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataSourceError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None


def _where(path: Path, start: int, offset: int, i: int) -> str:
    return f"{path}:{i + 1 if start == 0 else _line_number(path, offset)}"


def _lines(f, start: int, end: int | None) -> Iterator[bytes]:
    f.seek(start)
    pos = start
    for raw in f:
        if end is not None and pos >= end:
            return
        pos += len(raw)
        yield raw


def _doc(key: str, text: str, stats: ReadStats) -> Iterator[Document]:
    text = text.strip()
    if not text:
        stats.empty += 1
        return
    stats.docs += 1
    yield Document(key, text)


def _decode(raw: bytes, stats: ReadStats) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8 += 1
        return None


def _decode_man(raw: bytes) -> str:
    for enc in ("utf-8", "euc-jp"):
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            continue
    return raw.decode("utf-8", errors="replace")


def heldout_draw(seed: int, source: str, key: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, source, document key): held out when < fraction."""
    h = hashlib.blake2b(f"{seed}\x00{source}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64
