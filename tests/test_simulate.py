"""Tests of ktlib.simulate: determinism, the published shapes, front zero-padding, the label models, the knobs of
the generative story (audio_shared, private_affect, nuisance_shared, train_scale, informativeness), the two noise
ceilings (the whole affect, and language + vision's part of it) and config validation.

Statistical checks use fixed seeds, so every number is deterministic; the thresholds were checked empirically
(the measured values are in the comment beside each one) and leave a clear margin either side.
"""

import functools
import hashlib
import math
import pickle

import numpy as np
import pytest
from threadpoolctl import threadpool_limits  # installed with scikit-learn (umap-learn's dependency)

from ktlib import metrics
from ktlib.simulate import REGIMES, SimConfig, emotion_posterior, expected_rating, preset, simulate
from ktlib.specs import EMOTIONS, FILE_KEYS, MODALITIES, SPLITS

# Small scales keep every preset fast; MOSEI's published splits are 10x MOSI's.
SMALL_SCALE = {"mosi": 0.02, "mosei": 0.003, "iemocap": 0.02}
PRESETS = [(d, a) for d in ("mosi", "mosei", "iemocap") for a in ("aligned", "unaligned")]
PRESET_IDS = [f"{d}-{a}" for d, a in PRESETS]


@functools.cache
def _sim(config: SimConfig):
    """One simulation per config for the whole module (SimConfig is frozen, hence hashable)."""
    return simulate(config)


def _small(dataset: str, alignment: str, **knobs):
    return _sim(preset(dataset, alignment, scale=SMALL_SCALE[dataset], **knobs))


# ---------------------------------------------------------------------------------------------------------
# Linear probes: closed-form ridge regression, fitted on one part of the utterances and scored on another.


def _ridge_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, lam: float) -> np.ndarray:
    """Closed-form ridge regression (intercept unpenalised): fit on (x_train, y_train), predict x_test."""
    x_train, x_test = x_train.astype(np.float64), x_test.astype(np.float64)
    y_train = y_train.astype(np.float64).reshape(len(y_train), -1)
    x_mean, y_mean = x_train.mean(0), y_train.mean(0)
    xc = x_train - x_mean
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(xc.shape[1]), xc.T @ (y_train - y_mean))
    return (x_test - x_mean) @ w + y_mean


def _r2(truth: np.ndarray, pred: np.ndarray) -> float:
    """R^2 pooled over the columns of (N, k) arrays."""
    return float(1 - ((truth - pred) ** 2).sum() / ((truth - truth.mean(0)) ** 2).sum())


class _RidgeProbe:
    """Ridge regression from fixed features ``x`` (one row per frame or utterance) to any target, held-out R^2.

    Rows are split by utterance, so no utterance is on both sides: the first half of the utterances trains, the
    second half is held out.  The penalty is chosen on the training half alone (fit on three quarters of its
    utterances, score on the fourth), then refitted on the whole training half.  One eigendecomposition per fit
    makes every penalty and every target cheap, so one probe serves all the targets of a world.
    """

    PENALTIES = (1.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)

    def __init__(self, x: np.ndarray, utterance: np.ndarray):
        test = utterance >= (int(utterance.max()) + 1) // 2
        select = ~test & (utterance % 4 == 0)
        self.rows = {"fit": ~test & ~select, "select": select, "test": test}  # a partition of the rows
        self.x = {part: x[rows].astype(np.float64) for part, rows in self.rows.items()}
        # One BLAS thread, here and in r2: a 640 x 640 eigendecomposition then takes 0.1 s, where threaded BLAS
        # competing with other processes for two cores took 8 s.
        with threadpool_limits(limits=1, user_api="blas"):
            self._fits = {"fit": self._decompose(("fit",)), "train": self._decompose(("fit", "select"))}

    def _decompose(self, parts: tuple[str, ...]):
        n = sum(len(self.x[p]) for p in parts)
        mean = sum(self.x[p].sum(0) for p in parts) / n
        gram = sum((self.x[p] - mean).T @ (self.x[p] - mean) for p in parts)
        evals, evecs = np.linalg.eigh(gram)
        return parts, mean, evals, evecs

    def _predictions(self, fit, y: dict, penalties, x_new: np.ndarray) -> list[np.ndarray]:
        """Predictions for ``x_new`` of the ridge fitted on ``fit``'s rows, one per penalty."""
        parts, x_mean, evals, evecs = fit
        y_mean = np.concatenate([y[p] for p in parts]).mean(0)
        xty = sum(self.x[p].T @ (y[p] - y_mean) for p in parts)  # x'y of the centred data
        rotated = evecs.T @ xty
        x_new = (x_new - x_mean) @ evecs
        return [x_new @ (rotated / (evals + lam)[:, None]) + y_mean for lam in penalties]

    def r2(self, y: np.ndarray) -> tuple[float, float]:
        """Held-out R^2 (pooled over y's columns) of the probe to ``y``, and the penalty it chose."""
        y = y.astype(np.float64).reshape(len(y), -1)
        y = {part: y[rows] for part, rows in self.rows.items()}
        with threadpool_limits(limits=1, user_api="blas"):
            scores = [_r2(y["select"], pred)
                      for pred in self._predictions(self._fits["fit"], y, self.PENALTIES, self.x["select"])]
            lam = self.PENALTIES[int(np.argmax(scores))]
            (pred,) = self._predictions(self._fits["train"], y, [lam], self.x["test"])
        return _r2(y["test"], pred), lam


AUDIO_TRUTH = ("audio_affect_shared", "audio_affect_private", "audio_nuisance", "audio_nuisance_shared")


