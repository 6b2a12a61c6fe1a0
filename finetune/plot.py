"""The loss curve of a run as a PNG, drawn from its metrics.csv."""

from __future__ import annotations

import csv
from pathlib import Path


def plot_metrics(metrics_csv: Path, out_png: Path) -> Path | None:
    """Train loss per step, and validation loss where measured. Returns the PNG path (None without data)."""
    if not metrics_csv.is_file():
        return None
    rows = list(csv.DictReader(metrics_csv.open()))
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, [float(r["loss"]) for r in rows], label="train loss", linewidth=1, alpha=0.8)
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_title(metrics_csv.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
