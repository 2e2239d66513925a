"""A simulator that writes the MulT file layout, with a generative story one can reason about.

The real MulT feature files are large; this module produces stand-ins with the real shapes (feature widths,
sequence lengths, split sizes, front zero-padding) so that every part of the workbook runs without them.
Everything it produces is synthetic and is labelled so wherever it is shown.

Why this story: the question it is built to answer
--------------------------------------------------
At test time the knowledge-transfer model's f'_A is a function of language and vision only.  So reconstructing the
audio can only help through *training*: the audio, present in training, must be a cleaner or complementary view of
the latent the labels measure, so that learning to predict it teaches theta and phi to pull that latent out of
vision and language (learning with privileged information).  The story below makes the audio such a view to a
degree set by one knob, ``audio_shared``, and keeps every other ingredient of that argument (how noisy the labels
are, how many there are, how much nuisance the audio carries) on a knob of its own.

The generative story, for one utterance
---------------------------------------
1. Affect, in two parts.
   - The *common* affect ``(s_c, alpha_c)``, expressed in the words, the face and (to the share ``audio_shared``)
     the voice.  MOSI / MOSEI: ``s_c`` from a mixture of a negative, a neutral and a positive bump
     (dataset-specific weights), ``alpha_c = 0.5 |s_c| + noise``, centred.  IEMOCAP: an emotion ``c`` in
     (neutral, happy, sad, angry) with IEMOCAP-like imbalance; ``(s_c, alpha_c)`` scatter around that emotion's
     point in valence-arousal space.
   - The *voice-only* affect ``(s_p, alpha_p)``, what only the tone of voice gives away.  MOSI / MOSEI:
     ``N(0, private_affect^2)`` each, independent of everything else.  IEMOCAP: a second, weaker expression of
     the emotion, ``k * (centre + spread * noise)`` with ``k = private_affect / spread``.
   - The utterance's affect is their sum: ``s = s_c + s_p``, ``alpha = alpha_c + alpha_p``.  With
     ``private_affect = 0`` there is no voice-only affect, and ``audio_shared`` only scales the audio's affect.
2. Label (a noisy reading of the whole affect).
   - MOSI / MOSEI: ``n_annotators`` annotators each rate ``clip(round(s + e), -3, 3)`` with
     ``e ~ N(0, annotator_noise^2)``; the label is their mean (so it lives on a grid and can be exactly 0).
   - IEMOCAP: the (4, 2) one-hot of ``c`` (which the voice-only affect also reflects).
3. Time.  A duration (log-normal, dataset-specific); words at a speaking rate; audio and vision frames at their
   own sampling rates (unaligned) or on the word slots (aligned).  Sequences are zero-padded at the front and
   truncated at the file's sequence length, as in the MulT files.
4. Trajectories in continuous time.  Each affect part drifts within the utterance:
   ``z_sc(t) = s_c + wiggle * w(t)``, ``z_ac(t) = alpha_c + wiggle * w'(t)``, and the voice-only parts
   ``z_sp(t)``, ``z_ap(t)`` likewise (their wiggle scaled by ``private_affect / std(s_c)``, so every part has the
   same within- to between-utterance ratio).  Nuisance streams ``n_l(t)`` (topic, wording), ``n_v(t)`` (pose,
   lighting) and ``p_a(t)`` (voice quality), three dimensions each.  Every ``w`` and ``n`` is a smooth zero-mean
   unit-variance process (a sum of random slow cosines).
5. What each modality sees, per frame: affect part + nuisance part + unit Gaussian noise per dimension, each part
   mapped to the feature width by fixed random unit-norm directions, so a knob's effect does not depend on the
   width:
   - language: affect ``informativeness_l * (z_sc(t), 0.3 z_ac(t))``,  nuisance ``structure * n_l(t)``;
   - vision:   affect ``informativeness_v * (z_sc(t), z_ac(t))``,      nuisance ``structure * n_v(t)``;
   - audio:    affect ``informativeness_a * g(t)`` with, for sentiment and arousal alike,
     ``g(t) = sqrt(audio_shared) * z_c(t) / sd_c + sqrt(1 - audio_shared) * z_p(t) / sd_p`` (each trajectory
     standardised): the first term is the **shared** part of audio's label-relevant signal (the same trajectory
     language and vision see), the second the **private** part (nothing language or vision see).
     Nuisance ``structure * u(t)``, ``u = sqrt(nuisance_shared) * h + sqrt(1 - nuisance_shared) * p_a`` with
     ``h(t) = tanh(B_h [n_l(t), n_v(t)])`` (standardised): a function of the streams language and vision see.
   Language and vision never see the voice-only affect.  Strengths: the best linear reading of one frame
   recovers about a tenth of its affect's variance in language (amplitude 0.22 in 300 dimensions) and in the
   audio (amplitude 0.5, of which the part outside the 3 nuisance directions of its 5 dimensions survives).  The
   audio is low-dimensional, so that reading is learnt from few examples; language's must be found among 300
   dimensions, which is what noisy or scarce labels make hard.

What the story predicts (written before any model is run; notebook 4 shows each beside its outcome)
----------------------------------------------------------------------------------------------------
P1. ``audio_shared = 0``: audio's label-relevant signal is independent of language and vision, so f'_A (a
    function of them) can recover none of it (probe R^2 ~ 0), and kt cannot beat language+vision except by
    regularisation, which a placebo target (audio shuffled across utterances) gives as well.
P2. ``audio_shared`` > 0: the shared part of audio's affect is recoverable from language and vision, and the
    probe R^2 of f'_A to it rises with the knob.  kt can beat language+vision only where the labels are the
    bottleneck (noisy labels, few utterances): there the consistency loss is dense, frame-level supervision of
    the very directions in language and vision that carry the affect.
P3. The gain shrinks as the training set grows: with enough labels, language+vision learns those directions
    from the labels alone.  At test time both see the same inputs, so neither can exceed the language+vision
    oracle (``Simulation.ceiling_lv``).
P4. ``full`` (real audio at test) is never worse than kt in expectation; its lead grows as ``audio_shared``
    falls, because then the audio carries affect (the voice-only part) that language and vision cannot.

Ground truth and noise ceilings
-------------------------------
``Simulation.truth`` holds, per split, the latent affect (both parts), the emotion, durations and lengths, and
per audio frame the shared and private parts of audio's label-relevant signal (``audio_affect_shared``,
``audio_affect_private``, (N, T_a, 2): sentiment, arousal, zero on padding; their sum times ``informativeness_a``
is what the audio's features carry of the affect), the nuisance ``u`` (``audio_nuisance``) and its part
``sqrt(nuisance_shared) * h`` that is a function of what language and vision see (``audio_nuisance_shared``).
Two oracles: ``oracle`` knows the whole affect
(``E[label | s]`` for regression, the Bayes posterior of the emotion for IEMOCAP) and ``oracle_lv`` only its
common part (what a model of language and vision could at best know).  ``Simulation.ceiling`` and
``Simulation.ceiling_lv`` give their metrics per split; no model beats them in expectation (exactly so for
squared error, approximately for the other metrics).

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
_EMOTION_SPREAD = 0.75  # std of the common affect around its emotion's centre
_TIMING = {  # median duration (s), log-normal sigma, words per second, audio Hz, vision Hz
    "mosi": (3.5, 0.55, 3.0, 38.0, 50.0),
    "mosei": (6.5, 0.50, 2.8, 30.0, 30.0),
    "iemocap": (3.8, 0.60, 2.6, 34.0, 43.0),
}
VERSION = 4  # bump when the generative story changes: it is part of the simulator cache key
_N_COSINES = 4  # components of each smooth process
_N_STRUCTURE = 3  # dimensions of each modality's nuisance stream
_CHUNK = 1024  # utterances generated at a time (bounds memory; part of the random-stream keys)
# Indices of the smooth processes: common sentiment and arousal wiggles, voice-only ones, n_l, n_v, p_a.
_P_SC, _P_AC, _P_SP, _P_AP = 0, 1, 2, 3
_P_L, _P_V, _P_A = slice(4, 7), slice(7, 10), slice(10, 13)
_N_PROCESSES = 13
MAX_TRAIN_SCALE = 20.0


@dataclass(frozen=True)
class SimConfig:
    """Every knob of the simulator.  ``preset(dataset, alignment)`` gives the defaults for a dataset."""

    dataset: str = "mosi"  # mosi | mosei | iemocap: widths, lengths, split sizes and label type
    alignment: str = "aligned"  # aligned (all modalities on word slots) | unaligned (own sampling rates)
    scale: float = 1.0  # fraction of the published split sizes (at least 8 utterances per split)
    train_scale: float = 1.0  # the training split's size relative to the scaled published one (0, 20]
    seed: int = 0  # same seed, same bytes
    informativeness_l: float = 0.22  # per-frame affect amplitude of language (noise: 1 per dimension)
    informativeness_v: float = 0.12  # ... of vision
    informativeness_a: float = 0.5  # ... of audio: per frame as readable as language's (see the docstring)
    audio_shared: float = 0.8  # kappa in [0, 1]: share of audio's label-relevant signal that L and V also see
    private_affect: float = 0.6  # std of the voice-only affect (s_p, alpha_p), which only the audio carries
    nuisance_shared: float = 0.5  # share of audio's nuisance that is a function of what L and V see
    structure: float = 1.5  # amplitude of each modality's nuisance (topic, pose, voice quality)
    wiggle: float = 0.5  # within-utterance variation of the common affect (std)
    annotator_noise: float = 0.8  # std of one annotator's rating error (MOSI / MOSEI): label noise

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        get_layout(self.dataset, self.alignment)  # validates alignment with a clear message
        for name, meaning in (("audio_shared", "share of audio's label-relevant signal that language and vision "
                                               "also see"),
                              ("nuisance_shared", "share of audio's nuisance that is a function of what language "
                                                  "and vision see")):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1] ({meaning}), got {value}")
        if not 0.0 < self.scale <= 1.0:
            raise ValueError(f"scale must lie in (0, 1] (fraction of the published split sizes), got {self.scale}")
        if not 0.0 < self.train_scale <= MAX_TRAIN_SCALE:
            raise ValueError(f"train_scale must lie in (0, {MAX_TRAIN_SCALE:g}] (training-set size relative to the "
                             f"scaled published one), got {self.train_scale}")
        for name in ("informativeness_l", "informativeness_v", "informativeness_a", "structure", "wiggle",
                     "annotator_noise", "private_affect"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")

    @property
    def layout(self) -> Layout:
        return get_layout(self.dataset, self.alignment)

    def split_sizes(self) -> dict[str, int]:
        sizes = {s: max(8, round(n * self.scale)) for s, n in self.layout.split_sizes.items()}
        sizes["train"] = max(8, round(self.layout.split_sizes["train"] * self.scale * self.train_scale))
        return sizes


def preset(dataset: str = "mosi", alignment: str = "aligned", **overrides) -> SimConfig:
    """The default simulation of ``dataset`` (mosi | mosei | iemocap) x ``alignment``, with any knob overridden."""
    return SimConfig(dataset=dataset, alignment=alignment, **overrides)


# Named regimes of the story (knob overrides), used by the notebooks and the experiments.
REGIMES = {
    "default": {},
    "labels_bottleneck": {"annotator_noise": 1.5, "train_scale": 0.25},  # noisy labels, a quarter of them
}


# The story's predictions (module docstring), keyed as in notebook 4 and docs/results.md.
PREDICTIONS = {
    "P1": "audio_shared = 0: kt gains nothing over its placebo (no interval excludes zero in kt's favour); the probe "
          "of f'_A recovers none of the audio's label-relevant signal (R^2 <= 0.05)",
    "P2": "labels the bottleneck (noisy labels, few utterances), audio_shared > 0: kt with a target that carries "
          "the audio's affect beats language+vision and its placebo",
    "P3": "the gain over language+vision shrinks as the training set grows",
    "P4": "full (real audio at test) is not worse than kt, and its lead is larger at audio_shared = 0",
}


@dataclass
class Simulation:
    """A simulated dataset: ``raw`` in the MulT file layout, plus ground truth the real files do not have."""

    config: SimConfig
    raw: dict[str, dict[str, np.ndarray]]  # {split: {text, audio, vision, labels, id}}
    truth: dict[str, dict[str, np.ndarray]]  # {split: {sentiment, arousal, ..., oracle, oracle_lv}}
    ceiling: dict[str, dict[str, float]]  # {split: metrics of the oracle (the whole affect)}
    ceiling_lv: dict[str, dict[str, float]] | None = None  # {split: metrics of the oracle of the common affect}
    seconds: float = 0.0  # generation time


def simulate(config: SimConfig) -> Simulation:
    """Generate a dataset following the story in the module docstring."""
    start = time.perf_counter()
    world = _World(config)
    raw, truth, ceiling, ceiling_lv = {}, {}, {}, {}
    task = config.layout.task
    for split_id, (split, n) in enumerate(config.split_sizes().items()):
        raw[split], truth[split] = _simulate_split(config, world, split_id, split, n)
        ceiling[split] = metrics.task_metrics(truth[split]["oracle"], raw[split]["labels"], task)
        ceiling_lv[split] = metrics.task_metrics(truth[split]["oracle_lv"], raw[split]["labels"], task)
    return Simulation(config, raw, truth, ceiling, ceiling_lv, seconds=time.perf_counter() - start)


def common_affect_std(dataset: str) -> tuple[float, float]:
    """Population std of the common sentiment ``s_c`` and arousal ``alpha_c`` (closed form)."""
    if dataset == "iemocap":
        centre, p = np.asarray(_EMOTION_CENTRE), np.asarray(_EMOTION_PRIOR)
        var = (p[:, None] * centre**2).sum(0) - ((p[:, None] * centre).sum(0)) ** 2 + _EMOTION_SPREAD**2
        return float(math.sqrt(var[0])), float(math.sqrt(var[1]))
    weights, means, sds = (np.asarray(x) for x in _SENTIMENT_MIXTURE[dataset])
    var_s = float((weights * (sds**2 + means**2)).sum() - (weights * means).sum() ** 2)
    abs_var = float((weights * (sds**2 + means**2)).sum()) - _mean_abs_mixture(weights, means, sds) ** 2
    return math.sqrt(var_s), math.sqrt(0.25 * abs_var + 0.7**2)


def _mean_abs_mixture(weights, means, sds) -> float:
    """E|s| for a Gaussian mixture (folded-normal means)."""
    total = 0.0
    for w, mu, sd in zip(weights, means, sds, strict=True):
        folded = sd * math.sqrt(2 / math.pi) * math.exp(-mu**2 / (2 * sd**2)) + mu * math.erf(mu / (sd * math.sqrt(2)))
        total += w * folded
    return total


class _World:
    """The fixed parts of one simulated world: loadings, shared across splits."""

    def __init__(self, config: SimConfig):
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, 1000]))
        dims = config.layout.feature_dims

        def directions(k: int, d: int) -> np.ndarray:  # k random unit-norm directions in R^d
            w = rng.standard_normal((k, d))
            return (w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32)

        self.w_l, self.u_l = directions(2, dims["l"]), directions(_N_STRUCTURE, dims["l"])  # affect, nuisance
        self.w_v, self.u_v = directions(2, dims["v"]), directions(_N_STRUCTURE, dims["v"])
        self.w_a, self.u_a = directions(2, dims["a"]), directions(_N_STRUCTURE, dims["a"])
        # h = tanh(B_h [n_l, n_v]): B_h's columns scaled so each pre-activation has unit variance (tanh mildly
        # non-linear); h is then standardised with constants from a Monte Carlo (fixed per world).
        self.b_h = rng.standard_normal((2 * _N_STRUCTURE, _N_STRUCTURE))
        self.b_h /= np.linalg.norm(self.b_h, axis=0, keepdims=True)
        h = np.tanh(rng.standard_normal((20000, 2 * _N_STRUCTURE)) @ self.b_h)
        self.h_mean, self.h_std = h.mean(0), h.std(0)
        # Standardisation of audio's affect trajectories: common (s_c, alpha_c) and voice-only parts.
        sd_c = np.array(common_affect_std(config.dataset))  # std of s_c, alpha_c
        self.sd_common = np.sqrt(sd_c**2 + config.wiggle**2)
        # std of s_p, alpha_p: private_affect (MOSI / MOSEI), or k * std of (centre + spread * noise) (IEMOCAP)
        sd_p = sd_c * config.private_affect / _EMOTION_SPREAD if config.dataset == "iemocap" else \
            np.full(2, config.private_affect)
        self.private_wiggle = config.wiggle * sd_p / sd_c
        self.sd_private = np.sqrt(sd_p**2 + self.private_wiggle**2)


def _affect(dataset: str, rng: np.random.Generator, n: int):
    """Latent common sentiment, arousal and (IEMOCAP) emotion index for ``n`` utterances."""
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


def emotion_posterior(s: np.ndarray, alpha: np.ndarray, spread: float = _EMOTION_SPREAD,
                      voice: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """P(emotion | s, alpha) when (s, alpha) scatter with std ``spread`` around the emotion's centre: (N, 4).

    ``voice``: a second, independent view (s', alpha') of the same centre with the same spread (the voice-only
    expression of the emotion, rescaled), whose evidence is added.
    """
    centre = np.asarray(_EMOTION_CENTRE)
    d2 = (s[:, None] - centre[None, :, 0]) ** 2 + (alpha[:, None] - centre[None, :, 1]) ** 2
    if voice is not None:
        d2 = d2 + (voice[0][:, None] - centre[None, :, 0]) ** 2 + (voice[1][:, None] - centre[None, :, 1]) ** 2
    logp = np.log(_EMOTION_PRIOR)[None, :] - d2 / (2 * spread**2)
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


def _labels(config: SimConfig, rng, s, alpha, s_c, alpha_c, emotion):
    """Labels (step 2) and the two oracles' predictions: knowing (s, alpha), or only the common part."""
    n = len(s)
    if config.dataset == "iemocap":
        labels = np.zeros((n, 4, 2), dtype=np.float32)
        labels[np.arange(n)[:, None], np.arange(4)[None, :], (emotion[:, None] == np.arange(4)).astype(int)] = 1
        def logits(post):  # (N, 4) posterior -> (N, 4, 2) log-probabilities of (no, yes)
            return np.log(np.stack([1 - post, post], axis=-1).clip(1e-9, None)).astype(np.float32)

        k = config.private_affect / _EMOTION_SPREAD  # the voice-only view is k * (centre + spread * noise)
        voice = ((s - s_c) / k, (alpha - alpha_c) / k) if k > 0 else None
        return labels, logits(emotion_posterior(s_c, alpha_c, voice=voice)), logits(emotion_posterior(s_c, alpha_c))
    k = _N_ANNOTATORS[config.dataset]
    ratings = np.clip(np.round(s[:, None] + config.annotator_noise * rng.standard_normal((n, k))), -3, 3)
    labels = ratings.mean(1).astype(np.float32).reshape(n, 1, 1)
    oracle = expected_rating(s, config.annotator_noise).astype(np.float32)
    # Knowing s_c only: s = s_c + s_p with s_p Gaussian, so s + e given s_c is Gaussian with both variances.
    oracle_lv = expected_rating(s_c, math.hypot(config.annotator_noise, config.private_affect)).astype(np.float32)
    return labels, oracle, oracle_lv


