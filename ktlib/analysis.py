"""Reconstructed vs real audio: how close the knowledge-transfer network's f'_A comes to the real audio, and how
much of the audio's *ground-truth* affect it recovers.

:func:`audio_embeddings` runs a trained ``kt`` model over a split and keeps, per sample and frame of the
reconstruction's time axis (the shared word slots, or the language's word slots on unaligned data), the
consistency target f_A (computed from the audio for this analysis only, without dropout, averaged over each
word's span on unaligned data), the fused reconstruction f'_A and the two partial reconstructions theta(f_V) and
phi(f_L).  The predictions of the model never see the audio; the reconstructions are computed exactly as at test
time.  On simulated data it also keeps the simulator's ground truth on the same frames (:data:`TRUTH`).

Measures, all on frames where both the audio and the reconstruction are real:

- :func:`reconstruction_r2`: held-out R^2 of a ridge probe (centred, its penalty chosen on the validation split)
  from each representation, frame by frame, to the ground-truth audio signal: its label-relevant part (shared and
  private together), each part alone, and the nuisance.  Beside it the *ceiling*, the best such linear reading
  from the raw vision and language features (the frame and its utterance's mean), and a *shuffled* baseline (the
  probe of f'_A scored against another utterance's truth).
- :func:`frame_cka`: linear CKA (centred kernel alignment, Kornblith et al. 2019) between frame-level
  representations, ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred Xc, Yc: 1 for
  representations equal up to rotation and isotropic scaling, near 0 for unrelated ones; against f_A of the same
  utterance and of another one (frames paired by slot).
- :func:`similarity_table`: per sample cosine and MSE of the frames (centred over the split), same utterance vs
  another utterance, and per-dimension correlation.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .data import MultimodalData, make_loader
from .layers import pool_onto
from .model import KTModel

NAMES = {"f_a": "f_A (real audio)", "f_a_hat": "f'_A (reconstructed)", "a_from_v": "θ(f_V) (from vision)",
         "a_from_l": "φ(f_L) (from language)"}
RECONSTRUCTIONS = ("f_a_hat", "a_from_v", "a_from_l")
# Ground truth of the simulator, per audio frame: name -> the truth arrays summed (see ktlib.simulate).
TRUTH = {"label-relevant": ("audio_affect_shared", "audio_affect_private"), "shared": ("audio_affect_shared",),
         "private": ("audio_affect_private",), "nuisance": ("audio_nuisance",)}


@dataclass
class AudioEmbeddings:
    """Per-frame representations of one split on the reconstruction's time axis: ``frames[name]`` is (N, T', d)."""

    frames: dict[str, np.ndarray]
    real: np.ndarray  # (N, T') bool: frames where the audio target and the reconstruction are real
    y: np.ndarray  # the labels: (N,) sentiment, or (N, 4) emotion indicators for IEMOCAP
    truth: dict[str, np.ndarray] | None = None  # simulator ground truth on the same frames, (N, T', k) per TRUTH

    def pooled(self, name: str) -> np.ndarray:
        """(N, d): the mean over each sample's real frames (zeros for a sample without any)."""
        return frame_mean(self.frames[name], self.real)

    def stacked(self, name: str) -> np.ndarray:
        """(F, d): every real frame of every sample (frames of a representation, or of a truth entry)."""
        source = self.frames if name in self.frames else self.truth
        return source[name][self.real]


def frame_mean(x: np.ndarray, real: np.ndarray) -> np.ndarray:
    """(N, D): the mean of (N, T, D) ``x`` over each sample's ``real`` (N, T) frames (zeros where there are none)."""
    w = real[..., None].astype(np.float64)
    return (x * w).sum(1) / np.maximum(w.sum(1), 1.0)