def _frame_view(sim, with_lv: bool = True) -> dict[str, np.ndarray]:
    """Real frames of every split of an aligned simulation (all modalities share the word slots).

    Keys: ``lv`` (F, 2 x (300 + 20)): each frame's language and vision features beside their mean over its
    utterance's real frames (what a model of the two could use at that frame); ``audio`` (F, 5); the four audio
    truth arrays (F, k); ``affect`` (F, 2): the utterance's whole [s, alpha]; ``utterance`` (F,): its index,
    numbered across splits; ``lv_digest``: a hash of the language and vision files, to show two worlds share them.
    """
    view = {key: [] for key in ("lv", "audio", *AUDIO_TRUTH, "affect", "utterance")}
    digest, offset = hashlib.sha256(), 0
    for split in SPLITS:
        raw, truth = sim.raw[split], sim.truth[split]
        digest.update(raw["text"].tobytes())
        digest.update(raw["vision"].tobytes())
        real = (raw["text"] != 0).any(-1)  # (N, T)
        if with_lv:
            lv = np.concatenate([raw["text"], raw["vision"]], -1)
            mean = lv.sum(1) / real.sum(1)[:, None]
            view["lv"].append(np.concatenate([lv, np.broadcast_to(mean[:, None], lv.shape)], -1)[real])
        view["audio"].append(raw["audio"][real])
        for key in AUDIO_TRUTH:
            view[key].append(truth[key][real])
        per_utterance = np.stack([truth["sentiment"], truth["arousal"]], -1)[:, None, :]  # (N, 1, 2)
        view["affect"].append(np.broadcast_to(per_utterance, (*real.shape, 2))[real])
        view["utterance"].append(np.broadcast_to(offset + np.arange(len(real))[:, None], real.shape)[real])
        offset += len(real)
    view = {key: np.concatenate(parts) for key, parts in view.items() if parts}
    view["lv_digest"] = digest.hexdigest()
    return view


def _utterance_means(values: np.ndarray, utterance: np.ndarray) -> np.ndarray:
    """Mean of per-frame ``values`` (F, k) over each utterance's frames: (N, k)."""
    values = values.astype(np.float64).reshape(len(values), -1)
    counts = np.bincount(utterance)
    return np.stack([np.bincount(utterance, weights=v) for v in values.T], -1) / counts[:, None]


# The worlds in which the audio's parts are probed: MOSI aligned at half the published size (about 1100
# utterances, 13000 frames: enough for a 640-feature probe).  Only the per-frame views are kept, not the
# simulations (70 MB each).
STORY_SCALE = 0.5
STORY_SEEDS = (0, 1, 2)


@functools.cache
def _story_world(seed: int) -> tuple[_RidgeProbe, dict]:
    """The default world of ``seed``: the L+V probe (from its language and vision) and its frame view."""
    view = _frame_view(simulate(preset("mosi", "aligned", scale=STORY_SCALE, seed=seed)))
    probe = _RidgeProbe(view.pop("lv"), view["utterance"])
    return probe, view


@functools.cache
def _story_frames(seed: int, **knobs) -> dict:
    """Frame view (without L+V features) of the world of ``seed`` with ``knobs`` overridden."""
    if not knobs:
        return _story_world(seed)[1]
    return _frame_view(simulate(preset("mosi", "aligned", scale=STORY_SCALE, seed=seed, **knobs)), with_lv=False)


def _lv_probe(seed: int, view: dict) -> _RidgeProbe:
    """The L+V probe of ``seed``'s world, after checking ``view`` has the very same language and vision files."""
    probe, default = _story_world(seed)
    assert view["lv_digest"] == default["lv_digest"], "the knob changed what language and vision see"
    return probe


def _residual_after_affect(signal: np.ndarray, affect: np.ndarray) -> np.ndarray:
    """What is left of a per-frame signal after a least-squares fit on [1, s, alpha]."""
    design = np.c_[np.ones(len(affect)), affect].astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, signal.astype(np.float64), rcond=None)
    return signal - design @ coef


def _pooled(raw_split: dict, keys=("text",)) -> np.ndarray:
    """Mean over real frames of each utterance, concatenated over ``keys``: (N, sum of widths)."""
    out = []
    for key in keys:
        x = raw_split[key].astype(np.float64)
        real = (x != 0).any(-1)
        out.append(x.sum(1) / real.sum(1, keepdims=True))
    return np.concatenate(out, -1)


# ---------------------------------------------------------------------------------------------------------
# Determinism


def test_same_config_gives_identical_arrays_and_pickle_bytes():
    config = preset("mosi", "unaligned", scale=0.02, seed=3)
    first, second = simulate(config), simulate(config)
    for split in SPLITS:
        assert first.raw[split].keys() == second.raw[split].keys()
        for key, value in first.raw[split].items():
            np.testing.assert_array_equal(value, second.raw[split][key], err_msg=f"{split}/{key}")
        for key, value in first.truth[split].items():
            np.testing.assert_array_equal(value, second.truth[split][key], err_msg=f"truth {split}/{key}")
    assert pickle.dumps(first.raw, protocol=4) == pickle.dumps(second.raw, protocol=4)
    assert first.ceiling == second.ceiling


def test_different_seed_gives_different_data():
    a = simulate(preset("mosi", "aligned", scale=0.02, seed=0))
    b = simulate(preset("mosi", "aligned", scale=0.02, seed=1))
    assert pickle.dumps(a.raw, protocol=4) != pickle.dumps(b.raw, protocol=4)
    for key in ("text", "audio", "vision", "labels"):
        assert not np.array_equal(a.raw["train"][key], b.raw["train"][key]), key
    assert not np.array_equal(a.truth["train"]["sentiment"], b.truth["train"]["sentiment"])


# ---------------------------------------------------------------------------------------------------------
# Shapes and padding of every preset


@pytest.mark.parametrize(("dataset", "alignment"), PRESETS, ids=PRESET_IDS)
def test_preset_has_the_published_layout(dataset, alignment):
    sim = _small(dataset, alignment)
    layout = sim.config.layout
    sizes = sim.config.split_sizes()
    assert list(sim.raw) == list(SPLITS)
    for split in SPLITS:
        raw, n = sim.raw[split], sizes[split]
        assert set(raw) == {"text", "audio", "vision", "labels", "id"}
        for m in MODALITIES:
            x = raw[FILE_KEYS[m]]
            assert x.shape == (n, layout.seq_lens[m], layout.feature_dims[m]), (split, m)
            assert x.dtype == np.float32
            assert np.isfinite(x).all()
        assert raw["labels"].shape == (n, *layout.label_shape)
        assert raw["labels"].dtype == np.float32
        assert np.isfinite(raw["labels"]).all()
        assert raw["id"].shape == (n,) and raw["id"].dtype.kind == "U"
        assert len(set(raw["id"])) == n


