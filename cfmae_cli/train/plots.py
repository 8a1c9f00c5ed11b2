"""Loss curves from ``metrics.jsonl`` (matplotlib, no screen needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cfmae_cli.formats import atomic_write, software  # noqa: E402


FEW = 30  # up to this many points a curve gets markers and no smoothing


def smooth(values: list[float], points: int) -> list[float]:
    """A centred moving average over about 1/20 of the curve (no lag; shorter windows at the ends), drawn over
    the raw values, which stay faint beneath."""
    half = max(1, points // 40)
    out = []
    for i in range(len(values)):
        window = values[max(0, i - half):i + half + 1]
        out.append(sum(window) / len(window))
    return out


def _curve(ax: Any, x: list[float], y: list[float], colour: str, label: str) -> None:
    if len(x) <= FEW:
        ax.plot(x, y, color=colour, marker="o", ms=3, lw=1.5, label=label)
        return
    ax.plot(x, y, color=colour, lw=0.8, alpha=0.3)
    ax.plot(x, smooth(y, len(y)), color=colour, lw=1.8, label=f"{label} (smoothed)")


def _column(rows: list[dict[str, Any]], key: str) -> list[Any]:
    """Each row's ``key``; None (a gap in the line) where a row lacks it."""
    return [r.get(key) for r in rows]


def plot_losses(records: list[dict[str, Any]], path: str | Path) -> Path:
    """The total loss (raw faint, smoothed), each modality's loss on its own scale, the lr, and α_I, α_S
    (pre-training) or the validation top-1 / top-5 of each epoch (fine-tuning), against training progress in
    epochs; beside them the k-NN monitor when the run has ``monitor`` records. Few points get markers (a
    one-epoch run is still a picture). Written atomically, stamped as cfmae's."""
    steps = [r for r in records if r.get("type") == "step"] or \
        [{**r, "epoch_float": float(r["epoch"])} for r in records if r.get("type") == "epoch"]
    evals = [r for r in records if r.get("type") == "epoch" and "top1" in r]
    monitor = [r for r in records if r.get("type") == "monitor" and "knn_top1_avg" in r]
    parts = sorted({k for r in steps for k in r if k.startswith("loss_")})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = max(1, len(parts))
    # rows: the total loss, each part's loss (pre-training only), the lr, the curriculum or the accuracy
    heights = [3] + ([2] if parts else []) + [1.2, 2.2 if evals else 1.2]
    fig = plt.figure(figsize=(4.2 * cols + (4 if monitor else 0) + 1, 1 + 1.1 * sum(heights)),
                     layout="constrained")
    grid = fig.add_gridspec(len(heights), cols + (1 if monitor else 0), height_ratios=heights,
                            width_ratios=[1] * cols + ([0.55 * cols + 0.3] if monitor else []))
    ax = fig.add_subplot(grid[0, :cols])
    x = [r["epoch_float"] for r in steps]
    _curve(ax, x, [r["loss"] for r in steps], "black", "total")
    ax.set_ylabel("loss (masked tokens)" if not evals else "training loss")
    ax.set_title("training loss")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    for j, key in enumerate(parts):
        sub = fig.add_subplot(grid[1, j], sharex=ax)
        values = [(xi, r[key]) for xi, r in zip(x, steps) if r.get(key) is not None]
        _curve(sub, [v[0] for v in values], [v[1] for v in values], f"C{j}", key.removeprefix("loss_"))
        sub.set_title(f"{key.removeprefix('loss_')} loss", fontsize=10)
        sub.grid(alpha=0.3)
    lr = fig.add_subplot(grid[len(heights) - 2, :cols], sharex=ax)
    lr.plot(x, _column(steps, "lr"), color="C7", marker="o" if len(x) <= FEW else None, ms=3)
    lr.set_ylabel("lr")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    lr.grid(alpha=0.3)
    last = fig.add_subplot(grid[len(heights) - 1, :cols], sharex=ax)
    if evals:
        for key in ("top1", "top5"):
            last.plot([r["epoch"] for r in evals], [r[key] for r in evals], marker="o", ms=3, label=f"val {key}")
        last.set_ylabel("accuracy %")
        last.set_ylim(-2, 102)
    else:
        for key, label in (("alpha_i", "α_I (instance-guided)"), ("alpha_s", "α_S (semantic-guided)")):
            last.plot(x, _column(steps, key), marker="o" if len(x) <= FEW else None, ms=3, label=label)
        last.set_ylim(-0.05, 1.05)
        last.set_ylabel("curriculum")
    last.set_xlabel("epoch")
    if all(float(v).is_integer() for v in x):  # one point per epoch: whole epochs on the axis
        last.xaxis.set_major_locator(MaxNLocator(integer=True))
    last.legend(loc="best", fontsize=8)
    last.grid(alpha=0.3)
    if monitor:
        _plot_knn(fig.add_subplot(grid[:, cols]), monitor)
    try:  # a temporary file renamed into place: a reader never sees half a PNG
        atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100, metadata={"Software": software()}),
                     binary=True)
    finally:
        plt.close(fig)
    return path


def _plot_knn(ax: Any, monitor: list[dict[str, Any]]) -> None:
    epochs = [r["epoch"] for r in monitor]
    for pool, style in (("avg", "-"), ("token", "--")):
        ax.plot(epochs, [r[f"knn_top1_{pool}"] for r in monitor], style, marker="o", color="C0",
                label=f"top-1 ({'average pool' if pool == 'avg' else 'global token'})")
        ax.plot(epochs, [r[f"knn_top5_{pool}"] for r in monitor], style, marker=".", color="C1",
                label=f"top-5 ({'average pool' if pool == 'avg' else 'global token'})")
    ax.set_title("k-NN monitor (val)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy %")
    ax.set_ylim(-2, 102)
    ax.legend()
    ax.grid(alpha=0.3)
