"""Loss curves from ``metrics.jsonl`` (matplotlib, no screen needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cfmae_cli.formats import software  # noqa: E402


def plot_losses(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Total and per-modality loss against training progress (epochs); below it α_I, α_S (pre-training) or the
    validation top-1 / top-5 accuracy of each epoch (fine-tuning); beside them the k-NN monitor's top-1 when the
    run has ``monitor`` records. Written atomically."""
    steps = [r for r in records if r.get("type") == "step"]
    evals = [r for r in records if r.get("type") == "epoch" and "top1" in r]
    monitor = [r for r in records if r.get("type") == "monitor" and "knn_top1_avg" in r]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if monitor:
        fig = plt.figure(figsize=(13, 6))
        grid = fig.add_gridspec(2, 2, height_ratios=[3, 1], width_ratios=[8, 5])
        ax = fig.add_subplot(grid[0, 0])
        ax2 = fig.add_subplot(grid[1, 0], sharex=ax)
        ax.tick_params(labelbottom=False)
        _plot_knn(fig.add_subplot(grid[:, 1]), monitor)
    else:
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    x = [r["epoch_float"] for r in steps]
    ax.plot(x, [r["loss"] for r in steps], label="total", color="black", lw=2)
    for key in sorted({k for r in steps for k in r if k.startswith("loss_")}):
        ax.plot(x, [r.get(key) for r in steps], label=key.removeprefix("loss_"))
    ax.set_ylabel("loss (masked tokens)" if not evals else "training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if evals:
        for key in ("top1", "top5"):
            ax2.plot([r["epoch"] for r in evals], [r[key] for r in evals], marker=".", label=f"val {key}")
        ax2.set_ylabel("accuracy %")
        ax2.set_ylim(-2, 102)
    else:
        ax2.plot(x, [r.get("alpha_i") for r in steps], label="α_I (instance)")
        ax2.plot(x, [r.get("alpha_s") for r in steps], label="α_S (semantic)")
        ax2.set_ylim(-0.05, 1.05)
    ax2.set_xlabel("epoch")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100, metadata={"Software": software()})
    plt.close(fig)
    tmp.replace(path)
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