@dataclass
class _Affect:
    """One split's affect (step 1) and labels (step 2): common and voice-only parts, per sample."""

    s_c: np.ndarray  # (N,) sentiment that every modality sees
    alpha_c: np.ndarray  # (N,) arousal that every modality sees
    s_p: np.ndarray  # (N,) the voice's own part
    alpha_p: np.ndarray
    emotion: np.ndarray  # (N,) IEMOCAP's emotion, -1 for MOSI / MOSEI
    labels: np.ndarray
    oracle: np.ndarray  # knows (s, alpha)
    oracle_lv: np.ndarray  # knows only the common affect


def _split_affect(config: SimConfig, rng, split_id: int, n: int) -> _Affect:
    s_c, alpha_c, emotion = _affect(config.dataset, rng, n)
    private = np.random.default_rng(np.random.SeedSequence([config.seed, split_id, 2]))
    if config.dataset == "iemocap":  # the voice's own, weaker expression of the emotion
        k = config.private_affect / _EMOTION_SPREAD
        s_p, alpha_p = k * (np.asarray(_EMOTION_CENTRE)[emotion].T + _EMOTION_SPREAD * private.standard_normal((2, n)))
    else:  # MOSI / MOSEI: sentiment the voice alone gives away, independent of everything else
        s_p, alpha_p = config.private_affect * private.standard_normal((2, n))
    s_c, alpha_c, s_p, alpha_p = (x.astype(np.float32) for x in (s_c, alpha_c, s_p, alpha_p))
    labels, oracle, oracle_lv = _labels(config, rng, s_c + s_p, alpha_c + alpha_p, s_c, alpha_c, emotion)
    return _Affect(s_c, alpha_c, s_p, alpha_p, emotion, labels, oracle, oracle_lv)