def _truth_batch(data: MultimodalData, split: str, index: torch.Tensor, mask_a: torch.Tensor,
                 mask_l: torch.Tensor, steps: int) -> dict[str, torch.Tensor] | None:
    """The simulator's per-audio-frame truth for a batch, on the reconstruction's ``steps`` (pooled over each word's
    span when that is the language's axis)."""
    if data.truth is None or split not in data.truth:
        return None
    truth = data.truth[split]
    out = {}
    for name, parts in TRUTH.items():
        value = torch.from_numpy(sum(truth[p][index.numpy()] for p in parts).astype(np.float32))  # (B, T_a, k)
        out[name] = value if value.shape[1] == steps else pool_onto(value, mask_a, mask_l)[0]
    return out


@torch.no_grad()
def audio_embeddings(model: KTModel, data: MultimodalData, split: str = "test", batch_size: int = 64,
                     device: str | torch.device = "cpu") -> AudioEmbeddings:
    """f_A, f'_A, theta(f_V) and phi(f_L) of every sample of ``split`` from a trained ``kt`` model, and the
    simulator's truth on the same frames when the data is simulated."""
    if model.cfg.setting != "kt":
        raise ValueError(f"a reconstruction needs a 'kt' model, got setting {model.cfg.setting!r}")
    model = model.to(device).eval()
    frames: dict[str, list[np.ndarray]] = {name: [] for name in NAMES}
    truths: dict[str, list[np.ndarray]] = {name: [] for name in TRUTH}
    real, ys = [], []
    for batch in make_loader(data, split, batch_size, shuffle=False):
        index = batch["index"]
        batch = {k: v.to(device) for k, v in batch.items()}
        _, details = model(batch, return_details=True)  # eval mode: built from language and vision only
        details["f_a"], frames_real = model.audio_target(batch)
        if details["mask_a_hat"] is not None:
            frames_real = frames_real & ~details["mask_a_hat"]
        steps = details["f_a"].shape[1]
        for name in NAMES:
            frames[name].append(details[name].float().cpu().numpy())
        truth = _truth_batch(data, split, index, batch["mask_a"].cpu(), batch["mask_l"].cpu(), steps)
        for name, value in (truth or {}).items():
            truths[name].append(value.numpy())
        real.append(frames_real.cpu().numpy())
        ys.append(batch["y"].cpu().numpy())
    y = np.concatenate(ys)
    y = y.reshape(len(y), -1)[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y
    if y.ndim == 3:  # IEMOCAP one-hot (N, 4, 2): keep "emotion present"
        y = y[..., 1]
    truth = {k: np.concatenate(v) for k, v in truths.items()} if truths["shared"] else None
    return AudioEmbeddings({k: np.concatenate(v) for k, v in frames.items()}, np.concatenate(real), y, truth)


def cosine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, d) arrays (0 where a row is all zeros)."""
    num = (x * y).sum(1)
    den = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def frame_mse(x: np.ndarray, y: np.ndarray, real: np.ndarray) -> np.ndarray:
    """(N,): mean squared error over each sample's real frames and all features of (N, T, d) arrays."""
    w = real[..., None].astype(np.float64)
    return ((x - y) ** 2 * w).sum((1, 2)) / np.maximum(w.sum((1, 2)) * x.shape[2], 1.0)


