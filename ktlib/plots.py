"""Figures: every function returns a matplotlib Figure; notebooks save them with :func:`save_figure`.

One place sets the look (:func:`set_theme`).  Figures drawn from simulated data carry "synthetic" in their title
(pass ``data.kind`` or a label that says so).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from .specs import EMOTIONS, MODALITIES, MODALITY_NAMES

COLORS = {"l": "#4C72B0", "a": "#DD8452", "v": "#55A868", "a_hat": "#C44E52", "fusion": "#8172B3"}


def set_theme() -> None:
    """The workbook's one look: seaborn's whitegrid theme, a readable font size, tight layouts."""
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.95)
    plt.rcParams.update({"figure.dpi": 110, "savefig.bbox": "tight", "figure.autolayout": False})


def save_figure(fig, name: str, folder: str | Path = "figures") -> list[Path]:
    """Save ``fig`` as ``folder/name.png`` and ``.pdf``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    for path in paths:
        fig.savefig(path)
    return paths


def pipeline_figure():
    """The paper's idea in one picture (its Fig. 1, redrawn): V and L reconstruct the missing audio, then fuse."""
    fig, ax = plt.subplots(figsize=(10, 4.2))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 4.2)
    ax.axis("off")

    def box(x, y, w, h, text, color, style="round,pad=0.05"):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, fc=color, ec="black", lw=1, alpha=0.9))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9, color="white", weight="bold")

    def arrow(x0, y0, x1, y1, dashed=False):
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=12, lw=1.2,
                                     ls="--" if dashed else "-", color="black"))

    box(0.1, 3.1, 1.6, 0.7, "vision V", COLORS["v"])
    box(0.1, 1.9, 1.6, 0.7, "language L", COLORS["l"])
    box(0.1, 0.5, 1.6, 0.7, "audio A\n(train only)", COLORS["a"])
    box(2.3, 3.1, 1.4, 0.7, "f_V", COLORS["v"])
    box(2.3, 1.9, 1.4, 0.7, "f_L", COLORS["l"])
    box(2.3, 0.5, 1.4, 0.7, "f_A", COLORS["a"])
    box(4.3, 3.1, 1.5, 0.7, "θ: V→A", COLORS["a_hat"])
    box(4.3, 1.9, 1.5, 0.7, "φ: L→A", COLORS["a_hat"])
    box(6.3, 2.5, 1.4, 0.7, "δ → f'_A", COLORS["a_hat"])
    box(8.2, 1.6, 1.7, 1.4, "cross-modal\nattention\n(L, V, A')\n→ sentiment", COLORS["fusion"])
    for y in (3.45, 2.25, 0.85):
        arrow(1.7, y, 2.3, y)
    arrow(3.7, 3.45, 4.3, 3.45)
    arrow(3.7, 2.25, 4.3, 2.25)
    arrow(5.8, 3.45, 6.3, 3.0)
    arrow(5.8, 2.25, 6.3, 2.7)
    arrow(7.7, 2.85, 8.2, 2.5)
    arrow(3.7, 3.3, 8.2, 2.9)
    arrow(3.7, 2.1, 8.2, 2.0)
    arrow(3.7, 0.85, 5.05, 1.85, dashed=True)
    arrow(3.7, 0.75, 5.05, 3.05, dashed=True)
    ax.text(4.6, 0.55, "consistency loss l_c(θ(f_V), f_A), l_c(φ(f_L), f_A)\n(training only: audio is missing at test)",
            fontsize=8, style="italic")
    ax.set_title("Knowledge transfer for a missing audio modality (after Liu, Zhan, Chen, arXiv 2401.10747)")
    return fig


def label_distribution(data):
    """Histograms of the labels per split (regression), or the share of each emotion (IEMOCAP)."""
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(7, 3.2))
    if data.task == "classification":
        shares = np.array([d.labels[:, :, 1].mean(0) for d in data.splits.values()])  # (splits, 4)
        width = 0.8 / len(shares)
        for i, (split, row) in enumerate(zip(data.splits, shares, strict=True)):
            ax.bar(np.arange(len(EMOTIONS)) + i * width, row, width, label=split)
        ax.set_xticks(np.arange(len(EMOTIONS)) + 0.4 - width / 2, EMOTIONS)
        ax.set_ylabel("share of utterances with the emotion")
    else:
        for split, d in data.splits.items():
            sns.histplot(d.labels.reshape(-1), bins=np.arange(-3.1, 3.2, 0.2), stat="density", element="step",
                         fill=False, ax=ax, label=split)
        ax.set_xlabel("sentiment label")
    ax.legend()
    ax.set_title(f"Labels of {data.layout.name} [{data.kind}]")
    return fig


def sample_streams(data, split: str = "test", index: int = 0, dims: int = 3):
    """One utterance's three streams over time (first ``dims`` feature dimensions), padding shaded."""
    d = data[split]
    fig, axes = plt.subplots(3, 1, figsize=(8, 5.5), sharex=False)
    for ax, m in zip(axes, MODALITIES, strict=True):
        x = d.features(m)[index]  # (T, D)
        real = (x != 0).any(-1)
        if (~real).any():
            ax.axvspan(-0.5, (~real).sum() - 0.5, color="0.9", label="padding")
        for j in range(min(dims, x.shape[1])):
            ax.plot(np.arange(len(x)), x[:, j], lw=1, color=COLORS[m], alpha=1 - 0.25 * j)
        ax.set_ylabel(MODALITY_NAMES[m])
        ax.set_xlim(-0.5, len(x) - 0.5)
    axes[-1].set_xlabel("time step (front-padded)")
    label = d.labels[index].reshape(-1)
    shown = f"{label[0]:+.2f}" if data.task == "regression" else ", ".join(
        e for e, yes in zip(EMOTIONS, d.labels[index][:, 1], strict=True) if yes)
    fig.suptitle(f"{d.ids[index]}: label {shown} [{data.kind}]")
    fig.tight_layout()
    return fig


def attention_heatmap(weights, title: str, query_label: str, key_label: str):
    """Mean attention over heads of one sample: weights (H, T, S) or (T, S)."""
    w = np.asarray(weights.detach().cpu() if hasattr(weights, "detach") else weights)
    if w.ndim == 3:
        w = w.mean(0)
    fig, ax = plt.subplots(figsize=(6, 4))
    im = ax.imshow(w, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="attention weight")
    ax.set_xlabel(f"{key_label} step (keys)")
    ax.set_ylabel(f"{query_label} step (queries)")
    ax.set_title(title)
    return fig


def parameter_counts(counts: dict[str, int], title: str):
    """Horizontal bars of parameters per setting."""
    fig, ax = plt.subplots(figsize=(6, 2.8))
    names = list(counts)
    ax.barh(names, [counts[n] / 1e3 for n in names], color=COLORS["fusion"])
    for i, n in enumerate(names):
        ax.text(counts[n] / 1e3, i, f" {counts[n]:,}", va="center", fontsize=8)
    ax.set_xlabel("parameters (thousands)")
    ax.set_title(title)
    return fig
