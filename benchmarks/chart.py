"""A PNG of storm wall time against process count, per variant (needs ``sfrtr[plot]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def storm_chart(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Draw ``rows`` of the cross-process benchmark; ``None`` if matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        points = [(r["processes"], r["wall ms"], r["reuse"] + r["failed calls"] > 0)
                  for r in rows if r["variant"] == variant]
        ax.plot([p for p, _, _ in points], [w for _, w, _ in points], marker="o", label=variant)
        for p, w, broken in points:
            if broken:
                ax.annotate("x", (p, w), color="red", ha="center", va="center", fontsize=14)
    ax.set_xlabel("worker processes (50 coroutines x 20 customers each)")
    ax.set_ylabel("storm wall time, ms")
    ax.set_title("Refresh storm after every session expired (red x: failed calls or reuse)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def storm_wait_chart(distributions: dict[str, list[float]], coroutines: int,
                     path: Path) -> Path | None:
    """Caller wait by percentile, per variant, for the one-customer storm (``None``
    without matplotlib). ``distributions[v][i]`` is the wait at percentile ``i / 2``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for variant, waits in distributions.items():
        percentiles = [i / 2 for i in range(len(waits))]
        ax.plot(waits, percentiles, label=variant,
                linestyle="--" if variant.startswith("floor") else "-")
    ax.set_xlabel("caller wait, ms (token endpoint latency 50 ms)")
    ax.set_ylabel("percentile of callers")
    ax.set_title(f"{coroutines:,} coroutines, one expired customer: wait against the floor")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scale_chart(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Start-up time and resident memory of an etcd worker against the customers in
    its namespace, per mirror (``benchmarks.scale`` rows; ``None`` without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (start, memory) = plt.subplots(1, 2, figsize=(9, 3.8))
    for mirror in dict.fromkeys(r["mirror"] for r in rows):
        mine = [r for r in rows if r["mirror"] == mirror]
        sizes = [r["customers"] for r in mine]
        start.plot(sizes, [r["start_to_first_token_s"] for r in mine], marker="o", label=mirror)
        memory.plot(sizes, [r["rss_serving_MiB"] for r in mine], marker="o", label=mirror)
    start.set_ylabel("start to first token, s")
    memory.set_ylabel("resident memory once serving, MiB")
    for ax in (start, memory):
        ax.set_xscale("log")
        ax.set_xlabel("customers in the etcd namespace")
        ax.grid(alpha=0.3)
        ax.legend(title="mirror", fontsize=8)
    fig.suptitle("A fresh worker on a big namespace (real etcd)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
