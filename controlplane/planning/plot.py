"""Pictures of a simulation: goodput vs checkpoint interval, and one simulated month.

matplotlib with the Agg backend (no display needed), imported only when a plot is asked for.
"""

from __future__ import annotations

from pathlib import Path


def draw(path: Path, scenario, summary, first, curve) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = scenario.config
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 8.5), gridspec_kw={"height_ratios": [1, 1.2]})

    # ---- goodput vs interval
    if curve:
        xs = [s.interval_s / 60 for s in curve]
        ys = [100 * s.goodput_mean for s in curve]
        es = [100 * 1.96 * s.goodput_sem for s in curve]
        ax1.errorbar(
            xs, ys, yerr=es, marker="o", ms=4, capsize=3, label=f"simulated mean ({summary.seeds} seeds, 95% CI)"
        )
        yd = scenario.young_daly_steps * cfg.step_s / 60
        ax1.axvline(yd, color="tab:red", ls="--", label=f"Young/Daly {yd:.1f} min")
        best = max(curve, key=lambda s: s.goodput_mean)
        ax1.plot([best.interval_s / 60], [100 * best.goodput_mean], "k*", ms=12, label="best simulated")
        ax1.set_xscale("log")
        ax1.legend(loc="lower center")
    ax1.set_xlabel("checkpoint interval (minutes of compute)")
    ax1.set_ylabel("goodput (ETTR), %")
    ax1.set_title(
        f"Goodput vs checkpoint interval: {cfg.gpus} GPUs, MTBF {summary.cluster_mtbf_hours:.1f} h, "
        f"stall {cfg.stall_s:.1f} s, restart {_duration(cfg.restart_s)}"
    )
    ax1.grid(True, which="both", alpha=0.3)

    # ---- one simulated run: work done vs wall time, failures marked by cause
    xs, ys = [0.0], [0.0]
    fails = []
    for t, what, cause, work in first.timeline:
        day, frac = t / 86400, 100 * work / cfg.work_s
        if what == "start":
            xs.append(day)
            ys.append(frac)
        elif what in ("failure", "finish", "horizon", "gave up"):
            xs.append(day)
            ys.append(frac)
            if what == "failure":
                fails.append((day, frac, cause))
    ax2.plot(xs, ys, color="tab:green", lw=1.5, label="work done (durable at each restart)")
    causes = sorted({c for _, _, c in fails})
    cmap = plt.get_cmap("tab20")
    for i, cause in enumerate(causes):
        pts = [(d, f) for d, f, c in fails if c == cause]
        ax2.scatter([d for d, _ in pts], [f for _, f in pts], color=cmap(i % 20), s=30, zorder=3, label=cause)
    # wall time each failure cost (lost work + detection + restart), accumulated, on a second axis
    lost_x, lost_y, total = [0.0], [0.0], 0.0
    tl = first.timeline
    for i, (t, what, _cause, work) in enumerate(tl):
        if what != "failure":
            continue
        nxt = next((e for e in tl[i + 1 :] if e[1] in ("start", "gave up", "horizon")), None)
        if nxt is None:
            continue
        lost_x += [t / 86400, t / 86400]
        lost_y += [total, total]
        total += (nxt[0] - t) + max(0.0, work - nxt[3])
        lost_x.append(nxt[0] / 86400)
        lost_y.append(total)
    lost_x.append(xs[-1])
    lost_y.append(total)
    ax3 = ax2.twinx()
    ax3.plot(lost_x, [y / 3600 for y in lost_y], color="tab:red", lw=1.2, drawstyle="default")
    ax3.set_ylabel("wall-clock hours lost to failures (cumulative)", color="tab:red")
    ax3.tick_params(axis="y", colors="tab:red")
    ax3.set_ylim(bottom=0)
    ax2.axhline(100, color="grey", lw=0.8, ls=":")
    ax2.set_xlabel("wall-clock days")
    ax2.set_ylabel("% of the run's work")
    ax2.set_title(
        f"One simulated run (seed 0): {first.failures} failures, goodput {100 * first.goodput:.2f}%"
        + (f", policy gave up: {first.gave_up[:60]}" if first.gave_up else "")
    )
    ax2.legend(loc="upper left", fontsize=7, ncol=2)
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _duration(seconds: float) -> str:
    """Seconds under two minutes, else minutes (a 10 s restart is not '0 min')."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