def test_split_sizes_follow_scale_with_a_floor_of_eight():
    assert preset("mosi", scale=0.1).split_sizes() == {"train": 128, "valid": 23, "test": 69}
    assert preset("mosi", scale=0.001).split_sizes() == {"train": 8, "valid": 8, "test": 8}
    assert preset("mosei", scale=1.0).split_sizes() == {"train": 16265, "valid": 1869, "test": 4643}


def test_train_scale_sizes_only_the_training_split():
    # train: round(1284 x 0.1 x 0.25) = 32, round(1284 x 0.02 x 20) = 514 (the most allowed), round(2717 x 0.1 x 2)
    # = 543, and the floor of eight; valid and test exactly as without train_scale.
    assert preset("mosi", scale=0.1, train_scale=0.25).split_sizes() == {"train": 32, "valid": 23, "test": 69}
    assert preset("mosi", scale=0.02, train_scale=20).split_sizes() == {"train": 514, "valid": 8, "test": 14}
    assert preset("iemocap", scale=0.1, train_scale=2.0).split_sizes() == {"train": 543, "valid": 80, "test": 94}
    assert preset("mosi", scale=0.001, train_scale=0.5).split_sizes() == {"train": 8, "valid": 8, "test": 8}


def test_train_scale_leaves_valid_and_test_byte_identical():
    # Every split draws from its own random streams, so a bigger or smaller training set changes nothing else:
    # the same evaluation data at every train_scale, and the same world (the trained mapping is comparable).
    base = _small("mosi", "unaligned")
    for train_scale in (0.25, 3.0):  # 8 (the floor) and 77 training utterances instead of 26
        other = _small("mosi", "unaligned", train_scale=train_scale)
        assert len(other.raw["train"]["labels"]) == max(8, round(1284 * SMALL_SCALE["mosi"] * train_scale))
        for split in ("valid", "test"):
            for key, value in base.raw[split].items():
                np.testing.assert_array_equal(other.raw[split][key], value, err_msg=f"{train_scale} {split}/{key}")
            for key, value in base.truth[split].items():
                np.testing.assert_array_equal(other.truth[split][key], value, err_msg=f"{train_scale} {split}/{key}")
            assert other.ceiling[split] == pytest.approx(base.ceiling[split], nan_ok=True)
        assert other.raw["train"]["text"].shape[1:] == base.raw["train"]["text"].shape[1:]


def test_regimes_are_valid_knob_sets():
    assert REGIMES["default"] == {}
    assert REGIMES["labels_bottleneck"] == {"annotator_noise": 1.5, "train_scale": 0.25}
    for name, knobs in REGIMES.items():
        config = preset("mosi", scale=0.1, **knobs)  # every regime is a valid config
        assert config.split_sizes()["valid"] == preset("mosi", scale=0.1).split_sizes()["valid"], name
    assert preset("mosi", scale=0.1, **REGIMES["labels_bottleneck"]).split_sizes()["train"] == 32


@pytest.mark.parametrize(("dataset", "alignment"), PRESETS, ids=PRESET_IDS)
def test_front_zero_padding_matches_true_lengths(dataset, alignment):
    sim = _small(dataset, alignment)
    for split in SPLITS:
        raw, truth = sim.raw[split], sim.truth[split]
        for m in MODALITIES:
            x = raw[FILE_KEYS[m]]
            t = x.shape[1]
            nonzero = (x != 0).any(-1)  # (N, T): a real frame holds unit Gaussian noise, never all zeros
            length = truth[f"len_{m}"]
            expected_real = np.arange(t)[None, :] >= (t - length)[:, None]  # the last `length` slots
            np.testing.assert_array_equal(nonzero, expected_real, err_msg=f"{split}/{m}")
            assert (x[~expected_real] == 0).all()  # padding frames exactly zero
            assert ((length >= 1) & (length <= t)).all()
        # The noise-free audio truth (affect parts, nuisance and its shared part) is zero on padding frames too.
        audio_real = (raw["audio"] != 0).any(-1)
        for key in AUDIO_TRUTH:
            assert truth[key].shape == (*audio_real.shape, 3 if "nuisance" in key else 2), key
            assert (truth[key][~audio_real] == 0).all(), key


@pytest.mark.parametrize("dataset", ["mosi", "mosei", "iemocap"])
def test_aligned_modalities_share_lengths(dataset):
    sim = _small(dataset, "aligned")
    for split in SPLITS:
        truth = sim.truth[split]
        np.testing.assert_array_equal(truth["len_l"], truth["len_a"])
        np.testing.assert_array_equal(truth["len_l"], truth["len_v"])
        for key in ("audio", "vision"):
            np.testing.assert_array_equal((sim.raw[split][key] != 0).any(-1), (sim.raw[split]["text"] != 0).any(-1))


@pytest.mark.parametrize("dataset", ["mosi", "mosei", "iemocap"])
def test_unaligned_lengths_differ_from_text_and_vary(dataset):
    sim = _small(dataset, "unaligned")
    truth = sim.truth["train"]
    for m in ("a", "v"):
        lengths = truth[f"len_{m}"]
        assert (lengths != truth["len_l"]).mean() > 0.9, m  # own sampling rate, not the word slots
        assert len(np.unique(lengths)) > 5, m  # durations vary across utterances
        assert lengths.max() > sim.config.layout.seq_lens["l"]  # longer than the text sequence can be


# ---------------------------------------------------------------------------------------------------------
# Labels


