"""`llmctl data`: prepare corpora into a tokenizer and token shards; show what a dataset holds."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from controlplane.cli.common import ClusterOpt, JsonOpt, emit_json, err, out

app = typer.Typer(help="Prepare training data: tokenizer and token shards.", no_args_is_help=True)

ENGINES = ("auto", "local", "ray")


@app.command()
def prepare(
    sources: Annotated[
        list[str] | None,
        typer.Argument(
            help="'manpages-ja' (Debian's Japanese manual pages), or .txt/.jsonl/.jsonl.gz/.parquet files "
            "or directories of them; several make one dataset with tokens counted per source."
        ),
    ] = None,
    out_dir: Annotated[
        str | None, typer.Option("--out", help="Output directory (default <storage>/datasets/<first source's name>).")
    ] = None,
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Byte-level BPE vocabulary size.")] = 4096,
    tokenizer: Annotated[
        str | None, typer.Option("--tokenizer", help="Use this tokenizer.json instead of training one.")
    ] = None,
    text_field: Annotated[
        str, typer.Option("--text-field", help="The text field of .jsonl / column of .parquet.")
    ] = "text",
    heldout_fraction: Annotated[
        float, typer.Option("--heldout-fraction", help="Share of each source's documents held out for evaluation.")
    ] = 0.02,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the held-out split and the tokenizer sample.")] = 0,
    sample_mb: Annotated[float, typer.Option("--sample-mb", help="Text the tokenizer is trained on, MB.")] = 8.0,
    unit_mb: Annotated[float, typer.Option("--unit-mb", help="Input per shard (one worker's unit), MB.")] = 32.0,
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            help="'ray': Ray Data on the cluster; 'local': this machine; 'auto': Ray when the cluster is up and "
            "the corpus is more than one unit, else this process.",
        ),
    ] = "auto",
    workers: Annotated[
        int | None, typer.Option("--workers", help="Tokenizing workers (default: every CPU of the engine).")
    ] = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="On a resume, re-hash every finished shard (default: check sizes).")
    ] = False,
    cluster: ClusterOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Tokenize corpora into shards with a manifest; a killed prepare resumes where it stopped."""
    import os
    from pathlib import Path

    from controlplane import data
    from controlplane.context import Context
    from controlplane.data.ray_engine import choose_engine
    from controlplane.errors import UserError

    sources = sources or [data.DEFAULT_SOURCE]
    if engine not in ENGINES:
        raise UserError(f"--engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers}: expected at least 1")
    for name, value in (("--sample-mb", sample_mb), ("--unit-mb", unit_mb)):
        if value <= 0:
            raise UserError(f"{name} {value}: expected a positive number")
    if tokenizer is not None and not Path(tokenizer).expanduser().is_file():
        raise UserError(f"--tokenizer {tokenizer}: not a file")
    ctx = Context.load(cluster)
    if out_dir is None:
        first = sources[0]
        name = data.DEFAULT_SOURCE if first == data.DEFAULT_SOURCE else Path(first).expanduser().resolve().name
        target = ctx.storage / "datasets" / name.split(".")[0]
    else:
        target = Path(out_dir).expanduser()
    chosen, address, ray_env = choose_engine(ctx.cluster, engine)
    if not json_out:
        err.print(f"preparing {', '.join(sources)} -> {target} ({_describe(chosen, address)})")
    bar = _Progress(enabled=not json_out)
    with bar:
        meta = data.prepare(
            sources,
            target,
            vocab_size=vocab_size,
            heldout_fraction=heldout_fraction,
            seed=seed,
            text_field=text_field,
            tokenizer=Path(tokenizer).expanduser() if tokenizer else None,
            sample_bytes=int(sample_mb * 1024 * 1024),
            unit_bytes=int(unit_mb * 1024 * 1024),
            engine=chosen,
            min_ray_units=2 if engine == "auto" else 1,
            verify=verify,
            workers=workers or ((os.cpu_count() or 1) if chosen == "local" else 0),
            ray_address=address,
            ray_env=ray_env,
            progress=bar.update,
        )
    meta["path"] = str(target.resolve())
    meta["engine"] = chosen
    if json_out:
        emit_json({k: v for k, v in meta.items() if k != "shards"})
        return
    invalid = f", {meta['invalid_utf8_docs']:,} docs not valid UTF-8 (skipped)" if meta["invalid_utf8_docs"] else ""
    resumed = f", {meta['resumed_units']} of {meta['units']} units kept from before" if meta["resumed_units"] else ""
    out.print(
        f"{meta['path']}: vocab {meta['vocab_size']}, {meta['train_tokens']:,} train tokens "
        f"({meta['train_docs']:,} docs), {meta['heldout_tokens']:,} held-out tokens ({meta['heldout_docs']:,} docs)"
        f"{invalid}, {len(meta['sources'])} source(s), {meta['units']} shard(s){resumed}, {meta['prepare_s']:.1f}s"
    )


