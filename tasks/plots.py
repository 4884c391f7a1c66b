"""Plots people would rather look at than read: the expert activation heatmap (2404 Fig. 1) and
loss curves from Lightning's CSV logs. matplotlib runs headless (Agg)."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Union

import numpy as np

PathLike = Union[str, os.PathLike]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def activation_heatmap(
    ratios: Mapping[str, np.ndarray],
    out_path: PathLike,
    threshold: float = 0.01,
    title: Optional[str] = None,
) -> Path:
    """Rows = MoE layers (``"<block>.<way>"``), columns = experts, colour = activation ratio
    (selections / tokens). Each row is labelled with the share of experts above ``threshold``.

    Rows may hold different expert counts (then shorter rows are blank on the right)."""
    if not ratios:
        raise ValueError("activation_heatmap: no MoE layer statistics (is the model dense?)")
    keys = list(ratios)
    width = max(len(ratios[k]) for k in keys)
    grid = np.full((len(keys), width), np.nan)
    for i, k in enumerate(keys):
        grid[i, : len(ratios[k])] = ratios[k]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(min(18, 2 + 0.25 * width), 1.2 + 0.45 * len(keys)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    labels = [f"{k}  ({100 * float(np.mean(np.asarray(ratios[k]) > threshold)):.0f}% active)" for k in keys]
    ax.set_yticks(range(len(keys)), labels, fontsize=8)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer (block.way)")
    ax.set_title(title or f"Expert activation ratio (selections / tokens; active if > {threshold:g})")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def read_csv_metrics(path: PathLike) -> Dict[str, Sequence[float]]:
    """Lightning CSVLogger ``metrics.csv`` -> {column: values} (rows without the column skipped;
    ``step`` values are kept per column under ``<column>@step``)."""
    cols: Dict[str, list] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k in ("step", "epoch") or v in ("", None):
                    continue
                try:
                    cols.setdefault(k, []).append(float(v))
                    cols.setdefault(f"{k}@step", []).append(float(row.get("step") or 0))
                except ValueError:
                    continue
    return cols


def loss_curves(metrics_csv: Mapping[str, PathLike], keys: Sequence[str], out_path: PathLike, title: str = "") -> Path:
    """One panel per metric key, one line per run (``{run name: metrics.csv}``)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False)
    for run, path in metrics_csv.items():
        cols = read_csv_metrics(path)
        for ax, key in zip(axes[0], keys):
            if key in cols:
                ax.plot(cols[f"{key}@step"], cols[key], label=run)
    for ax, key in zip(axes[0], keys):
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