def test_mosi_labels_live_on_a_grid_of_fifths_with_a_plausible_balance():
    sim = _sim(preset("mosi", "aligned", scale=0.2))
    labels = np.concatenate([sim.raw[s]["labels"].ravel() for s in SPLITS]).astype(np.float64)  # 440 labels
    assert labels.min() >= -3 and labels.max() <= 3
    np.testing.assert_allclose(labels * 5, np.round(labels * 5), atol=1e-4)  # mean of 5 integer ratings
    assert not np.allclose(labels * 5 % 5, 0)  # some are not integers: the labels really are averages
    assert (labels == 0).sum() >= 3  # exactly-zero labels exist (Non0 metrics drop them)
    assert 0.35 < (labels > 0).mean() < 0.6  # measured 0.425 (mean -0.20, std 1.45, 11 exact zeros)
    assert -0.6 < labels.mean() < 0.3  # slightly more negative than positive, as MOSI
    assert labels.std() > 1.0  # spread over the scale, not bunched at 0


def test_mosei_labels_live_on_a_grid_of_thirds():
    sim = _sim(preset("mosei", "aligned", scale=0.02))
    labels = np.concatenate([sim.raw[s]["labels"].ravel() for s in SPLITS]).astype(np.float64)
    assert labels.min() >= -3 and labels.max() <= 3
    np.testing.assert_allclose(labels * 3, np.round(labels * 3), atol=1e-4)
    assert not np.allclose(labels * 3 % 3, 0)
    assert (labels > 0).mean() > (labels < 0).mean()  # MOSEI leans positive


def test_regression_truth_has_no_emotion():
    truth = _small("mosi", "aligned").truth["train"]
    assert (truth["emotion"] == -1).all()
    assert truth["oracle"].shape == truth["sentiment"].shape


def test_iemocap_labels_are_one_hot_with_the_prior_class_shares():
    sim = _sim(preset("iemocap", "aligned", scale=0.5))  # 2226 utterances
    labels = np.concatenate([sim.raw[s]["labels"] for s in SPLITS])
    emotion = np.concatenate([sim.truth[s]["emotion"] for s in SPLITS])
    assert set(np.unique(labels)) == {0.0, 1.0}
    np.testing.assert_array_equal(labels.sum(-1), 1)  # one-hot over (no, yes) for every emotion
    yes = labels[:, :, 1]  # (N, 4)
    np.testing.assert_array_equal(yes.sum(1), 1)  # exactly one emotion per utterance
    np.testing.assert_array_equal(yes.argmax(1), emotion)  # and it is the latent emotion
    shares = yes.mean(0)
    np.testing.assert_allclose(shares, [0.38, 0.135, 0.24, 0.245], atol=0.035)  # sampling sd about 0.01
    assert EMOTIONS[int(shares.argmin())] == "happy"


# ---------------------------------------------------------------------------------------------------------
# audio_shared: how much of audio's label-relevant signal language and vision also see
#
# The probes below read each audio frame from language and vision: per real (aligned) frame, the frame's L and V
# features beside their utterance means, through a ridge whose penalty is chosen on training utterances only
# (see _RidgeProbe).  Worlds: MOSI aligned, scale 0.5, seeds 0, 1, 2; for one seed every knob value shares the
# same language and vision files (checked by hash), so one probe serves them all.


def test_audio_affect_parts_are_exactly_zero_where_the_knob_removes_them():
    # kappa = 0: no shared part; kappa = 1: no private part; private_affect = 0: no private part at any kappa.
    for knobs, zero in (({"audio_shared": 0.0}, "audio_affect_shared"), ({"audio_shared": 1.0}, "audio_affect_private"),
                        ({"private_affect": 0.0, "audio_shared": 0.5}, "audio_affect_private")):
        sim = _small("mosi", "unaligned", **knobs)
        for split in SPLITS:
            truth = sim.truth[split]
            assert (truth[zero] == 0).all(), (knobs, split)
            other = "audio_affect_private" if zero == "audio_affect_shared" else "audio_affect_shared"
            real = (sim.raw[split]["audio"] != 0).any(-1)
            assert (truth[other][real] != 0).all(), (knobs, split)  # the other part is there on every real frame


def test_audio_shared_is_the_shared_share_of_audio_affect_variance():
    # Both parts are standardised trajectories scaled by sqrt(kappa) and sqrt(1 - kappa), so the shared part's
    # share of the per-frame variance is kappa.  Measured (seeds 0, 1, 2): kappa 0.5 -> 0.501 / 0.492 / 0.499,
    # kappa 0.8 (default) -> 0.801 / 0.795 / 0.800; variance per dimension of the sum 0.98 to 1.03.
    for seed in STORY_SEEDS:
        for kappa, view in ((0.5, _story_frames(seed, audio_shared=0.5)), (0.8, _story_frames(seed))):
            shared = view["audio_affect_shared"].astype(np.float64).var(0).sum()
            private = view["audio_affect_private"].astype(np.float64).var(0).sum()
            assert shared / (shared + private) == pytest.approx(kappa, abs=0.04), (seed, kappa)
            assert (shared + private) / 2 == pytest.approx(1.0, abs=0.1), (seed, kappa)


def test_lv_probe_recovers_the_shared_part_and_nothing_of_the_private_part():
    # kappa = 1: the shared part is the common affect's trajectory, which language and vision carry: held-out R^2
    # 0.155 / 0.188 / 0.212 (seeds 0, 1, 2; penalty 1000 chosen each time).  kappa = 0: the private part is the
    # voice-only affect, independent of everything L and V see: -0.007 / -0.009 / -0.015 (the strongest penalty
    # is chosen: the probe finds nothing to fit).
    for seed in STORY_SEEDS:
        shared_world, private_world = _story_frames(seed, audio_shared=1.0), _story_frames(seed, audio_shared=0.0)
        r2_shared, _ = _lv_probe(seed, shared_world).r2(shared_world["audio_affect_shared"])
        r2_private, lam = _lv_probe(seed, private_world).r2(private_world["audio_affect_private"])
        assert r2_shared > 0.08, (seed, r2_shared)
        assert r2_private <= 0.02, (seed, r2_private, lam)


