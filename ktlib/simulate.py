"""A simulator that writes the MulT file layout, with a generative story one can reason about.

The real MulT feature files are large; this module produces stand-ins with the real shapes (feature widths,
sequence lengths, split sizes, front zero-padding) so that every part of the workbook runs without them.
Everything it produces is synthetic and is labelled so wherever it is shown.

The generative story, for one utterance
---------------------------------------
1. Affect.  A latent sentiment ``s`` and arousal ``alpha``.
   - MOSI / MOSEI: ``s`` from a mixture of a negative, a neutral and a positive bump (dataset-specific
     weights); ``alpha = 0.5 |s| + noise``, centred.
   - IEMOCAP: an emotion ``c`` in (neutral, happy, sad, angry) with IEMOCAP-like imbalance; ``(s, alpha)``
     scatter around that emotion's point in valence-arousal space.
2. Label.
   - MOSI / MOSEI: ``n_annotators`` annotators each rate ``clip(round(s + e), -3, 3)`` with
     ``e ~ N(0, annotator_noise^2)``; the label is their mean (so it lives on a grid and can be exactly 0).
   - IEMOCAP: the (4, 2) one-hot of ``c`` (one emotion per utterance).
3. Time.  A duration (log-normal, dataset-specific); words at a speaking rate; audio and vision frames at their
   own sampling rates (unaligned) or on the word slots (aligned).  Sequences are zero-padded at the front and
   truncated at the file's sequence length, as in the MulT files.
4. Latent streams in continuous time.  Sentiment ``z_s(t) = s + wiggle * w_s(t)`` and arousal
   ``z_alpha(t) = alpha + wiggle * w_alpha(t)``; three-dimensional structure streams ``n_l(t)`` (topic,
   wording), ``n_v(t)`` (pose, lighting) and ``p_a(t)`` (pitch range, voice quality).  Every ``w``, ``n`` and
   ``p`` is a smooth zero-mean unit-variance process (a sum of random slow cosines).
5. What each modality sees.  Per frame, feature = affect part + structure part + unit Gaussian noise per
   dimension, each part mapped to the feature width by fixed random directions of unit norm, so a knob's effect
   does not depend on the width:
   - language: affect ``informativeness_l * (z_s(t), 0.3 z_alpha(t))``, structure ``structure * n_l(t)``;
   - vision:   affect ``informativeness_v * (z_s(t), z_alpha(t))``,     structure ``structure * n_v(t)``;
   - audio:    affect ``informativeness_a * (s, alpha)`` (prosody reflects the utterance's overall affect),
     structure ``structure * u(t)`` with ``u = sqrt(rho) * h + sqrt(1 - rho) * p_a`` and
     ``rho = audio_predictability``, where ``h(t) = tanh(B_h [n_l(t), n_v(t)])`` (standardised) is a function
     of the streams language and vision see.
   So audio's signal is its affect part plus its structure; ``rho`` is the share of the structure's variance
   that is a function of what vision and language see.  At ``rho = 0`` audio is independent of vision and
   language given the latent affect ``(s, alpha)`` (of which the label is a noisy reading): reconstructing audio
   from them can recover nothing they do not already carry.  At ``rho = 1`` audio's whole signal is a function
   of latents that vision and language see; only its measurement noise is its own.

Ground truth and noise ceiling
------------------------------
``Simulation.truth`` holds, per split, the latent affect, the emotion, durations and lengths, the noise-free
audio structure ``u`` and its predictable part ``h`` at the audio frames, and an *oracle* prediction: what a
predictor that knows the latent affect exactly would output (``E[label | s]`` for regression, the Bayes
posterior of the emotion given ``(s, alpha)`` for IEMOCAP).  Models only see noisy features, so no model can
beat the oracle in expectation (exactly so for squared error, approximately for the other metrics):
``Simulation.ceiling`` gives its metrics per split.

Determinism: the same config gives the same bytes.  Randomness comes from ``numpy.random.SeedSequence``
streams keyed by (seed, split, purpose, chunk), so nothing depends on global state.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from . import metrics
from .specs import DATASETS, EMOTIONS, FILE_KEYS, MODALITIES, Layout, get_layout

# Per-dataset facts of the simulation: label model and timing.  Chosen to resemble the real corpora
# (MOSI: short opinion clips, slightly more negative than positive; MOSEI: longer, more positive and neutral
# segments; IEMOCAP: the four-emotion subset's class imbalance), not estimated from them.
_SENTIMENT_MIXTURE = {  # (weights, means, standard deviations) of the negative / neutral / positive bumps
    "mosi": ((0.50, 0.08, 0.42), (-1.35, 0.0, 1.25), (0.85, 0.35, 0.85)),
    "mosei": ((0.24, 0.22, 0.54), (-1.2, 0.1, 1.05), (0.8, 0.4, 0.75)),
}
_N_ANNOTATORS = {"mosi": 5, "mosei": 3}
_EMOTION_PRIOR = (0.38, 0.135, 0.24, 0.245)  # neutral, happy, sad, angry
_EMOTION_CENTRE = ((0.0, 0.0), (1.5, 0.8), (-1.3, -0.9), (-1.2, 1.3))  # (valence, arousal)
_EMOTION_SPREAD = 0.75
_TIMING = {  # median duration (s), log-normal sigma, words per second, audio Hz, vision Hz
    "mosi": (3.5, 0.55, 3.0, 38.0, 50.0),
    "mosei": (6.5, 0.50, 2.8, 30.0, 30.0),
    "iemocap": (3.8, 0.60, 2.6, 34.0, 43.0),
}
VERSION = 3  # bump when the generative story changes: it is part of the simulator cache key
_N_COSINES = 4  # components of each smooth process
_N_STRUCTURE = 3  # dimensions of each modality's structure stream
_CHUNK = 1024  # utterances generated at a time (bounds memory; part of the random-stream keys)
# Indices of the smooth processes: sentiment wiggle, arousal wiggle, n_l (3), n_v (3), p_a (3).
_P_S, _P_ALPHA, _P_L, _P_V, _P_A = 0, 1, slice(2, 5), slice(5, 8), slice(8, 11)
_N_PROCESSES = 11


@dataclass(frozen=True)
class SimConfig:
    """Every knob of the simulator.  ``preset(dataset, alignment)`` gives the defaults for a dataset."""

    dataset: str = "mosi"  # mosi | mosei | iemocap: widths, lengths, split sizes and label type
    alignment: str = "aligned"  # aligned (all modalities on word slots) | unaligned (own sampling rates)
    scale: float = 1.0  # fraction of the published split sizes (at least 8 utterances per split)
    seed: int = 0  # same seed, same bytes
    informativeness_l: float = 0.22  # per-frame affect signal-to-noise amplitude of language
    informativeness_v: float = 0.12  # ... of vision
    informativeness_a: float = 0.10  # ... of audio (its reading of the utterance's overall affect)
    audio_predictability: float = 0.7  # rho in [0, 1]: share of audio's structure that is a function of V and L
    structure: float = 1.5  # amplitude of each modality's non-affect structure (topic, pose, voice)
    wiggle: float = 0.5  # within-utterance variation of sentiment and arousal (std)
    annotator_noise: float = 0.8  # std of one annotator's rating error (MOSI / MOSEI)

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        get_layout(self.dataset, self.alignment)  # validates alignment with a clear message
        if not 0.0 <= self.audio_predictability <= 1.0:
            raise ValueError(
                f"audio_predictability must lie in [0, 1] (share of audio's signal predictable from vision and "
                f"language), got {self.audio_predictability}"
            )
        if not 0.0 < self.scale <= 1.0:
            raise ValueError(f"scale must lie in (0, 1] (fraction of the published split sizes), got {self.scale}")
        for name in ("informativeness_l", "informativeness_v", "informativeness_a", "structure", "wiggle",
                     "annotator_noise"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")

    @property
    def layout(self) -> Layout:
        return get_layout(self.dataset, self.alignment)

    def split_sizes(self) -> dict[str, int]:
        return {s: max(8, round(n * self.scale)) for s, n in self.layout.split_sizes.items()}


def preset(dataset: str = "mosi", alignment: str = "aligned", **overrides) -> SimConfig:
    """The default simulation of ``dataset`` (mosi | mosei | iemocap) x ``alignment``, with any knob overridden."""
    return SimConfig(dataset=dataset, alignment=alignment, **overrides)


@dataclass
class Simulation:
    """A simulated dataset: ``raw`` in the MulT file layout, plus ground truth the real files do not have."""

    config: SimConfig
    raw: dict[str, dict[str, np.ndarray]]  # {split: {text, audio, vision, labels, id}}
    truth: dict[str, dict[str, np.ndarray]]  # {split: {sentiment, arousal, ..., oracle}}
    ceiling: dict[str, dict[str, float]]  # {split: metrics of the oracle}
    seconds: float = 0.0  # generation time


def simulate(config: SimConfig) -> Simulation:
    """Generate a dataset following the story in the module docstring."""
    start = time.perf_counter()
    world = _World(config)
    raw, truth, ceiling = {}, {}, {}
    for split_id, (split, n) in enumerate(config.split_sizes().items()):
        raw[split], truth[split] = _simulate_split(config, world, split_id, split, n)
        ceiling[split] = metrics.task_metrics(truth[split]["oracle"], raw[split]["labels"], config.layout.task)
    return Simulation(config, raw, truth, ceiling, seconds=time.perf_counter() - start)


class _World:
    """The fixed parts of one simulated world: loadings, shared across splits."""

    def __init__(self, config: SimConfig):
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, 1000]))
        dims = config.layout.feature_dims

        def directions(k: int, d: int) -> np.ndarray:  # k random unit-norm directions in R^d
            w = rng.standard_normal((k, d))
            return (w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32)

        self.w_l, self.u_l = directions(2, dims["l"]), directions(_N_STRUCTURE, dims["l"])  # affect, structure
        self.w_v, self.u_v = directions(2, dims["v"]), directions(_N_STRUCTURE, dims["v"])
        self.w_a, self.u_a = directions(2, dims["a"]), directions(3, dims["a"])
        # h = tanh(B_h [n_l, n_v]): B_h's columns scaled so each pre-activation has unit variance (tanh mildly
        # non-linear); h is then standardised with constants from a Monte Carlo (fixed per world).
        self.b_h = rng.standard_normal((2 * _N_STRUCTURE, 3))
        self.b_h /= np.linalg.norm(self.b_h, axis=0, keepdims=True)
        h = np.tanh(rng.standard_normal((20000, 2 * _N_STRUCTURE)) @ self.b_h)
        self.h_mean, self.h_std = h.mean(0), h.std(0)


def _affect(dataset: str, rng: np.random.Generator, n: int):
    """Latent sentiment, arousal and (IEMOCAP) emotion index for ``n`` utterances."""
    if dataset == "iemocap":
        emotion = rng.choice(len(EMOTIONS), size=n, p=_EMOTION_PRIOR)
        centre = np.asarray(_EMOTION_CENTRE)[emotion]
        s, alpha = (centre + _EMOTION_SPREAD * rng.standard_normal((n, 2))).T
        return s, alpha, emotion
    weights, means, sds = (np.asarray(x) for x in _SENTIMENT_MIXTURE[dataset])
    bump = rng.choice(3, size=n, p=weights)
    s = means[bump] + sds[bump] * rng.standard_normal(n)
    alpha = 0.5 * np.abs(s) + 0.7 * rng.standard_normal(n)
    alpha -= 0.5 * 1.1  # roughly centred (E|s| is about 1.1)
    return s, alpha, np.full(n, -1)


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[float])(x)


def expected_rating(s: np.ndarray, noise: float) -> np.ndarray:
    """E[clip(round(s + e), -3, 3)] for e ~ N(0, noise^2): the oracle's regression prediction."""
    s = np.asarray(s, dtype=float)
    if noise == 0:
        return np.clip(np.round(s), -3, 3)
    edges = np.arange(-2.5, 3.0, 1.0)  # boundaries between the rating values -3..3
    cdf = 0.5 * (1 + _erf((edges[None, :] - s[:, None]) / (noise * math.sqrt(2))))  # P(s + e < edge)
    probs = np.diff(np.c_[np.zeros(len(s)), cdf, np.ones(len(s))], axis=1)  # (N, 7) for ratings -3..3
    return probs @ np.arange(-3, 4)