def _split_timing(config: SimConfig, rng, n: int):
    """Timing (step 3) and the smooth processes' parameters (step 4): duration (N,), {m: (times (N, T), valid
    (N, T), n_frames (N,))}, freq and phase (N, P, K)."""
    layout = config.layout
    median, sigma, wps, audio_hz, vision_hz = _TIMING[config.dataset]
    duration = median * np.exp(sigma * rng.standard_normal(n))
    n_words = np.clip(np.round(duration * wps * rng.uniform(0.8, 1.2, n)), 1, None).astype(int)
    word_gap = duration / n_words
    freq = rng.uniform(0.1, 1.5, (n, _N_PROCESSES, _N_COSINES)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, (n, _N_PROCESSES, _N_COSINES)).astype(np.float32)
    seq = layout.seq_lens
    frames = {}
    for m in MODALITIES:
        if layout.alignment == "aligned" or m == "l":
            count = np.minimum(n_words, seq[m])
            frames[m] = (*_frame_times(count, seq[m], word_gap, centred=True), count)
        else:
            hz = audio_hz if m == "a" else vision_hz
            count = np.clip(np.floor(duration * hz), 1, seq[m]).astype(int)
            frames[m] = (*_frame_times(count, seq[m], np.full(n, 1.0 / hz), centred=False), count)
    return duration, frames, freq, phase