def test_audio_shared_orders_lv_recovery_of_audio_affect():
    # The same probe to audio's whole label-relevant signal (shared + private) rises with kappa (P2).
    # Measured kappa 0 / 0.5 / 1: seed 0 -0.007 / 0.071 / 0.155, seed 1 -0.009 / 0.065 / 0.188,
    # seed 2 -0.015 / 0.066 / 0.212.
    for seed in STORY_SEEDS:
        r2 = {}
        for kappa in (0.0, 0.5, 1.0):
            view = _story_frames(seed, audio_shared=kappa)
            r2[kappa], _ = _lv_probe(seed, view).r2(view["audio_affect_shared"] + view["audio_affect_private"])
        assert r2[0.0] <= 0.02 and r2[0.0] + 0.04 < r2[0.5] and r2[0.5] + 0.04 < r2[1.0], (seed, r2)


def test_audio_features_are_its_affect_plus_nuisance_through_fixed_directions_plus_unit_noise():
    # Least squares of the audio features on [1, shared, private, nuisance] per real frame: the shared and the
    # private part load on the same two unit-norm directions scaled by informativeness_a (0.22), the nuisance on
    # three scaled by structure (1.5), and what is left is unit noise.  Measured over seeds and kappa 0 / 0.5 /
    # 0.8 / 1: affect row norms 0.20-0.25, nuisance 1.49-1.54, shared minus private rows at most 0.079 apart
    # (different directions would be about 0.3 apart), residual std 0.99-1.01.
    config = preset("mosi")
    for seed in STORY_SEEDS:
        for knobs in ({"audio_shared": 0.0}, {"audio_shared": 0.5}, {}, {"audio_shared": 1.0}):
            view = _story_frames(seed, **knobs)
            kappa = knobs.get("audio_shared", config.audio_shared)
            design = np.c_[np.ones(len(view["audio"])), view["audio_affect_shared"], view["audio_affect_private"],
                           view["audio_nuisance"]].astype(np.float64)
            coef, *_ = np.linalg.lstsq(design, view["audio"].astype(np.float64), rcond=None)
            residual = view["audio"] - design @ coef
            shared_rows, private_rows, nuisance_rows = coef[1:3], coef[3:5], coef[5:8]
            for rows, present in ((shared_rows, kappa > 0), (private_rows, kappa < 1)):
                if present:
                    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), config.informativeness_a, atol=0.05)
            if 0 < kappa < 1:
                assert np.linalg.norm(shared_rows - private_rows, axis=1).max() < 0.15, (seed, kappa)
            np.testing.assert_allclose(np.linalg.norm(nuisance_rows, axis=1), config.structure, atol=0.08)
            np.testing.assert_allclose(residual.std(0), 1.0, atol=0.04)


def test_audio_features_carry_their_own_affect_at_either_knob_value():
    # A ridge from the utterance-mean audio features to the utterance mean of shared + private (utterance split
    # as in every probe): held-out R^2 at kappa 0 / 1: seed 0 0.104 / 0.100, seed 1 0.162 / 0.120, seed 2 0.091 /
    # 0.160.  (Per frame the same probe reaches only 0.00-0.02: the affect is 0.22 per frame against unit noise
    # and a 1.5 nuisance; over an utterance the noise averages out.)  At kappa 0 this is the voice-only affect,
    # of which the L+V probe recovers nothing (test above).
    for seed in STORY_SEEDS:
        for kappa in (0.0, 1.0):
            view = _story_frames(seed, audio_shared=kappa)
            pooled_audio = _utterance_means(view["audio"], view["utterance"])
            affect = _utterance_means(view["audio_affect_shared"] + view["audio_affect_private"], view["utterance"])
            r2, _ = _RidgeProbe(pooled_audio, np.arange(len(pooled_audio))).r2(affect)
            assert r2 > 0.05, (seed, kappa, r2)


def test_label_reads_the_voice_only_affect_which_only_the_audio_carries():
    # label - oracle_lv is what of the label language and vision cannot know (the voice-only affect plus the
    # annotators' noise).  A ridge (lam 10) from pooled audio features, train split -> test split, tracks it at
    # kappa 0 (corr 0.462 / 0.396 / 0.352, seeds 0, 1, 2) but not at kappa 1 (-0.052 / 0.032 / 0.047), where
    # the audio carries no voice-only affect; pooled language + vision never do (lam 100: -0.004 / -0.030 / 0.086).
    for seed in STORY_SEEDS:
        for kappa in (0.0, 1.0):
            sim = _sim(preset("mosi", "aligned", scale=0.2, seed=seed, audio_shared=kappa))
            target = {s: sim.raw[s]["labels"].ravel().astype(np.float64) - sim.truth[s]["oracle_lv"]
                      for s in ("train", "test")}
            corr = {}
            for keys, lam in ((("audio",), 10.0), (("text", "vision"), 100.0)):
                pred = _ridge_predict(_pooled(sim.raw["train"], keys), target["train"],
                                      _pooled(sim.raw["test"], keys), lam).ravel()
                corr[keys[0]] = np.corrcoef(pred, target["test"])[0, 1]
            if kappa == 0.0:
                assert corr["audio"] > 0.2, (seed, corr)
            else:
                assert abs(corr["audio"]) < 0.15, (seed, corr)
                assert (sim.truth["train"]["audio_affect_private"] == 0).all()
            assert abs(corr["text"]) < 0.15, (seed, kappa, corr)


def test_whole_affect_is_common_plus_voice_only_part():
    # s = s_c + s_p with s_p ~ N(0, private_affect^2) independent of s_c.  Measured (scale 0.2, all splits, 440
    # utterances; sampling sd of a mean 0.03, of a corr 0.05): std of s - s_c 0.609, of alpha - alpha_c 0.586;
    # means -0.064, 0.025; corr with the common part -0.013, 0.053.
    sim = _sim(preset("mosi", "aligned", scale=0.2))
    truth = {key: np.concatenate([sim.truth[s][key] for s in SPLITS]) for key in sim.truth["train"]}
    for whole, common in (("sentiment", "sentiment_common"), ("arousal", "arousal_common")):
        voice_only = (truth[whole] - truth[common]).astype(np.float64)
        assert voice_only.std() == pytest.approx(sim.config.private_affect, abs=0.06), whole
        assert abs(voice_only.mean()) < 0.12, whole
        assert abs(np.corrcoef(voice_only, truth[common])[0, 1]) < 0.15, whole
    silent = _small("mosi", "aligned", private_affect=0.0).truth["train"]
    np.testing.assert_array_equal(silent["sentiment"], silent["sentiment_common"])
    np.testing.assert_array_equal(silent["arousal"], silent["arousal_common"])


