"""Render a run's key panels (power, energy, loss, goodput) as PNG plots from Prometheus data.

For reports and for places without Grafana. Reads through the Prometheus HTTP API and
draws with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from controlplane.errors import NotFoundError, RetryableError, UserError
from controlplane.observability.query import PromClient, Series

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class SnapshotPanel:
    key: str
    title: str
    expr: str  # with RUN for the run id
    ylabel: str
    scale: float = 1.0
    cumulative_from_start: bool = False  # plot value minus its first value (energy used so far)


PANELS = (
    SnapshotPanel("power", "GPU power", 'sum(llmctl_gpu_power_watts{run_id="RUN"})', "kW", scale=1e-3),
    SnapshotPanel(
        "energy",
        "GPU energy used",
        'sum(llmctl_gpu_energy_joules_total{run_id="RUN"})',
        "kWh",
        scale=1 / 3.6e6,
        cumulative_from_start=True,
    ),
    SnapshotPanel("loss", "Training loss", 'llmctl_train_loss{run_id="RUN"}', "loss"),
    SnapshotPanel("goodput", "Goodput", 'llmctl_train_goodput_ratio{run_id="RUN"}', "productive / wall time"),
)


@dataclass(frozen=True)
class SnapshotResult:
    files: list[Path]
    empty: list[str]  # panels with no data in the range


def _series_for(prom: PromClient, panel: SnapshotPanel, run_id: str, start: float, end: float) -> list[Series]:
    step = max(1.0, (end - start) / 400)
    return prom.query_range(panel.expr.replace("RUN", run_id), start, end, step)


def _draw(ax, panel: SnapshotPanel, series: list[Series], t0: float, div: float) -> None:
    for s in series:
        pts = [(t, v) for t, v in s.points if v == v]  # drop NaN
        if not pts:
            continue
        base = pts[0][1] if panel.cumulative_from_start else 0.0
        xs = [(t - t0) / div for t, _ in pts]
        ys = [(v - base) * panel.scale for _, v in pts]
        label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("__name__", "job", "instance"))
        ax.plot(xs, ys, linewidth=1.4, label=label or None)
    ax.set_title(panel.title)
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    if panel.key == "goodput":
        ax.set_ylim(0, 1.05)
    if any(s.labels for s in series) and len(series) > 1:
        ax.legend(fontsize=7)


def time_unit(span_s: float) -> tuple[str, float]:
    """One unit for a whole time axis, by its span: (name, seconds per unit)."""
    for name, div, upto in (("s", 1.0, 120), ("min", 60.0, 2 * 3600), ("h", 3600.0, 2 * 86400)):
        if span_s <= upto:
            return name, div
    return "days", 86400.0


def snapshot(
    prom_url: str, run_id: str, out_dir: Path, since_s: float = 6 * 3600, end: float | None = None
) -> SnapshotResult:
    if not _RUN_ID.match(run_id):
        raise UserError(f"run id {run_id!r}: expected letters, digits, '.', '_' or '-'")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prom = PromClient(prom_url)
    end = end or time.time()
    start = end - since_s
    try:
        data = {p.key: _series_for(prom, p, run_id, start, end) for p in PANELS}
        first = min((s.points[0][0] for series in data.values() for s in series if s.points), default=None)
        if first is not None and end - first < 0.5 * (end - start):  # a short run: zoom in, finer steps
            start = max(start, first - 1.0)
            data = {p.key: _series_for(prom, p, run_id, start, end) for p in PANELS}
    except RetryableError:
        raise UserError(
            f"Prometheus at {prom_url} does not answer: start it, or give its URL with --prometheus "
            "(or $LLMCTL_PROMETHEUS_URL)"
        ) from None
    present = [p for p in PANELS if any(s.points for s in data[p.key])]
    if not present:
        raise NotFoundError(
            f"run {run_id}: Prometheus at {prom_url} has no data for it in the last {since_s / 3600:g}h"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    stamp = datetime.fromtimestamp(end, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")
    t0 = min(s.points[0][0] for series in data.values() for s in series if s.points)
    unit, div = time_unit(end - t0)
    xlabel = f"{unit} since {datetime.fromtimestamp(t0, tz=UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}"
    for p in present:
        fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
        _draw(ax, p, data[p.key], t0, div)
        ax.set_xlabel(xlabel)
        fig.suptitle(f"{run_id} - {p.title}", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{run_id}-{p.key}.png"
        fig.savefig(path)
        plt.close(fig)
        files.append(path)
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), dpi=110)
    for ax, p in zip(axes.flat, PANELS, strict=True):
        if p in present:
            _draw(ax, p, data[p.key], t0, div)
            ax.set_xlabel(xlabel)
        else:
            ax.set_title(p.title)
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.suptitle(f"run {run_id} ({stamp})")
    fig.tight_layout()
    overview = out_dir / f"{run_id}-overview.png"
    fig.savefig(overview)
    plt.close(fig)
    files.append(overview)
    return SnapshotResult(files, [p.key for p in PANELS if p not in present])
