"""Tests of ktlib.simulate: determinism, the published shapes, front zero-padding, the label models, the knobs of
the generative story (audio_predictability, informativeness), the noise ceiling and config validation.

Statistical checks use fixed seeds, so every number is deterministic; the thresholds were checked empirically
(the measured values are in the comment beside each one) and leave a clear margin either side.
"""

import functools
import math
import pickle

import numpy as np
import pytest

from ktlib import metrics
from ktlib.simulate import SimConfig, emotion_posterior, expected_rating, preset, simulate
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
# Linear probes: closed-form ridge regression, fitted on one half of the utterances and scored on the other.


def _ridge_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, lam: float) -> np.ndarray:
    """Closed-form ridge regression (intercept unpenalised): fit on (x_train, y_train), predict x_test."""
    x_train, x_test = x_train.astype(np.float64), x_test.astype(np.float64)
    y_train = y_train.astype(np.float64).reshape(len(y_train), -1)
    x_mean, y_mean = x_train.mean(0), y_train.mean(0)
    xc = x_train - x_mean
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(xc.shape[1]), xc.T @ (y_train - y_mean))
    return (x_test - x_mean) @ w + y_mean


def _ridge_r2(x: np.ndarray, y: np.ndarray, train: np.ndarray, lam: float = 10.0) -> float:
    """Held-out R^2 (pooled over output columns) of a ridge regression x -> y fitted on rows ``train``."""
    pred = _ridge_predict(x[train], y[train], x[~train], lam)
    truth = y[~train].astype(np.float64).reshape(len(pred), -1)
    return float(1 - ((truth - pred) ** 2).sum() / ((truth - truth.mean(0)) ** 2).sum())


def _aligned_frames(sim):
    """Real frames of every split of an aligned simulation (all modalities share the word slots).

    Returns L+V features (F, 300 + 20), audio features (F, 5), the noise-free audio structure u (F, 3), the latent
    affect [s, alpha] of each frame's utterance (F, 2), and a mask (F,) selecting the first half of the utterances.
    """
    lv, audio, signal, affect, utterance = [], [], [], [], []
    offset = 0
    for split in SPLITS:
        raw, truth = sim.raw[split], sim.truth[split]
        real = (raw["text"] != 0).any(-1)  # (N, T)
        n = len(real)
        lv.append(np.concatenate([raw["text"], raw["vision"]], -1)[real])
        audio.append(raw["audio"][real])
        signal.append(truth["audio_structure"][real])
        per_frame = np.stack([truth["sentiment"], truth["arousal"]], -1)[:, None, :]  # (N, 1, 2)
        affect.append(np.broadcast_to(per_frame, (*real.shape, 2))[real])
        utterance.append(np.broadcast_to(offset + np.arange(n)[:, None], real.shape)[real])
        offset += n
    utterance = np.concatenate(utterance)
    return (np.concatenate(lv), np.concatenate(audio), np.concatenate(signal), np.concatenate(affect),
            utterance < offset // 2)


def _residual_after_affect(signal: np.ndarray, affect: np.ndarray) -> np.ndarray:
    """What is left of the audio signal after a least-squares fit on [1, s, alpha]."""
    design = np.c_[np.ones(len(affect)), affect].astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, signal.astype(np.float64), rcond=None)
    return signal - design @ coef


def _audio_sim(rho: float, seed: int = 0):
    return _sim(preset("mosi", "aligned", scale=0.2, seed=seed, audio_predictability=rho))


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
        # The noise-free audio structure in the truth is zero on padding frames too.
        audio_real = (raw["audio"] != 0).any(-1)
        assert (truth["audio_structure"][~audio_real] == 0).all()


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
# audio_predictability: how much of the audio signal is a function of what language and vision see