def _describe(engine: str, address: str | None) -> str:
    return f"Ray Data on {address}" if engine == "ray" else "in this process"


class _Progress:
    """A live bar over the input bytes: documents, tokens and tokens/s as units finish."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.docs = self.tokens = 0
        self.progress = None
        self.task = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("tokenizing"),
                BarColumn(),
                TextColumn("{task.completed:,.0f}/{task.total:,.0f} B  {task.fields[stats]}"),
                TimeElapsedColumn(),
                console=err,
                transient=False,
            )
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def update(self, event: str, info: dict[str, Any]) -> None:
        if self.progress is None:
            return
        import time

        if event == "plan":
            self.t0 = time.monotonic()
            self.task = self.progress.add_task("prepare", total=max(1, info["bytes"]), stats="")
            return
        shards = info["shards"].values()
        self.docs += sum(s["docs"] for s in shards)
        self.tokens += sum(s["tokens"] for s in shards)
        rate = self.tokens / max(1e-9, time.monotonic() - self.t0)
        stats = f"{self.docs:,} docs  {self.tokens:,} tokens  {rate:,.0f} tokens/s"
        self.progress.update(self.task, advance=info["input_bytes"], stats=stats)


@app.command()
def show(
    dataset: Annotated[
        list[str] | None, typer.Argument(help="Prepared dataset directories (relative: under <storage>).")
    ] = None,
    run_spec: Annotated[
        str | None, typer.Option("--run", help="A run spec: its datasets, weights and token budget.")
    ] = None,
    tokens: Annotated[int | None, typer.Option("--tokens", help="A token budget to compute epochs for.")] = None,
    cluster: ClusterOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Tokens per source and split, and the effective epochs a run's token budget implies."""
    from pathlib import Path

    from controlplane.context import Context
    from controlplane.data.mixture import check_mixture, source_rows
    from controlplane.errors import UserError

    ctx = Context.load(cluster)
    if run_spec is not None:
        from controlplane.spec import RunSpec, load_spec

        if dataset:
            raise UserError("give dataset directories or --run SPEC, not both")
        spec = load_spec(RunSpec, run_spec)
        pairs = [(ctx.dataset_dir(p), w) for p, w in spec.data.datasets()]
        budget = tokens if tokens is not None else spec.train.steps * spec.train.tokens_per_step
    else:
        if not dataset:
            raise UserError("name a dataset directory, or --run SPEC")
        pairs = [(Path(d) if Path(d).is_dir() else ctx.dataset_dir(d), 1.0) for d in dataset]
        budget = tokens
    if tokens is not None and tokens <= 0:
        raise UserError(f"--tokens {tokens}: expected a positive number")
    metas = check_mixture(pairs) if run_spec is not None else [_meta(d) for d, _ in pairs]
    report = []
    for (d, w), meta in zip(pairs, metas, strict=True):
        report.append({"dataset": str(d), "weight": w, "rows": source_rows(meta, w, budget), "meta": meta})
    if json_out:
        emit_json(
            {
                "budget_tokens": budget,
                "datasets": [{"dataset": r["dataset"], "weight": r["weight"], "sources": r["rows"]} for r in report],
            }
        )
        return
    from rich.table import Table

    table = Table(title=f"token budget {budget:,}" if budget else None)
    for col in ("dataset", "weight", "source", "docs", "train tokens", "held-out tokens", "invalid UTF-8", "share"):
        table.add_column(col, justify="left" if col in ("dataset", "source") else "right")
    if budget:
        table.add_column("epochs", justify="right")
    for r in report:
        for row in r["rows"]:
            cells = [
                Path(r["dataset"]).name,
                f"{r['weight']:.3f}",
                row["source"],
                f"{row['docs']:,}",
                f"{row['train_tokens']:,}",
                f"{row['heldout_tokens']:,}",
                f"{row['invalid_utf8_docs']:,}",
                f"{row['share']:.1%}",
            ]
            if budget:
                cells.append(f"{row['epochs']:.2f}")
            table.add_row(*cells)
    out.print(table)
    for r in report:
        m = r["meta"]
        out.print(
            f"{r['dataset']}: vocab {m['vocab_size']} ({m.get('dtype')}), tokenizer {str(m.get('tokenizer_sha256'))[:12]}, "
            f"seed {m.get('seed')}, held-out fraction {m.get('heldout_fraction')}"
        )


def _meta(path: Any) -> dict[str, Any]:
    from controlplane.data import read_meta

    return read_meta(path)
