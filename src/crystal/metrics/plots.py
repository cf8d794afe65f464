"""Plots of a run's metrics (PNG, written atomically): the loss curve with stage boundaries.

matplotlib is imported here with the Agg backend (files only, no display), and only
modules that draw import this one.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from crystal import fileio  # noqa: E402
from crystal.errors import MetricsError  # noqa: E402
from crystal.metrics.writers import read_jsonl  # noqa: E402


def save_png(fig, path, dpi: int | None = None) -> Path:
    """`fig` as a PNG at `path`, whole or not at all; the figure is closed."""
    path = Path(path)
    with fileio.atomic_open(path) as f:
        fig.savefig(f, format="png", bbox_inches="tight", dpi=dpi)
    plt.close(fig)
    return path


def _is_loss_key(k: str) -> bool:
    return k == "loss" or k.startswith("loss/") or (k.startswith("eval/") and "loss" in k)


def plot_loss(jsonl_path, png_path) -> Path:
    """A loss-curve PNG from metrics.jsonl, stage boundaries (where `stage` changes) marked.

    Left: the training loss and the mean eval loss. Right: eval loss per source, one line
    per data group (per-step per-source training losses are too noisy to read at a glance;
    they stay in the JSONL and TensorBoard). Written to a temp file and renamed."""
    recs = read_jsonl(jsonl_path)
    if not any("loss" in r for r in recs):
        raise MetricsError(f"{jsonl_path}: no 'loss' records to plot")
    keys = {k for r in recs for k in r if _is_loss_key(k)}
    main = [k for k in ("loss", "eval/loss") if k in keys]
    per_source = sorted(k for k in keys if k.startswith("eval/") and k != "eval/loss")
    fig, axes = plt.subplots(1, 2 if per_source else 1, figsize=(13 if per_source else 8, 4.8),
                             dpi=100, squeeze=False)
    for ax, ks in zip(axes[0], (main, per_source)):
        for k in ks:
            pts = [(r["step"], r[k]) for r in recs if k in r and r[k] is not None
                   and math.isfinite(r[k])]
            if pts:
                xs, ys = zip(*pts)
                label = k.removeprefix("eval/").removesuffix("/loss") if ks is per_source else k
                ax.plot(xs, ys, label=label, lw=1.6 if k == "loss" else 0.9,
                        marker="o" if k.startswith("eval/") else None, ms=3)
        prev = None
        for r in recs:
            s = r.get("stage")
            if s is not None and prev is not None and s != prev:
                ax.axvline(r["step"], color="gray", ls="--", lw=0.8)
                ax.annotate(f"stage {s:g}", (r["step"], 1.0),
                            xycoords=("data", "axes fraction"), xytext=(3, -12),
                            textcoords="offset points", fontsize=8, color="gray")
            prev = s if s is not None else prev
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0][0].set_title(f"{Path(jsonl_path).parent.name or 'run'}: training and eval loss")
    axes[0][0].legend(fontsize=8)
    if per_source:
        axes[0][1].set_title("eval loss per source")
        axes[0][1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_png(fig, png_path)
