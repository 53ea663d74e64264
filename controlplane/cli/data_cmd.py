"""`llmctl data`: prepare a corpus into a tokenizer and token shards."""

from __future__ import annotations

from typing import Annotated

import typer

from controlplane.cli.common import ClusterOpt, JsonOpt, emit_json, err, out

app = typer.Typer(help="Prepare training data: tokenizer and token shards.", no_args_is_help=True)


@app.command()
def prepare(
    source: Annotated[
        str, typer.Argument(help="'manpages-ja' (Debian's Japanese manual pages) or a directory of .txt/.jsonl.")
    ] = "manpages-ja",
    out_dir: Annotated[
        str | None, typer.Option("--out", help="Output directory (default <storage>/datasets/<source name>).")
    ] = None,
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Byte-level BPE vocabulary size.")] = 4096,
    heldout_fraction: Annotated[
        float, typer.Option("--heldout-fraction", help="Share of documents held out for evaluation.")
    ] = 0.02,
    seed: Annotated[int, typer.Option("--seed", help="Seed for document order and the held-out split.")] = 0,
    max_mb: Annotated[
        float, typer.Option("--max-mb", help="Cap on the corpus text, MB (keeps preparation fast).")
    ] = 4.0,
    cluster: ClusterOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Train a byte-level BPE tokenizer and write train/held-out token shards."""
    from pathlib import Path

    from controlplane import data
    from controlplane.context import Context
    from controlplane.errors import UserError

    if max_mb <= 0:
        raise UserError(f"--max-mb {max_mb}: expected a positive number")
    if source != data.DEFAULT_SOURCE and not Path(source).expanduser().is_dir():
        raise data.DataSourceError(
            f"{source}: not a directory (give 'manpages-ja' or a directory of .txt/.jsonl files)"
        )
    if out_dir is None:
        name = data.DEFAULT_SOURCE if source == data.DEFAULT_SOURCE else Path(source).expanduser().resolve().name
        target = Context.load(cluster).storage / "datasets" / name
    else:
        target = Path(out_dir).expanduser()
    if not json_out:
        err.print(f"preparing {source} -> {target}")
    meta = data.prepare(
        source,
        target,
        vocab_size=vocab_size,
        heldout_fraction=heldout_fraction,
        seed=seed,
        max_bytes=int(max_mb * 1024 * 1024),
    )
    meta["path"] = str(target.resolve())
    if json_out:
        emit_json(meta)
        return
    out.print(
        f"{meta['path']}: vocab {meta['vocab_size']}, {meta['train_tokens']:,} train tokens "
        f"({meta['train_docs']} docs), {meta['heldout_tokens']:,} held-out tokens ({meta['heldout_docs']} docs), "
        f"{meta['prepare_s']:.1f}s"
    )
