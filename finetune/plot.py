"""The loss curve of a run as a PNG, drawn from its metrics.csv: raw steps, a smoothed line, validation points."""

from __future__ import annotations

import csv
from pathlib import Path


def smoothing_span(n: int) -> int:
    """Steps the moving average spans: a twentieth of the run (1 to 200), so short and long runs both read."""
    return max(1, min(200, n // 20))


def smooth(values: list[float], span: int) -> list[float]:
    """Exponential moving average with ``alpha = 2 / (span + 1)``, debiased at the start (pandas' ``ewm(adjust=True)``).

    The debiasing keeps the first points at the data instead of dragging them toward zero.
    """
    alpha = 2.0 / (span + 1.0)
    out, weighted, weight = [], 0.0, 0.0
    for v in values:
        weighted = (1 - alpha) * weighted + v
        weight = (1 - alpha) * weight + 1.0
        out.append(weighted / weight)
    return out


def plot_metrics(metrics_csv: Path, out_png: Path) -> Path | None:
    """Train loss per step (faint), its moving average, and validation loss where measured. Returns the PNG path (None without data)."""
    if not metrics_csv.is_file():
        return None
    rows = list(csv.DictReader(metrics_csv.open()))
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    steps = [int(r["step"]) for r in rows]
    losses = [float(r["loss"]) for r in rows]
    span = smoothing_span(len(losses))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, losses, label="train loss", linewidth=0.8, alpha=0.3, color="tab:blue")
    if span > 1:
        ax.plot(steps, smooth(losses, span), label=f"train loss, {span}-step moving average", linewidth=2, color="tab:blue")
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="tab:orange", markersize=5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_title(metrics_csv.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
