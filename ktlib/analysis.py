"""Reconstructed vs real audio: how close the knowledge-transfer network's f'_A comes to the real audio's f_A.

:func:`audio_embeddings` runs a trained ``kt`` model over a split and keeps, per sample and audio frame, the real
audio's representation f_A (the consistency target, computed from the audio for this analysis only), the fused
reconstruction f'_A, and the two partial reconstructions theta(f_V) and phi(f_L).  The predictions of the model
never see the audio; the reconstructions are computed exactly as at test time.

Measures (all on the frames where the audio is real):

- per sample: cosine similarity of the time-averaged vectors, and the mean squared error over frames and features;
- a baseline for both: the same measure against another, randomly paired sample's f_A, so that a reconstruction
  that only learned "what audio looks like on average" is told apart from one that is specific to its sample;
- per feature dimension: Pearson correlation across samples of the time-averaged vectors;
- linear CKA (centred kernel alignment, Kornblith et al. 2019) between two sets of time-averaged vectors:
  ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred Xc, Yc; 1 for representations equal up
  to rotation and isotropic scaling, near 0 for unrelated ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .data import MultimodalData, make_loader
from .model import KTModel

NAMES = {"f_a": "f_A (real audio)", "f_a_hat": "f'_A (reconstructed)", "a_from_v": "θ(f_V) (from vision)",
         "a_from_l": "φ(f_L) (from language)"}
RECONSTRUCTIONS = ("f_a_hat", "a_from_v", "a_from_l")


@dataclass
class AudioEmbeddings:
    """Per-frame representations of one split: ``frames[name]`` is (N, T_a, d) for each name of ``NAMES``."""

    frames: dict[str, np.ndarray]
    real: np.ndarray  # (N, T_a) bool: real (non-padding) audio frames
    y: np.ndarray  # the labels: (N,) sentiment, or (N, 4) emotion indicators for IEMOCAP

    def pooled(self, name: str) -> np.ndarray:
        """(N, d): the mean over each sample's real audio frames (zeros for a sample without any)."""
        return frame_mean(self.frames[name], self.real)


def frame_mean(x: np.ndarray, real: np.ndarray) -> np.ndarray:
    """(N, D): the mean of (N, T, D) ``x`` over each sample's ``real`` (N, T) frames (zeros where there are none)."""
    w = real[..., None].astype(np.float64)
    return (x * w).sum(1) / np.maximum(w.sum(1), 1.0)


@torch.no_grad()
def audio_embeddings(model: KTModel, data: MultimodalData, split: str = "test", batch_size: int = 64,
                     device: str | torch.device = "cpu") -> AudioEmbeddings:
    """f_A, f'_A, theta(f_V) and phi(f_L) of every sample of ``split`` from a trained ``kt`` model."""
    if model.cfg.setting != "kt":
        raise ValueError(f"a reconstruction needs a 'kt' model, got setting {model.cfg.setting!r}")
    model = model.to(device).eval()
    frames: dict[str, list[np.ndarray]] = {name: [] for name in NAMES}
    real, ys = [], []
    for batch in make_loader(data, split, batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        _, details = model(batch, return_details=True)  # eval mode: built from language and vision only
        details["f_a"] = model.audio_target(batch)
        t_a = details["f_a"].shape[1]
        for name in NAMES:
            if details[name].shape[1] != t_a:
                raise ValueError(f"{name} has {details[name].shape[1]} steps but the audio has {t_a}; compare on "
                                 "the audio's time axis (kt_time_axis='queries' for unaligned data)")
            frames[name].append(details[name].float().cpu().numpy())
        real.append((~batch["mask_a"]).cpu().numpy())
        ys.append(batch["y"].cpu().numpy())
    y = np.concatenate(ys)
    y = y.reshape(len(y), -1)[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y
    if y.ndim == 3:  # IEMOCAP one-hot (N, 4, 2): keep "emotion present"
        y = y[..., 1]
    return AudioEmbeddings({k: np.concatenate(v) for k, v in frames.items()}, np.concatenate(real), y)


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
    """Per reconstruction: mean cosine and MSE against its own sample's f_A and against another sample's, the
    mean per-dimension correlation and linear CKA with f_A."""
    target, perm = emb.pooled("f_a"), shuffled(len(emb.y), seed)
    rows = []
    for name in RECONSTRUCTIONS:
        rec = emb.pooled(name)
        rows.append({"reconstruction": NAMES[name],
                     "cosine (same sample)": cosine(rec, target).mean(),
                     "cosine (other sample)": cosine(rec, target[perm]).mean(),
                     "MSE (same sample)": frame_mse(emb.frames[name], emb.frames["f_a"], emb.real).mean(),
                     "MSE (other sample)": frame_mse(emb.frames[name], emb.frames["f_a"][perm],
                                                     emb.real & emb.real[perm]).mean(),
                     "mean per-dim corr": np.nanmean(per_dim_corr(rec, target)),
                     "linear CKA with f_A": linear_cka(rec, target)})
    return pd.DataFrame(rows)


def cka_matrix(emb: AudioEmbeddings, extra: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Linear CKA between every pair of the pooled representations (plus ``extra`` (N, k) arrays)."""
    blocks = {NAMES[n]: emb.pooled(n) for n in NAMES} | dict(extra or {})
    names = list(blocks)
    return pd.DataFrame([[linear_cka(blocks[a], blocks[b]) for b in names] for a in names], index=names,
                        columns=names)


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
        import umap

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