def per_dim_corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(d,): Pearson correlation across samples of each feature of two (N, d) arrays (NaN for a constant one)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    den = np.sqrt((xc**2).sum(0) * (yc**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (xc * yc).sum(0) / den, np.nan)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA between (N, d1) and (N, d2) representations of the same N samples."""
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"CKA compares the same samples (at least two): got {x.shape[0]} and {y.shape[0]} rows")
    xc, yc = x - x.mean(0), y - y.mean(0)
    cross = np.linalg.norm(yc.T @ xc) ** 2
    den = np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)
    return float(cross / den) if den > 0 else float("nan")


def shuffled(n: int, seed: int = 0) -> np.ndarray:
    """A permutation of range(n) with no fixed point (each sample paired with another one)."""
    if n < 2:
        raise ValueError("pairing each sample with another needs at least two samples")
    perm = np.random.default_rng(seed).permutation(n)
    return np.roll(perm, 1)[np.argsort(perm)]  # i -> the sample after i in a random cycle


def similarity_table(emb: AudioEmbeddings, seed: int = 0) -> pd.DataFrame:
    """Per reconstruction, frame by frame on real frames and centred (the split's mean frame of each
    representation removed): mean cosine and MSE against its own utterance's f_A and against another utterance's
    (frames paired by slot), the mean per-dimension correlation across frames, and frame-level linear CKA."""
    perm = shuffled(len(emb.y), seed)
    both = emb.real & emb.real[perm]  # slots real in an utterance and in its partner

    def centred(name):
        x = emb.frames[name].astype(np.float64)
        return np.where(emb.real[..., None], x - x[emb.real].mean(0), 0.0)

    target = centred("f_a")
    rows = []
    for name in RECONSTRUCTIONS:
        rec = centred(name)
        own = _frame_cosine(rec, target, emb.real)
        other = _frame_cosine(rec, target[perm], both)
        rows.append({"reconstruction": NAMES[name], "cosine (same utterance)": own,
                     "cosine (other utterance)": other,
                     "MSE (same utterance)": frame_mse(rec, target, emb.real).mean(),
                     "MSE (other utterance)": frame_mse(rec, target[perm], both)[both.any(1)].mean(),
                     "mean per-dim corr": np.nanmean(per_dim_corr(rec[emb.real], target[emb.real])),
                     "frame CKA with f_A": linear_cka(rec[emb.real], target[emb.real]),
                     "frame CKA, other utterance": linear_cka(rec[both], target[perm][both])})
    return pd.DataFrame(rows)


def _frame_cosine(x: np.ndarray, y: np.ndarray, real: np.ndarray) -> float:
    """Mean cosine similarity over the ``real`` frames of two (N, T, d) arrays."""
    return float(cosine(x[real], y[real]).mean()) if real.any() else float("nan")


def frame_cka(emb: AudioEmbeddings, extra: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Linear CKA between every pair of frame-level representations (stacked real frames), plus ``extra``
    (F, k) arrays on the same frames (e.g. ground truth or raw features)."""
    blocks = {NAMES[n]: emb.stacked(n) for n in NAMES} | dict(extra or {})
    names = list(blocks)
    return pd.DataFrame([[linear_cka(blocks[a], blocks[b]) for b in names] for a in names], index=names,
                        columns=names)


# ----------------------------------------------------------------------------------------------------------------
# Reconstruction scored against the simulator's ground truth


PENALTIES = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)  # ridge penalties tried on the validation split


def r2_score(truth: np.ndarray, pred: np.ndarray) -> float:
    """R^2 pooled over the columns, centred on the truth's own mean (NaN for a constant truth)."""
    total = ((truth - truth.mean(0)) ** 2).sum()
    return float(1 - ((truth - pred) ** 2).sum() / total) if total > 0 else float("nan")


def ridge_fit_chosen(x: dict[str, np.ndarray], y: dict[str, np.ndarray], penalties=PENALTIES):
    """A ridge regression x -> y fitted on ``train`` (features standardised, intercept free), its penalty chosen by
    R^2 on ``valid``: (the fit for :func:`_ridge_predict`, the penalty)."""
    fits = {a: _ridge_fit(x["train"], y["train"], a) for a in penalties}
    best = max(penalties, key=lambda a: r2_score(y["valid"], _ridge_predict(*fits[a], x["valid"])))
    return fits[best], best


def ridge_r2(x: dict[str, np.ndarray], y: dict[str, np.ndarray], penalties=PENALTIES) -> tuple[float, float]:
    """Held-out R^2 on ``test`` of :func:`ridge_fit_chosen`: (test R^2 pooled over y's columns, penalty)."""
    fit, best = ridge_fit_chosen(x, y, penalties)
    return r2_score(y["test"], _ridge_predict(*fit, x["test"])), best


