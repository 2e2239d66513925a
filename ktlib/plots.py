"""Figures: every function returns a matplotlib Figure; notebooks save them with :func:`save_figure`.

One place sets the look (:func:`set_theme`).  Figures drawn from simulated data carry "synthetic" in their title
(pass ``data.kind`` or a label that says so).  Spreads over seeds are the sample std of :mod:`ktlib.stats`; a
paired comparison is drawn with its 95 % Student-t interval and coloured by its verdict.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from .specs import EMOTIONS, MODALITIES, MODALITY_NAMES
from .stats import seed_table

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


# ----------------------------------------------------------------------------------------------------------------
# Training, ablations and results (tidy tables from ktlib.runs)

SETTING_COLORS = {"full": "#8172B3", "vision_only": COLORS["v"], "language_only": COLORS["l"],
                  "language_vision": "#937860", "kt": COLORS["a_hat"]}
METRIC_NAMES = {"mae": "MAE (lower is better)", "corr": "Corr", "acc2_non0": "Acc2 (non-0)", "f1_non0": "F1 (non-0)",
                "acc7": "Acc7", "mean_acc": "mean accuracy", "mean_f1": "mean weighted F1"}


def learning_curves(histories: dict[str, list], title: str, metric: str = "valid_mae"):
    """Training loss and a validation metric per epoch: ``histories`` maps a setting to one DataFrame per seed
    (mean line, one thin line per seed)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for setting, frames in histories.items():
        color = SETTING_COLORS.get(setting)
        for ax, column in zip(axes, ("train_task", metric), strict=True):
            for h in frames:
                ax.plot(h["epoch"] + 1, h[column], color=color, lw=0.6, alpha=0.35)
            mean = np.mean([h[column].to_numpy() for h in frames if len(h) == len(frames[0])], axis=0)
            ax.plot(np.arange(1, len(mean) + 1), mean, color=color, lw=2, label=setting)
    axes[0].set(xlabel="epoch", ylabel="training task loss", title="training")
    axes[1].set(xlabel="epoch", ylabel=metric.replace("_", " "), title="validation (no audio unless full)")
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def metric_bars(tidy, metrics, title: str, by: str = "setting", paper: dict | None = None, order=None):
    """One panel per metric: the mean over seeds as a bar, each seed as a dot, the paper's number as a black
    diamond when ``paper`` (``{(group, metric): value}`` in the same units) has it."""
    test = tidy[tidy["split"] == "test"]
    order = list(order) if order is not None else list(dict.fromkeys(test[by]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.3 * len(metrics), 3.9), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        cell = test[test["metric"] == metric]
        xs = np.arange(len(order))
        means = [cell[cell[by] == g]["value"].mean() for g in order]
        colors = [SETTING_COLORS.get(g, "#7f7f7f") for g in order]
        ax.bar(xs, means, color=colors, alpha=0.75)
        for x, g in zip(xs, order, strict=True):
            vals = cell[cell[by] == g]["value"].to_numpy()
            ax.scatter(np.full(len(vals), x) + np.linspace(-0.12, 0.12, len(vals)), vals, s=12, color="black",
                       zorder=3)
            if paper and (g, metric) in paper and np.isfinite(paper[(g, metric)]):
                ax.scatter([x], [paper[(g, metric)]], marker="D", s=40, color="black", facecolor="white",
                           zorder=4, label="paper" if x == 0 else None)
        ax.set_xticks(xs, order, rotation=35, ha="right", fontsize=8)
        ax.set_title(METRIC_NAMES.get(metric, metric), fontsize=10)
        finite = [v for v in means if np.isfinite(v)]
        if finite and metric != "mae":
            ax.set_ylim(min(finite) * 0.9, None)
    if paper:
        axes[0][0].legend(fontsize=8, loc="lower left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def interval_forest(table, title: str):
    """Paired gains with their 95 % intervals (``ktlib.experiments.paired_table``), one panel per metric: a row per
    cell and comparison, coloured by verdict; positive means the first method is better."""
    metrics = list(dict.fromkeys(table["metric"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 0.32 * len(table) / len(metrics) + 1.6),
                             squeeze=False, sharey=True)
    for ax, metric in zip(axes[0], metrics, strict=True):
        part = table[table["metric"] == metric].reset_index(drop=True)
        ys = np.arange(len(part))[::-1]
        for y, row in zip(ys, part.itertuples(), strict=True):
            color = VERDICT_COLORS.get(row.verdict, "#7f7f7f")
            if np.isfinite(row.low):
                ax.plot([row.low, row.high], [y, y], color=color, lw=2)
            ax.scatter([row.gain], [y], color=color, s=18, zorder=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(ys, [f"{r.cell}: {r.method} vs {r.versus}" for r in part.itertuples()], fontsize=7)
        ax.set_title(f"{METRIC_NAMES.get(metric, metric)} (gain, 95 % interval)", fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def r2_curve(table, knob: str, title: str, truth: str = "label-relevant"):
    """Held-out R^2 of the probes (``ktlib.analysis.reconstruction_r2``) to one ground-truth part against a knob:
    a line per representation, seeds as points (synthetic data)."""
    part = table[table["truth"] == truth]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, (name, group) in enumerate(part.groupby("representation", sort=False)):
        mean = group.groupby(knob)["R2"].mean()
        ax.plot(mean.index, mean.to_numpy(), "-o", label=name, color=plt.cm.tab10(i))
        ax.scatter(group[knob], group["R2"], s=8, alpha=0.5, color=plt.cm.tab10(i))
    ax.axhline(0, color="black", lw=0.8)
    ax.set(xlabel=f"{knob} (simulator)", ylabel=f"held-out R² to the {truth} signal", title=title)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


VERDICT_COLORS = {"supported": "#55A868", "opposite": "#C44E52", "undecided": "#7f7f7f",
                  "undecided (1 seed)": "#bbbbbb", "not run": "#eeeeee"}


def _interval_err(means, lows, highs) -> np.ndarray:
    """Asymmetric error bars (2, n) from a 95 % interval; 0 where it is undefined (one seed)."""
    means, lows, highs = (np.asarray(x, dtype=float) for x in (means, lows, highs))
    return np.nan_to_num(np.vstack([means - lows, highs - means]), nan=0.0)


def paired_comparison_figure(diffs, title: str):
    """kt minus language+vision per seed (signed: positive = kt better), one panel per metric: each seed a dot,
    the mean difference a diamond with its 95 % Student-t interval (:func:`ktlib.experiments.paired_comparison`)."""
    fig, axes = plt.subplots(1, len(diffs), figsize=(2.6 * len(diffs), 3.3), squeeze=False)
    for ax, (_, row) in zip(axes[0], diffs.iterrows(), strict=True):
        vals = np.asarray(row["differences"], dtype=float)
        ax.axhline(0, color="black", lw=0.8)
        ax.scatter(np.zeros(len(vals)) + np.linspace(-0.05, 0.05, len(vals)), vals, color=COLORS["a_hat"], s=20)
        err = _interval_err([row["mean_diff"]], [row["ci_low"]], [row["ci_high"]])
        ax.errorbar([0.25], [row["mean_diff"]], yerr=err, fmt="D", capsize=4,
                    color=VERDICT_COLORS.get(row["verdict"], "black"), ecolor="black")
        ax.set_xlim(-0.5, 0.7)
        ax.set_xticks([])
        ax.set_title(f"{row['metric']}: {row['verdict']}\nkt better on {row['signs']} seeds", fontsize=9)
    axes[0][0].set_ylabel("kt − language+vision (signed)")
    fig.suptitle(f"{title}\ndots: seeds; diamond: their mean; bar: its 95% Student-t interval", fontsize=10)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------------------
# Reconstructed vs real audio (ktlib.analysis)


def embedding_maps(points: dict[str, np.ndarray], color: np.ndarray, title: str, color_label: str = "sentiment",
                   vlim: tuple[float, float] | None = (-3, 3)):
    """One panel per representation in a shared 2-D map, points coloured by ``color`` (e.g. sentiment)."""
    vmin, vmax = vlim if vlim is not None else (None, None)
    fig, axes = plt.subplots(1, len(points), figsize=(3.4 * len(points), 3.5), sharex=True, sharey=True,
                             squeeze=False)
    sc = None
    for ax, (name, xy) in zip(axes[0], points.items(), strict=True):
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=color, cmap="coolwarm", s=6, vmin=vmin, vmax=vmax)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(sc, ax=axes[0].tolist(), label=color_label, shrink=0.85)
    fig.suptitle(title, y=1.04)
    return fig


def similarity_distributions(same: dict[str, np.ndarray], other: dict[str, np.ndarray], xlabel: str, title: str):
    """Per reconstruction, the distribution of a per-sample measure against its own sample's f_A (filled) and
    against another sample's (outline)."""
    fig, axes = plt.subplots(1, len(same), figsize=(3.5 * len(same), 3.2), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], same, strict=True):
        lo = min(np.min(same[name]), np.min(other[name]))
        hi = max(np.max(same[name]), np.max(other[name]))
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 30)
        ax.hist(same[name], bins=bins, color=COLORS["a_hat"], alpha=0.7, label="same sample")
        ax.hist(other[name], bins=bins, histtype="step", color="black", label="another sample")
        ax.set(title=name, xlabel=xlabel)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def per_dim_correlations(corrs: dict[str, np.ndarray], title: str):
    """Per feature dimension of f_A, its correlation across samples with each reconstruction."""
    fig, ax = plt.subplots(figsize=(9, 3.3))
    width = 0.8 / len(corrs)
    for i, (name, c) in enumerate(corrs.items()):
        ax.bar(np.arange(len(c)) + i * width, c, width, label=name)
    ax.axhline(0, color="black", lw=0.8)
    ax.set(xlabel="dimension of f_A", ylabel="Pearson r across samples", ylim=(-1, 1), title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def matrix_heatmap(matrix, title: str, fmt: str = ".2f"):
    """A labelled heatmap of a square DataFrame (e.g. a CKA matrix)."""
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(1.3 * len(matrix) + 2.5, 1.1 * len(matrix) + 1.5))
    sns.heatmap(matrix, annot=True, fmt=fmt, cmap="viridis", vmin=0, vmax=1, ax=ax, cbar_kws={"shrink": 0.8})
    ax.set_title(title)
    fig.tight_layout()
    return fig


def sample_over_time(real: np.ndarray, recon: dict[str, np.ndarray], title: str):
    """One sample's real f_A and its reconstructions over its real frames (heatmaps, time x dimension), and the
    cosine similarity to f_A frame by frame."""
    n = 1 + len(recon)
    fig, axes = plt.subplots(1, n + 1, figsize=(3.2 * (n + 1), 3.3))
    lim = float(np.abs(real).max()) or 1.0
    for ax, (name, x) in zip(axes[:n], {"f_A (real)": real, **recon}.items(), strict=True):
        ax.imshow(x.T, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set(title=name, xlabel="frame", ylabel="dimension")
    from .analysis import cosine

    for name, x in recon.items():
        axes[n].plot(cosine(x, real), label=name, lw=1.2)
    axes[n].set(title="cosine to f_A per frame", xlabel="frame", ylim=(-1, 1))
    axes[n].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def probe_bars(table, title: str):
    """Linear probes of a dataset (``ktlib.analysis.linear_probes``): one bar per probe."""
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(table) + 1.2))
    labels = [f"{p} [{m}]" for p, m in zip(table["probe"], table["measure"], strict=True)]
    colors = [COLORS["a_hat"] if p.startswith("audio") else "#7f7f7f" for p in table["probe"]]
    ax.barh(labels, table["value"], color=colors)
    ax.axvline(0, color="black", lw=0.8)
    ax.invert_yaxis()
    ax.set(xlabel="test correlation / R²", title=title)
    fig.tight_layout()
    return fig


def claims_chart(claims, title: str):
    """Each claim's mean per-seed difference (positive supports it) with its 95 % interval, coloured by verdict;
    one panel per metric (:func:`ktlib.experiments.claims`)."""
    metrics = list(dict.fromkeys(claims["metric"]))
    first = claims[claims["metric"] == metrics[0]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 + 3 * len(metrics), 0.5 * len(first) + 1.6), sharey=True,
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        part = claims[claims["metric"] == metric]
        y = np.arange(len(part))
        ax.barh(y, part["mean_diff"].fillna(0.0), color=[VERDICT_COLORS.get(v, "#cccccc") for v in part["verdict"]])
        ax.errorbar(part["mean_diff"], y, xerr=_interval_err(part["mean_diff"], part["ci_low"], part["ci_high"]),
                    fmt="none", color="black", capsize=3, lw=1)
        for yi, (signs, verdict) in enumerate(zip(part["signs"], part["verdict"], strict=True)):
            ax.annotate(f"{verdict}, {signs}", (0, yi), xytext=(4, 6), textcoords="offset points", fontsize=7)
        ax.axvline(0, color="black", lw=0.8)
        ax.set(xlabel=f"{metric}: mean difference (positive supports)")
    labels = [f"{c} ({s})" for c, s in zip(first["claim"], first["source"], strict=True)]
    axes[0][0].set_yticks(np.arange(len(first)), labels, fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"{title}\nbars: 95% Student-t interval over seeds; sign count = seeds in the claimed direction",
                 fontsize=10)
    fig.tight_layout()
    return fig


def prediction_scatter(preds: dict[str, np.ndarray], y: np.ndarray, title: str):
    """Predicted against true sentiment, one panel per setting."""
    fig, axes = plt.subplots(1, len(preds), figsize=(2.9 * len(preds), 3.1), sharex=True, sharey=True,
                             squeeze=False)
    y = np.asarray(y).reshape(len(y))
    for ax, (setting, p) in zip(axes[0], preds.items(), strict=True):
        ax.scatter(y, np.asarray(p).reshape(len(y)), s=5, alpha=0.5, color=SETTING_COLORS.get(setting))
        ax.plot([-3, 3], [-3, 3], color="black", lw=0.8)
        ax.set(title=setting, xlabel="true", xlim=(-3.2, 3.2), ylim=(-3.2, 3.2))
    axes[0][0].set_ylabel("predicted")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def sample_predictions(preds: dict[str, np.ndarray], y: np.ndarray, index: int, title: str):
    """One utterance: each setting's prediction beside the true label (regression)."""
    fig, ax = plt.subplots(figsize=(6, 2.8))
    names = list(preds)
    vals = [float(np.asarray(preds[s]).reshape(-1)[index]) for s in names]
    ax.barh(names, vals, color=[SETTING_COLORS.get(s, "#7f7f7f") for s in names])
    ax.axvline(float(np.asarray(y).reshape(-1)[index]), color="black", lw=2, label="true label")
    ax.set(xlim=(-3, 3), xlabel="sentiment", title=f"{title}: utterance {index}")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def figure_png(fig) -> bytes:
    """The figure as PNG bytes (and closed): for an ``ipywidgets.Image`` that a slider or button redraws."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


METHOD_COLORS = {"MulT (zero-fill)": SETTING_COLORS["full"], "kt (any modality)": COLORS["a_hat"],
                 "distillation": COLORS["v"]}


def robustness_curves(tidy, title: str, metrics=("mae", "corr", "acc2_non0")):
    """Metric vs missing rate, one panel per metric: mean over seeds, a band of ± one sample std, each method a
    colour.

    ``tidy``: rows of one protocol kind and phase from :func:`ktlib.experiments.robustness_runs`.
    """
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.7 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        part = tidy[tidy["metric"] == metric]
        for method, cell in part.groupby("method", sort=False):
            stats = seed_table(cell, ["rate"]).sort_values("rate").set_index("rate")
            std = stats["std"].fillna(0.0).to_numpy()  # one seed: no band
            color = METHOD_COLORS.get(method)
            ax.plot(stats.index, stats["mean"], "-o", ms=3, color=color, label=method)
            ax.fill_between(stats.index, stats["mean"] - std, stats["mean"] + std, color=color, alpha=0.2, lw=0)
        ax.set(xlabel="missing rate r", ylabel=METRIC_NAMES.get(metric, metric), title=metric)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def fixed_missing_bars(tidy, title: str, metric: str = "mae"):
    """One group of bars per fixed missing pattern (what is absent), one bar per method: mean ± sample std over
    seeds."""
    part = tidy[(tidy["metric"] == metric) & (tidy["kind"] == "fixed")]
    levels = list(dict.fromkeys(part["level"]))
    methods = list(dict.fromkeys(part["method"]))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(1.3 * len(levels) + 2, 3.6))
    for i, method in enumerate(methods):
        stats = seed_table(part[part["method"] == method], ["level"]).set_index("level").reindex(levels)
        x = np.arange(len(levels)) + (i - (len(methods) - 1) / 2) * width
        ax.bar(x, stats["mean"], width, yerr=stats["std"].fillna(0.0), capsize=3,
               color=METHOD_COLORS.get(method), label=method)
    ax.set_xticks(np.arange(len(levels)), [f"no {lv}" for lv in levels])
    ax.set(ylabel=METRIC_NAMES.get(metric, metric), title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