def test_language_and_vision_do_not_depend_on_the_audio_knobs():
    # Same seed, same language and vision streams whatever audio_shared and nuisance_shared are; the voice-only
    # affect is never seen by them either (private_affect changes the labels, not the L and V files).
    base = _small("mosi", "unaligned")
    for knobs in ({"audio_shared": 0.0}, {"audio_shared": 1.0}, {"nuisance_shared": 0.0},
                  {"nuisance_shared": 1.0}, {"private_affect": 0.0}, {"private_affect": 2.0}):
        other = _small("mosi", "unaligned", **knobs)
        for split in SPLITS:
            for key in ("text", "vision"):
                np.testing.assert_array_equal(other.raw[split][key], base.raw[split][key], err_msg=f"{knobs} {key}")
            if "private_affect" not in knobs:
                np.testing.assert_array_equal(other.raw[split]["labels"], base.raw[split]["labels"])
                assert not np.array_equal(other.raw[split]["audio"], base.raw[split]["audio"]), knobs
    loud = _small("mosi", "unaligned", private_affect=2.0)
    assert not np.array_equal(loud.raw["train"]["labels"], base.raw["train"]["labels"])


# ---------------------------------------------------------------------------------------------------------
# nuisance_shared: how much of audio's nuisance is a function of what language and vision see


def test_audio_nuisance_is_unpredictable_at_rho_zero_and_predictable_at_one():
    # At rho = 0 audio's nuisance u is its private stream p_a: independent of L and V (and so, given the latent
    # affect, nothing of it is predictable from them).  At rho = 1 u = h(n_l, n_v).  The L+V probe also on the
    # residual after a linear fit on (s, alpha).  Measured rho 0 / 0.5 / 1, seeds 0, 1, 2:
    # -0.007 / 0.312 / 0.634, -0.007 / 0.292 / 0.621, -0.007 / 0.296 / 0.631 (residuals the same to 0.001).
    for seed in STORY_SEEDS:
        r2, r2_resid = {}, {}
        for rho in (0.0, 0.5, 1.0):
            view = _story_frames(seed, **({} if rho == preset("mosi").nuisance_shared else {"nuisance_shared": rho}))
            probe = _lv_probe(seed, view)
            r2[rho], _ = probe.r2(view["audio_nuisance"])
            r2_resid[rho], _ = probe.r2(_residual_after_affect(view["audio_nuisance"], view["affect"]))
        assert r2[0.0] < 0.02 and r2_resid[0.0] < 0.02, (seed, r2, r2_resid)
        assert r2[0.0] + 0.15 < r2[0.5] and r2[0.5] + 0.15 < r2[1.0], (seed, r2)
        assert r2[1.0] > 0.45 and r2_resid[1.0] > 0.45, (seed, r2, r2_resid)


def test_audio_nuisance_truth_splits_into_shared_and_private_parts():
    # u = sqrt(rho) h + sqrt(1 - rho) p_a, and the truth's shared part is sqrt(rho) h (its contribution to u): at
    # rho = 1 the nuisance is its shared part h; h itself does not depend on rho.
    one, half = _small("mosi", "aligned", nuisance_shared=1.0), _small("mosi", "aligned", nuisance_shared=0.5)
    for split in SPLITS:
        truth_one, truth_half = one.truth[split], half.truth[split]
        np.testing.assert_allclose(truth_one["audio_nuisance"], truth_one["audio_nuisance_shared"], atol=1e-6)
        np.testing.assert_allclose(truth_half["audio_nuisance_shared"], math.sqrt(0.5) * truth_one[
            "audio_nuisance_shared"], atol=1e-5)
        assert not np.allclose(truth_half["audio_nuisance"], truth_half["audio_nuisance_shared"], atol=0.1)
        # Half of u's variance is h's: corr(u, h) = sqrt(0.5) = 0.707 per dimension (h and p_a standardised,
        # independent).  Measured on the 373 real training frames: 0.716 / 0.688 / 0.717.
        real = (half.raw[split]["audio"] != 0).any(-1)
        if split == "train":
            for k in range(3):
                corr = np.corrcoef(truth_half["audio_nuisance"][real][:, k],
                                   truth_half["audio_nuisance_shared"][real][:, k])[0, 1]
                assert corr == pytest.approx(math.sqrt(0.5), abs=0.1), k
    for key in ("text", "vision", "labels"):  # language, vision and labels do not depend on rho
        np.testing.assert_array_equal(one.raw["train"][key], half.raw["train"][key])


def test_audio_nuisance_shared_truth_is_the_contribution_of_h_at_every_rho():
    # audio_nuisance_shared = sqrt(rho) h, so audio_nuisance - audio_nuisance_shared is the nuisance's private part
    zero, one = _small("mosi", "aligned", nuisance_shared=0.0), _small("mosi", "aligned", nuisance_shared=1.0)
    assert not zero.truth["train"]["audio_nuisance_shared"].any()
    assert one.truth["train"]["audio_nuisance_shared"].any()
    real = (zero.raw["train"]["audio"] != 0).any(-1)
    private = zero.truth["train"]["audio_nuisance"][real]  # p_a alone: unit variance, unrelated to h
    h = one.truth["train"]["audio_nuisance_shared"][real]
    assert np.abs(np.corrcoef(private.T, h.T)[:3, 3:]).max() < 0.15


# ---------------------------------------------------------------------------------------------------------
# informativeness