def test_audio_predictability_orders_linear_recovery_of_audio_features():
    # Held-out R^2 of a ridge (lam=300) from L+V frame features to audio frame features rises with rho, in every
    # world.  Measured rho 0 / 0.5 / 1: seed 0 -0.10 / 0.08 / 0.27, seed 1 -0.10 / 0.09 / 0.29,
    # seed 2 -0.12 / 0.11 / 0.31 (below 0 at rho = 0: the probe only fits noise there).
    for seed in (0, 1, 2):
        r2 = {}
        for rho in (0.0, 0.5, 1.0):
            lv, audio, _, _, train = _aligned_frames(_audio_sim(rho, seed=seed))
            r2[rho] = _ridge_r2(lv, audio, train, lam=300.0)
        assert r2[0.0] + 0.08 < r2[0.5] and r2[0.5] + 0.08 < r2[1.0], (seed, r2)
        assert r2[1.0] > 0.2, (seed, r2)


def test_audio_structure_is_unpredictable_at_rho_zero_and_predictable_at_one():
    # At rho = 0 audio's structure u is its private stream p_a: independent of L and V (and so, given the latent
    # affect, nothing in audio is predictable from them beyond what they carry).  At rho = 1 u = h(n_l, n_v).
    # The same probe also on the residual after a linear fit on (s, alpha).  Measured rho 0 / 0.5 / 1, seeds
    # 0, 1, 2: -0.10 / 0.25 / 0.61, -0.10 / 0.24 / 0.59, -0.12 / 0.26 / 0.60 (residuals the same to 0.01).
    for seed in (0, 1, 2):
        r2, r2_resid = {}, {}
        for rho in (0.0, 0.5, 1.0):
            lv, _, structure, affect, train = _aligned_frames(_audio_sim(rho, seed=seed))
            r2[rho] = _ridge_r2(lv, structure, train, lam=300.0)
            r2_resid[rho] = _ridge_r2(lv, _residual_after_affect(structure, affect), train, lam=300.0)
        assert r2[0.0] < 0.02 and r2_resid[0.0] < 0.02, (seed, r2, r2_resid)
        assert r2[0.0] < r2[0.5] < r2[1.0], (seed, r2)
        assert r2[1.0] > 0.45 and r2_resid[1.0] > 0.45, (seed, r2, r2_resid)


def test_audio_truth_splits_into_shared_and_private_parts():
    # u = sqrt(rho) h + sqrt(1 - rho) p_a: at rho = 1 the structure is its shared part h; h never depends on rho.
    one, half = _small("mosi", "aligned", audio_predictability=1.0), _small("mosi", "aligned",
                                                                            audio_predictability=0.5)
    truth_one, truth_half = one.truth["train"], half.truth["train"]
    np.testing.assert_allclose(truth_one["audio_structure"], truth_one["audio_shared"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(truth_half["audio_shared"], truth_one["audio_shared"], rtol=1e-5, atol=1e-5)
    assert not np.allclose(truth_half["audio_structure"], truth_half["audio_shared"], atol=0.1)
    # Language and vision do not depend on rho at all: same seed, same streams.
    for key in ("text", "vision", "labels"):
        np.testing.assert_array_equal(one.raw["train"][key], half.raw["train"][key])


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
    probs = np.exp(truth["oracle"].astype(np.float64))  # log of (1 - p, p) per emotion
    np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
    np.testing.assert_allclose(probs[:, :, 1], emotion_posterior(truth["sentiment"], truth["arousal"]), atol=1e-5)
    expected = metrics.task_metrics(truth["oracle"], sim.raw["test"]["labels"], "classification")
    assert sim.ceiling["test"] == pytest.approx(expected)
    assert {"mean_acc", "mean_f1", *(f"{e}_acc" for e in EMOTIONS)} <= set(sim.ceiling["test"])


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
    ({"audio_predictability": 1.5}, r"audio_predictability must lie in \[0, 1\].*got 1\.5"),
    ({"audio_predictability": -0.1}, r"audio_predictability must lie in \[0, 1\].*got -0\.1"),
    ({"audio_predictability": float("nan")}, r"audio_predictability must lie in \[0, 1\]"),
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