def raw_frames(data: MultimodalData, split: str, emb: AudioEmbeddings) -> np.ndarray:
    """(F, D_l + D_v) * 2: per real frame of ``emb``, the raw language and vision features on the reconstruction's
    axis (vision averaged over each word's span on unaligned data) and their utterance means."""
    l = data[split].features("l").astype(np.float32)
    v = data[split].features("v").astype(np.float32)
    if v.shape[1] != l.shape[1]:
        mask_v, mask_l = torch.from_numpy(~(v != 0).any(-1)), torch.from_numpy(~(l != 0).any(-1))
        v = pool_onto(torch.from_numpy(v), mask_v, mask_l)[0].numpy()
    x = np.concatenate([l, v], -1)  # (N, T', D)
    means = frame_mean(x, emb.real)  # (N, D)
    return np.concatenate([x, np.broadcast_to(means[:, None], x.shape)], -1)[emb.real]


def reconstruction_r2(embeddings: dict[str, AudioEmbeddings], data: MultimodalData, seed: int = 0) -> pd.DataFrame:
    """How much of the audio's ground truth each representation recovers, frame by frame: held-out R^2 (test) of a
    ridge probe fitted on train (penalty chosen on valid), for every truth part of :data:`TRUTH` that is not zero.

    ``embeddings``: {"train", "valid", "test"} -> :func:`audio_embeddings` of the same model.  Rows: f'_A, theta(f_V),
    phi(f_L), f_A itself (how much of the truth the target carries), the raw language and vision features (the
    ceiling of a linear reading) and f'_A against another utterance's truth (the shuffled baseline, near 0).
    """
    splits = ("train", "valid", "test")
    if any(embeddings[s].truth is None for s in splits):
        raise ValueError("ground truth is only known for simulated data; this dataset is real")
    perm = shuffled(len(embeddings["test"].y), seed)
    rows = []
    sources = {NAMES[n]: {s: embeddings[s].stacked(n) for s in splits} for n in ("f_a_hat", "a_from_v", "a_from_l",
                                                                               "f_a")}
    sources["raw language + vision (ceiling)"] = {s: raw_frames(data, s, embeddings[s]) for s in splits}
    for part in TRUTH:
        y = {s: embeddings[s].stacked(part).astype(np.float64) for s in splits}
        if not np.abs(y["train"]).any():  # this part is zero in this simulation (e.g. private at audio_shared=1)
            continue
        fits = {}
        for name, x in sources.items():
            fits[name], penalty = ridge_fit_chosen(x, y)
            rows.append({"truth": part, "representation": name, "penalty": penalty,
                         "R2": r2_score(y["test"], _ridge_predict(*fits[name], x["test"]))})
        # shuffled baseline: the same probe of f'_A, scored against another utterance's truth (frames by slot)
        test = embeddings["test"]
        both = test.real & test.real[perm]
        pred = _ridge_predict(*fits[NAMES["f_a_hat"]], test.frames["f_a_hat"][both])
        rows.append({"truth": part, "representation": "f'_A vs another utterance (shuffled)", "penalty": np.nan,
                     "R2": r2_score(test.truth[part][perm][both].astype(np.float64), pred)})
    return pd.DataFrame(rows)


def reconstruction_embeddings(model: KTModel, data: MultimodalData) -> dict[str, AudioEmbeddings]:
    """:func:`audio_embeddings` of train, valid and test (what :func:`reconstruction_r2` needs)."""
    return {s: audio_embeddings(model, data, s) for s in ("train", "valid", "test")}


def import_umap():
    """``import umap`` with a writable numba cache: umap-learn compiles with numba, which fails on a read-only
    install unless ``NUMBA_CACHE_DIR`` has a writable home (a default is set only where the user has none)."""
    os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "ktlib-numba-cache"))
    import umap

    return umap