def test_informativeness_l_zero_removes_label_information_from_language():
    # Ridge on mean-pooled language features, train split -> test split.  Measured (lam=100, scale 0.2):
    # default R^2 0.20, corr 0.58 (MOSI-like: language alone is informative, far from the ceiling);
    # informativeness_l=0: R^2 -0.13, corr -0.04.
    def probe(config):
        sim = _sim(config)
        x_train, x_test = _pooled(sim.raw["train"]), _pooled(sim.raw["test"])
        y_train, y_test = (sim.raw[s]["labels"].ravel().astype(np.float64) for s in ("train", "test"))
        pred = _ridge_predict(x_train, y_train, x_test, lam=100.0).ravel()
        r2 = 1 - ((y_test - pred) ** 2).sum() / ((y_test - y_test.mean()) ** 2).sum()
        return r2, np.corrcoef(pred, y_test)[0, 1]

    r2_default, corr_default = probe(preset("mosi", "aligned", scale=0.2))
    r2_silent, corr_silent = probe(preset("mosi", "aligned", scale=0.2, informativeness_l=0.0))
    assert r2_default > 0.1 and corr_default > 0.4
    assert r2_silent < 0.03 and abs(corr_silent) < 0.2


# ---------------------------------------------------------------------------------------------------------
# Oracle and noise ceiling


def test_ceiling_holds_the_regression_metrics_of_the_oracle():
    sim = _small("mosi", "aligned")
    keys = {"mae", "corr", "acc7", "acc5", "acc2_non0", "f1_non0", "acc2_has0", "f1_has0", "f1_non0_mult_order"}
    for split in SPLITS:
        assert set(sim.ceiling[split]) == keys
        expected = metrics.regression_metrics(sim.truth[split]["oracle"], sim.raw[split]["labels"])
        assert sim.ceiling[split] == pytest.approx(expected, nan_ok=True)
        np.testing.assert_allclose(
            sim.truth[split]["oracle"],
            expected_rating(sim.truth[split]["sentiment"], sim.config.annotator_noise), rtol=1e-6, atol=1e-6)


def test_iemocap_ceiling_and_oracle_are_posteriors():
    sim = _small("iemocap", "aligned")
    truth = sim.truth["test"]
    assert truth["oracle"].shape == (len(truth["sentiment"]), 4, 2)
    # oracle_lv knows the common affect, which scatters 0.75 about the emotion's centre; oracle also knows the
    # voice-only part, a second view k * (centre + 0.75 noise) of the emotion with k = private_affect / 0.75.
    k = sim.config.private_affect / 0.75
    s_c, a_c = truth["sentiment_common"].astype(np.float64), truth["arousal_common"].astype(np.float64)
    voice = ((truth["sentiment"] - s_c) / k, (truth["arousal"] - a_c) / k)
    for key, expected in (("oracle", emotion_posterior(s_c, a_c, voice=voice)),
                          ("oracle_lv", emotion_posterior(s_c, a_c))):
        assert truth[key].shape == (len(truth["sentiment"]), 4, 2)
        probs = np.exp(truth[key].astype(np.float64))  # log of (1 - p, p) per emotion
        np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
        np.testing.assert_allclose(probs[:, :, 1], expected, atol=1e-4)
    # the voice's view is evidence about the emotion: the whole-affect oracle is the better one
    assert sim.ceiling["test"]["mean_acc"] >= sim.ceiling_lv["test"]["mean_acc"]
    for ceiling, key in ((sim.ceiling, "oracle"), (sim.ceiling_lv, "oracle_lv")):
        expected = metrics.task_metrics(truth[key], sim.raw["test"]["labels"], "classification")
        assert ceiling["test"] == pytest.approx(expected)
        assert {"mean_acc", "mean_f1", *(f"{e}_acc" for e in EMOTIONS)} <= set(ceiling["test"])


def test_ceiling_lv_is_the_metrics_of_the_common_affect_oracle():
    # Knowing s_c only, s + e = s_c + (s_p + e) with s_p + e ~ N(0, annotator_noise^2 + private_affect^2).
    sim = _small("mosi", "aligned")
    config = sim.config
    for split in SPLITS:
        truth = sim.truth[split]
        np.testing.assert_allclose(
            truth["oracle_lv"],
            expected_rating(truth["sentiment_common"], math.hypot(config.annotator_noise, config.private_affect)),
            rtol=1e-6, atol=1e-6)
        expected = metrics.regression_metrics(truth["oracle_lv"], sim.raw[split]["labels"])
        assert sim.ceiling_lv[split] == pytest.approx(expected, nan_ok=True)


def test_ceiling_lv_is_worse_than_ceiling_exactly_when_there_is_voice_only_affect():
    # Measured (scale 0.2, test split, seeds 0, 1, 2): MAE of the oracle 0.273 / 0.271 / 0.275 against 0.485 /
    # 0.490 / 0.492 for the oracle of the common affect; corr 0.97 / 0.98 / 0.97 against 0.91 / 0.93 / 0.89.
    # Over every split and seed the MAE gap is 0.21 to 0.33.
    for seed in STORY_SEEDS:
        sim = _sim(preset("mosi", "aligned", scale=0.2, seed=seed))
        for split in SPLITS:
            assert sim.ceiling_lv[split]["mae"] > sim.ceiling[split]["mae"] + 0.1, (seed, split)
            assert sim.ceiling_lv[split]["corr"] < sim.ceiling[split]["corr"], (seed, split)
    # No voice-only affect: the two oracles are the same function of the same affect, bit for bit.
    for dataset in ("mosi", "iemocap"):
        sim = _small(dataset, "aligned", private_affect=0.0)
        for split in SPLITS:
            np.testing.assert_array_equal(sim.truth[split]["oracle_lv"], sim.truth[split]["oracle"])
            assert sim.ceiling_lv[split] == pytest.approx(sim.ceiling[split], nan_ok=True), (dataset, split)