def emotion_posterior(s: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """P(emotion | s, alpha) under the IEMOCAP story: (N, 4)."""
    centre = np.asarray(_EMOTION_CENTRE)
    d2 = (s[:, None] - centre[None, :, 0]) ** 2 + (alpha[:, None] - centre[None, :, 1]) ** 2
    logp = np.log(_EMOTION_PRIOR)[None, :] - d2 / (2 * _EMOTION_SPREAD**2)
    logp -= logp.max(1, keepdims=True)
    p = np.exp(logp)
    return p / p.sum(1, keepdims=True)


def _frame_times(n_frames: np.ndarray, seq_len: int, spacing: np.ndarray, centred: bool):
    """Times of front-padded frames: (N, T) times and (N, T) validity (True on real frames)."""
    pos = np.arange(seq_len)[None, :] - (seq_len - n_frames)[:, None]  # index among real frames; <0 = padding
    valid = pos >= 0
    times = (np.maximum(pos, 0) + (0.5 if centred else 0.0)) * spacing[:, None]
    return times.astype(np.float32), valid


def _project(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(..., k) @ (k, D) as one 2-D float32 matrix product (much faster than a batched matmul)."""
    return (x.reshape(-1, x.shape[-1]).astype(np.float32) @ w.astype(np.float32)).reshape(*x.shape[:-1], -1)


def _smooth(freq: np.ndarray, phase: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Unit-variance smooth processes at the given times: (n, P, K) params, (n, T) times -> (n, T, P)."""
    arg = (2 * np.pi) * freq[:, None] * times[:, :, None, None] + phase[:, None]  # (n, T, P, K)
    return (np.sqrt(2.0 / _N_COSINES) * np.cos(arg).sum(-1)).astype(np.float32)


def _simulate_split(config: SimConfig, world: _World, split_id: int, split: str, n: int):
    layout = config.layout
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, split_id, 0]))
    s, alpha, emotion = _affect(config.dataset, rng, n)
    s, alpha = s.astype(np.float32), alpha.astype(np.float32)

    # Labels (step 2) and the oracle's prediction.
    if config.dataset == "iemocap":
        labels = np.zeros((n, 4, 2), dtype=np.float32)
        labels[np.arange(n)[:, None], np.arange(4)[None, :], (emotion[:, None] == np.arange(4)).astype(int)] = 1
        post = emotion_posterior(s, alpha)  # (N, 4)
        oracle = np.log(np.stack([1 - post, post], axis=-1).clip(1e-9, None)).astype(np.float32)  # (N, 4, 2)
    else:
        k = _N_ANNOTATORS[config.dataset]
        ratings = np.clip(np.round(s[:, None] + config.annotator_noise * rng.standard_normal((n, k))), -3, 3)
        labels = ratings.mean(1).astype(np.float32).reshape(n, 1, 1)
        oracle = expected_rating(s, config.annotator_noise).astype(np.float32)

    # Timing (step 3).
    median, sigma, wps, audio_hz, vision_hz = _TIMING[config.dataset]
    duration = median * np.exp(sigma * rng.standard_normal(n))
    n_words = np.clip(np.round(duration * wps * rng.uniform(0.8, 1.2, n)), 1, None).astype(int)
    word_gap = duration / n_words
    # Smooth-process parameters (step 4): (N, P, K).
    freq = rng.uniform(0.1, 1.5, (n, _N_PROCESSES, _N_COSINES)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, (n, _N_PROCESSES, _N_COSINES)).astype(np.float32)

    seq = layout.seq_lens
    frames = {}  # modality -> (times (N,T), valid (N,T), n_frames (N,))
    for m in MODALITIES:
        if layout.alignment == "aligned" or m == "l":
            count = np.minimum(n_words, seq[m])
            frames[m] = (*_frame_times(count, seq[m], word_gap, centred=True), count)
        else:
            hz = audio_hz if m == "a" else vision_hz
            count = np.clip(np.floor(duration * hz), 1, seq[m]).astype(int)
            frames[m] = (*_frame_times(count, seq[m], np.full(n, 1.0 / hz), centred=False), count)

    out = {m: np.zeros((n, seq[m], layout.feature_dims[m]), dtype=np.float32) for m in MODALITIES}
    audio_structure = np.zeros((n, seq["a"], 3), dtype=np.float32)
    audio_shared = np.zeros((n, seq["a"], 3), dtype=np.float32)
    rho = config.audio_predictability
    # The smooth processes each modality needs (the cosines are most of the cost).
    audio_needs = (list(range(2, 8)) if rho > 0 else []) + (list(range(8, 11)) if rho < 1 else [])
    used = {"l": [_P_S, _P_ALPHA, *range(2, 5)], "v": [_P_S, _P_ALPHA, *range(5, 8)], "a": audio_needs}
    for m_id, m in enumerate(MODALITIES):
        times, valid, _ = frames[m]
        for c_id, lo in enumerate(range(0, n, _CHUNK)):
            hi = min(n, lo + _CHUNK)
            noise_rng = np.random.default_rng(np.random.SeedSequence([config.seed, split_id, 1, m_id, c_id]))
            proc = np.zeros((hi - lo, times.shape[1], _N_PROCESSES), dtype=np.float32)  # (n, T, P)
            proc[..., used[m]] = _smooth(freq[lo:hi, used[m]], phase[lo:hi, used[m]], times[lo:hi])
            z_s = s[lo:hi, None] + config.wiggle * proc[..., _P_S]  # (n, T)
            z_alpha = alpha[lo:hi, None] + config.wiggle * proc[..., _P_ALPHA]
            if m == "l":
                x = config.informativeness_l * _project(np.stack([z_s, 0.3 * z_alpha], -1), world.w_l)
                x += config.structure * _project(proc[..., _P_L], world.u_l)
            elif m == "v":
                x = config.informativeness_v * _project(np.stack([z_s, z_alpha], -1), world.w_v)
                x += config.structure * _project(proc[..., _P_V], world.u_v)
            else:
                affect = np.c_[s[lo:hi], alpha[lo:hi]] @ world.w_a  # (n, D_a): constant over the utterance
                seen = np.concatenate([proc[..., _P_L], proc[..., _P_V]], -1)  # (n, T, 6) streams V and L see
                h = (np.tanh(_project(seen, world.b_h)) - world.h_mean) / world.h_std  # (n, T, 3)
                u = math.sqrt(rho) * h + math.sqrt(1 - rho) * proc[..., _P_A]  # (n, T, 3)
                keep = valid[lo:hi, :, None]
                audio_structure[lo:hi] = np.where(keep, u, 0)
                audio_shared[lo:hi] = np.where(keep, h, 0)
                x = config.structure * _project(u, world.u_a) + config.informativeness_a * affect[:, None, :]
            keep = valid[lo:hi]  # noise only on real frames; padding frames are exactly zero
            x[keep] += noise_rng.standard_normal((int(keep.sum()), x.shape[-1]), dtype=np.float32)
            x[~keep] = 0
            out[m][lo:hi] = x

    ids = np.array([f"sim-{config.dataset}-{split}-{i:05d}" for i in range(n)])
    raw = {FILE_KEYS[m]: out[m] for m in MODALITIES}
    raw.update(labels=labels, id=ids)
    truth = {
        "sentiment": s,
        "arousal": alpha,
        "emotion": emotion.astype(np.int64),  # -1 for MOSI / MOSEI
        "duration": duration.astype(np.float32),
        "len_l": frames["l"][2],
        "len_a": frames["a"][2],
        "len_v": frames["v"][2],
        "audio_structure": audio_structure,  # u(t): audio's noise-free structure at its frames (N, T_a, 3)
        "audio_shared": audio_shared,  # h(t): its part that is a function of what V and L see (N, T_a, 3)
        "oracle": oracle,
    }
    return raw, truth