def embed_2d(blocks: dict[str, np.ndarray], method: str = "pca", seed: int = 0) -> dict[str, np.ndarray]:
    """One 2-D map shared by all blocks ((N_i, d) each): PCA or UMAP fitted on all points together, so positions
    are comparable across blocks."""
    names = list(blocks)
    stacked = np.concatenate([blocks[n] for n in names])
    if method == "pca":
        centred = stacked - stacked.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        points = centred @ vt[:2].T
    elif method == "umap":
        umap = import_umap()
        neighbours = int(min(15, len(stacked) - 1))
        points = umap.UMAP(n_neighbors=neighbours, min_dist=0.1, random_state=seed).fit_transform(stacked)
    else:
        raise ValueError(f"method must be 'pca' or 'umap', got {method!r}")
    out, start = {}, 0
    for n in names:
        out[n] = points[start:start + len(blocks[n])]
        start += len(blocks[n])
    return out


def pooled_features(data: MultimodalData, split: str, m: str) -> np.ndarray:
    """(N, D): a modality's raw input features averaged over each utterance's real (non-padding) frames."""
    x = data[split].features(m)  # (N, T, D)
    return frame_mean(x, (x != 0).any(-1))  # padding frames are all-zero


def _ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean, scale = x.mean(0), x.std(0) + 1e-8
    z = (x - mean) / scale
    z1 = np.hstack([z, np.ones((len(z), 1))])
    reg = alpha * np.eye(z1.shape[1])
    reg[-1, -1] = 0.0  # the intercept is not shrunk
    return np.linalg.solve(z1.T @ z1 + reg, z1.T @ y), mean, scale


def _ridge_predict(w, mean, scale, x):
    z = (x - mean) / scale
    return np.hstack([z, np.ones((len(z), 1))]) @ w


def linear_probes(data: MultimodalData, alpha: float = 10.0) -> pd.DataFrame:
    """How much the time-averaged features say, by ridge regressions fitted on train and scored on test.

    Rows "sentiment from <modalities>": correlation of the prediction with the label (MOSI / MOSEI).  Row "audio
    from language+vision": the R² of predicting the audio's features from language and vision together (averaged
    over audio features; frame by frame on word-aligned data, time-averaged otherwise): how much of the audio a
    reconstruction could recover.  A quick description of a dataset, not a model of the workbook.
    """
    pooled = {s: {m: pooled_features(data, s, m) for m in "lav"} for s in ("train", "test")}
    rows = []
    if data.task == "regression":
        y = {s: data[s].labels.reshape(len(data[s].labels), -1)[:, 0] for s in ("train", "test")}
        for combo in ("l", "v", "a", "lv", "lav"):
            x = {s: np.hstack([pooled[s][m] for m in combo]) for s in ("train", "test")}
            fit = _ridge_fit(x["train"], y["train"], alpha)
            pred = _ridge_predict(*fit, x["test"])
            name = "+".join({"l": "language", "a": "audio", "v": "vision"}[m] for m in combo)
            rows.append({"probe": f"sentiment from {name}", "measure": "corr",
                         "value": float(np.corrcoef(pred, y["test"])[0, 1])})
    if len({data.layout.seq_lens[m] for m in "lav"}) == 1:  # word-aligned: frame by frame on real word slots
        x, target = {}, {}
        for s in ("train", "test"):
            f = {m: data[s].features(m).astype(np.float64) for m in "lav"}
            real = (f["a"] != 0).any(-1) & (f["l"] != 0).any(-1)
            x[s], target[s] = np.hstack([f["l"][real], f["v"][real]]), f["a"][real]
        measure = "R² (frames)"
    else:  # unaligned: time-averaged
        x = {s: np.hstack([pooled[s]["l"], pooled[s]["v"]]) for s in ("train", "test")}
        target = {s: pooled[s]["a"] for s in ("train", "test")}
        measure = "R² (time-averaged)"
    fit = _ridge_fit(x["train"], target["train"], alpha)
    pred = _ridge_predict(*fit, x["test"])
    resid = ((target["test"] - pred) ** 2).sum(0)
    total = ((target["test"] - target["test"].mean(0)) ** 2).sum(0)
    keep = total > 0
    rows.append({"probe": "audio from language+vision", "measure": measure,
                 "value": float(np.mean(1 - resid[keep] / total[keep]))})
    return pd.DataFrame(rows)