def _audio_chunk(config: SimConfig, world: _World, proc, z_c, voice_only) -> tuple[np.ndarray, dict]:
    """Audio features of one chunk before noise (n, T, D_a) and the audio's ground truth per frame."""
    kappa, rho = config.audio_shared, config.nuisance_shared
    z_p = voice_only[:, None, :] + world.private_wiggle.astype(np.float32) * proc[..., [_P_SP, _P_AP]]
    shared = math.sqrt(kappa) * z_c / world.sd_common.astype(np.float32)  # (n, T, 2)
    own = (math.sqrt(1 - kappa) * z_p / world.sd_private.astype(np.float32)
           if config.private_affect > 0 else np.zeros_like(z_p))
    seen = np.concatenate([proc[..., _P_L], proc[..., _P_V]], -1)  # (n, T, 6) streams V and L see
    h = (np.tanh(_project(seen, world.b_h)) - world.h_mean) / world.h_std  # (n, T, 3)
    u = math.sqrt(rho) * h + math.sqrt(1 - rho) * proc[..., _P_A]  # (n, T, 3)
    truth = {"audio_affect_shared": shared, "audio_affect_private": own, "audio_nuisance": u,
             "audio_nuisance_shared": math.sqrt(rho) * h}
    x = config.informativeness_a * _project(shared + own, world.w_a)
    x += config.structure * _project(u, world.u_a)
    return x, truth