def test_expected_rating_hand_values():
    # s = 0: the rating distribution is symmetric about 0.
    assert expected_rating(np.array([0.0]), 0.8)[0] == pytest.approx(0.0, abs=1e-12)
    # Far beyond the scale every annotator rates 3 (or -3): P(5 + e < 2.5) = Phi(-2.5 / 0.8) < 1e-3.
    np.testing.assert_allclose(expected_rating(np.array([5.0, -5.0, 50.0]), 0.8), [3, -3, 3], atol=1e-3)
    # No annotator noise: the rounded, clipped sentiment (numpy rounds halves to even).
    s = np.array([-4.2, -2.5, -0.6, 0.4, 1.5, 2.5, 3.7])
    np.testing.assert_array_equal(expected_rating(s, 0.0), [-3, -2, -1, 0, 2, 2, 3])
    # s = 0.5, noise 1: E = sum_k P(x > k - 0.5) - sum_k P(x < 0.5 - k), k = 1..3, x ~ N(0.5, 1)
    #   = [0.5 + Phi(-1) + Phi(-2)] - [Phi(-1) + Phi(-2) + Phi(-3)] = 0.5 - Phi(-3).
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    assert expected_rating(np.array([0.5]), 1.0)[0] == pytest.approx(0.5 - phi(-3), abs=1e-9)
    # Antisymmetric and increasing in s.
    grid = np.linspace(-4, 4, 81)
    values = expected_rating(grid, 0.8)
    np.testing.assert_allclose(values, -expected_rating(-grid, 0.8), atol=1e-12)
    assert (np.diff(values) > 0).all()


def test_oracle_beats_a_ridge_on_pooled_features():
    # The oracle (corr about 0.96 on the test split) sits far above what the features allow a linear model:
    # a ridge on pooled L+A+V reaches about 0.65 with the default knobs.
    sim = _sim(preset("mosi", "aligned", scale=0.2))
    keys = ("text", "audio", "vision")
    x_train, x_test = _pooled(sim.raw["train"], keys), _pooled(sim.raw["test"], keys)
    y_train, y_test = (sim.raw[s]["labels"].ravel().astype(np.float64) for s in ("train", "test"))
    pred = _ridge_predict(x_train, y_train, x_test, lam=10.0).ravel()
    oracle = sim.truth["test"]["oracle"].astype(np.float64)
    assert sim.ceiling["test"]["corr"] > metrics.corr(pred, y_test)
    assert ((oracle - y_test) ** 2).mean() < ((pred - y_test) ** 2).mean()
    assert sim.ceiling["test"]["mae"] < metrics.mae(pred, y_test)


def test_emotion_posterior_rows_sum_to_one_and_favour_the_nearest_centre():
    rng = np.random.default_rng(0)
    s, alpha = rng.normal(0, 2, 200), rng.normal(0, 2, 200)
    post = emotion_posterior(s, alpha)
    assert post.shape == (200, 4)
    assert (post >= 0).all()
    np.testing.assert_allclose(post.sum(1), 1, atol=1e-12)
    centres = np.array([(0.0, 0.0), (1.5, 0.8), (-1.3, -0.9), (-1.2, 1.3)])  # neutral, happy, sad, angry
    np.testing.assert_array_equal(emotion_posterior(centres[:, 0], centres[:, 1]).argmax(1), [0, 1, 2, 3])


# ---------------------------------------------------------------------------------------------------------
# Config validation


INVALID_CONFIGS = [
    ({"audio_shared": 1.5}, r"audio_shared must lie in \[0, 1\] \(share of audio's label-relevant .*got 1\.5"),
    ({"audio_shared": -0.1}, r"audio_shared must lie in \[0, 1\].*got -0\.1"),
    ({"audio_shared": float("nan")}, r"audio_shared must lie in \[0, 1\].*got nan"),
    ({"nuisance_shared": 1.01}, r"nuisance_shared must lie in \[0, 1\] \(share of audio's nuisance .*got 1\.01"),
    ({"nuisance_shared": -0.5}, r"nuisance_shared must lie in \[0, 1\].*got -0\.5"),
    ({"nuisance_shared": float("nan")}, r"nuisance_shared must lie in \[0, 1\].*got nan"),
    ({"train_scale": 0}, r"train_scale must lie in \(0, 20\] \(training-set size relative to .*got 0"),
    ({"train_scale": -1.0}, r"train_scale must lie in \(0, 20\].*got -1\.0"),
    ({"train_scale": 20.5}, r"train_scale must lie in \(0, 20\].*got 20\.5"),
    ({"train_scale": float("inf")}, r"train_scale must lie in \(0, 20\].*got inf"),
    ({"train_scale": float("nan")}, r"train_scale must lie in \(0, 20\].*got nan"),
    ({"private_affect": -0.1}, r"private_affect must be a finite number >= 0, got -0\.1"),
    ({"private_affect": float("inf")}, r"private_affect must be a finite number >= 0, got inf"),
    ({"private_affect": float("nan")}, r"private_affect must be a finite number >= 0, got nan"),
    ({"scale": 0}, r"scale must lie in \(0, 1\] \(fraction of the published split sizes\), got 0"),
    ({"scale": 2.0}, r"scale must lie in \(0, 1\].*got 2\.0"),
    ({"dataset": "cmu"}, r"dataset must be one of \('mosi', 'mosei', 'iemocap'\), got 'cmu'"),
    ({"alignment": "sideways"}, r"'mosi'/'sideways'.*alignment one of \('aligned', 'unaligned'\)"),
    ({"informativeness_l": -0.5}, r"informativeness_l must be a finite number >= 0, got -0\.5"),
    ({"informativeness_a": float("inf")}, r"informativeness_a must be a finite number >= 0, got inf"),
    ({"annotator_noise": -1.0}, r"annotator_noise must be a finite number >= 0, got -1\.0"),
]


@pytest.mark.parametrize(("knobs", "pattern"), INVALID_CONFIGS,
                         ids=[",".join(f"{k}={v}" for k, v in knobs.items()) for knobs, _ in INVALID_CONFIGS])
def test_invalid_config_is_refused_naming_the_knob_and_its_range(knobs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SimConfig(**knobs)
    with pytest.raises(ValueError, match=pattern):
        preset(**{"dataset": "mosi", "alignment": "aligned", **knobs})


@pytest.mark.parametrize("knobs", [{"audio_shared": 0.0}, {"audio_shared": 1.0}, {"nuisance_shared": 0.0},
                                   {"nuisance_shared": 1.0}, {"train_scale": 20.0}, {"train_scale": 0.01},
                                   {"private_affect": 0.0}], ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_knob_bounds_are_accepted(knobs):
    assert getattr(SimConfig(**knobs), next(iter(knobs))) == next(iter(knobs.values()))