def _chunk_features(config: SimConfig, world: _World, m: str, proc, z_c, voice_only):
    """Features of modality m for one chunk before noise, (n, T, D_m), and (audio only) its ground truth."""
    if m == "l":
        x = config.informativeness_l * _project(z_c * np.float32([1.0, 0.3]), world.w_l)
        return x + config.structure * _project(proc[..., _P_L], world.u_l), {}
    if m == "v":
        x = config.informativeness_v * _project(z_c, world.w_v)
        return x + config.structure * _project(proc[..., _P_V], world.u_v), {}
    return _audio_chunk(config, world, proc, z_c, voice_only)


def _split_features(config: SimConfig, world: _World, split_id: int, affect: _Affect, frames, freq, phase):
    """Every modality's features (step 5), chunk by chunk, {m: (N, T_m, D_m)}, and the audio's ground truth."""
    layout, n = config.layout, len(affect.s_c)
    out = {m: np.zeros((n, layout.seq_lens[m], layout.feature_dims[m]), dtype=np.float32) for m in MODALITIES}
    audio_truth = {k: np.zeros((n, layout.seq_lens["a"], width), dtype=np.float32) for k, width in (
        ("audio_affect_shared", 2), ("audio_affect_private", 2), ("audio_nuisance", 3),
        ("audio_nuisance_shared", 3))}
    kappa, rho = config.audio_shared, config.nuisance_shared
    # The smooth processes each modality needs (the cosines are most of the cost).
    audio_needs = ([_P_SC, _P_AC] if kappa > 0 else []) + ([_P_SP, _P_AP] if kappa < 1 else []) + \
                  list(range(4, 10)) + (list(range(10, 13)) if rho < 1 else [])  # n_l, n_v: for the truth h too
    used = {"l": [_P_SC, _P_AC, *range(4, 7)], "v": [_P_SC, _P_AC, *range(7, 10)], "a": audio_needs}
    common = np.stack([affect.s_c, affect.alpha_c], -1)  # (N, 2)
    voice_only = np.stack([affect.s_p, affect.alpha_p], -1)
    for m_id, m in enumerate(MODALITIES):
        times, valid, _ = frames[m]
        for c_id, lo in enumerate(range(0, n, _CHUNK)):
            hi = min(n, lo + _CHUNK)
            noise_rng = np.random.default_rng(np.random.SeedSequence([config.seed, split_id, 1, m_id, c_id]))
            proc = np.zeros((hi - lo, times.shape[1], _N_PROCESSES), dtype=np.float32)  # (n, T, P)
            proc[..., used[m]] = _smooth(freq[lo:hi, used[m]], phase[lo:hi, used[m]], times[lo:hi])
            z_c = common[lo:hi, None, :] + config.wiggle * proc[..., [_P_SC, _P_AC]]  # (n, T, 2) s_c(t), alpha_c(t)
            x, truth = _chunk_features(config, world, m, proc, z_c, voice_only[lo:hi])
            real = valid[lo:hi]  # noise only on real frames; padding frames are exactly zero
            for key, value in truth.items():
                audio_truth[key][lo:hi] = np.where(real[..., None], value, 0)
            x[real] += noise_rng.standard_normal((int(real.sum()), x.shape[-1]), dtype=np.float32)
            x[~real] = 0
            out[m][lo:hi] = x
    return out, audio_truth


def _simulate_split(config: SimConfig, world: _World, split_id: int, split: str, n: int):
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, split_id, 0]))
    affect = _split_affect(config, rng, split_id, n)
    duration, frames, freq, phase = _split_timing(config, rng, n)
    out, audio_truth = _split_features(config, world, split_id, affect, frames, freq, phase)
    ids = np.array([f"sim-{config.dataset}-{split}-{i:05d}" for i in range(n)])
    raw = {FILE_KEYS[m]: out[m] for m in MODALITIES}
    raw.update(labels=affect.labels, id=ids)
    truth = {
        "sentiment": affect.s_c + affect.s_p,  # the whole affect: s = s_c + s_p
        "arousal": affect.alpha_c + affect.alpha_p,
        "sentiment_common": affect.s_c,  # what language, vision (and to the share audio_shared the audio) see
        "arousal_common": affect.alpha_c,
        "emotion": affect.emotion.astype(np.int64),  # -1 for MOSI / MOSEI
        "duration": duration.astype(np.float32),
        **{f"len_{m}": frames[m][2] for m in MODALITIES},
        **audio_truth,  # per audio frame (N, T_a, k), zero on padding: see the module docstring
        "oracle": affect.oracle,  # knows (s, alpha)
        "oracle_lv": affect.oracle_lv,  # knows only the common affect (s_c, alpha_c)
    }
    return raw, truth
