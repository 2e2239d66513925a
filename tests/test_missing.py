"""Missing-data protocols and AUILC: realised rates, the at-least-one rule, padding, determinism, hand-worked areas."""

import math

import numpy as np
import pytest
import torch

from ktlib.data import MultimodalDataset, SplitData, presence_matrix
from ktlib.missing import (
    RATES,
    Protocol,
    applies,
    auilc,
    drop_frames,
    expected_modality_missing_rate,
    fixed_presence,
    modality_presence,
    sweep,
)
from ktlib.specs import MODALITIES

torch.set_num_threads(1)

SHAPES = {"l": (6, 4), "a": (8, 3), "v": (5, 2)}  # (T, D) per modality


def fake_batch(b: int = 8, seed: int = 0, pad_value: float = 0.0) -> dict[str, torch.Tensor]:
    """A batch like make_loader's: features, padding masks (True on padding), present, y, index.

    Every sample has at least one real frame per modality; padding frames hold ``pad_value`` (0 in real batches;
    a nonzero value lets a test see that padding is not touched).
    """
    g = torch.Generator().manual_seed(seed)
    batch = {"present": torch.ones(b, 3, dtype=torch.bool), "y": torch.randn(b, 1, generator=g),
             "index": torch.arange(b)}
    for m, (t, d) in SHAPES.items():
        lengths = torch.randint(1, t + 1, (b,), generator=g)
        pad = torch.arange(t)[None, :] >= lengths[:, None]  # (B, T)
        x = torch.rand(b, t, d, generator=g) + 0.5  # real frames are nonzero
        x[pad] = pad_value
        batch[m], batch[f"mask_{m}"] = x, pad
    return batch


def clone(batch):
    return {k: v.clone() for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------
# Protocol: validation and labels


def test_protocol_labels_and_normalisation():
    label = Protocol("modality", 0.3, phase="train_test").describe()
    assert label == "modality-level random missing, r=0.3, train+test"
    assert Protocol("frame", 0.3).describe() == "frame-level random missing, r=0.3, test only"
    assert Protocol("frame", 1).name == "frame-r1-test"
    p = Protocol("fixed", modalities=["v", "a"])
    assert p.modalities == ("a", "v") and p.name == "fixed-av-test"
    assert str(p) == "fixed missing audio+vision, test only"
    assert Protocol("fixed", modalities="a") == Protocol("fixed", modalities=("a",))
    assert Protocol("none").describe() == "complete data (no missing)"
    assert isinstance(Protocol("frame", 1).rate, float)
    assert [q.rate for q in sweep("frame")] == RATES.tolist()
    assert RATES.tolist() == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "random"}, "kind must be one of"),
    ({"kind": "frame", "rate": 1.5}, r"rate must be in \[0, 1\]"),
    ({"kind": "modality", "rate": -0.1}, r"rate must be in \[0, 1\]"),
    ({"kind": "modality", "rate": float("nan")}, r"rate must be in \[0, 1\]"),
    ({"kind": "modality", "rate": "0.3"}, "rate must be a number"),
    ({"kind": "modality", "rate": True}, "rate must be a number"),
    ({"kind": "frame", "rate": 0.3, "phase": "train"}, "phase must be 'test'"),
    ({"kind": "fixed", "modalities": ("l", "a", "v")}, "cannot remove all three"),
    ({"kind": "fixed"}, "needs the missing modalities"),
    ({"kind": "fixed", "modalities": ("x",)}, "unknown modality"),
    ({"kind": "fixed", "modalities": ("a", "a")}, "more than once"),
    ({"kind": "fixed", "modalities": ("a",), "rate": 0.5}, "applies to kinds 'modality' and 'frame' only"),
    ({"kind": "none", "rate": 0.5}, "applies to kinds 'modality' and 'frame' only"),
    ({"kind": "modality", "rate": 0.3, "modalities": ("a",)}, "applies to kind 'fixed' only"),
    ({"kind": "frame", "rate": 0.3, "seed": -1}, "seed must be an integer >= 0"),
])
def test_protocol_rejects_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Protocol(**kwargs)


def test_applies_by_phase():
    test_only = Protocol("frame", 0.3, phase="test")
    both = Protocol("modality", 0.3, phase="train_test")
    assert [applies(test_only, s) for s in ("train", "valid", "test")] == [False, True, True]
    assert [both.applies_to(s) for s in ("train", "valid", "test")] == [True, True, True]
    assert not any(applies(Protocol("none"), s) for s in ("train", "valid", "test"))
    with pytest.raises(ValueError, match="split must be one of"):
        applies(test_only, "dev")
    with pytest.raises(ValueError, match="protocol must be a Protocol"):
        applies("frame", "test")
    with pytest.raises(ValueError, match="kind 'modality' or 'frame'"):
        sweep("fixed")


# ----------------------------------------------------------------------------------------------------------
# Fixed and modality-level missing


def test_fixed_presence_is_exact():
    p = Protocol("fixed", modalities=("a",))
    expected = np.array([[True, False, True]] * 5)
    np.testing.assert_array_equal(p.presence(5, "test"), expected)
    np.testing.assert_array_equal(p.presence(5, "valid"), expected)
    np.testing.assert_array_equal(p.presence(5, "train"), np.ones((5, 3), bool))  # test-only: train complete
    np.testing.assert_array_equal(fixed_presence(5, ("a",)), presence_matrix(5, ("a",)))
    np.testing.assert_array_equal(fixed_presence(2, ("l", "v")), [[False, True, False]] * 2)
    assert (~p.presence(6, "test")).mean() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="cannot remove all three"):
        fixed_presence(3, ("l", "a", "v"))


def test_expected_modality_rate_by_hand():
    assert expected_modality_missing_rate(0.0) == 0.0
    assert expected_modality_missing_rate(0.3) == pytest.approx(0.3 - 0.027 / 3)  # 0.291
    assert expected_modality_missing_rate(1.0) == pytest.approx(2 / 3)
    assert expected_modality_missing_rate(0.7) == pytest.approx(0.7 - 0.343 / 3)
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\]"):
        expected_modality_missing_rate(1.2)


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.7, 1.0])
def test_modality_realised_rate_and_at_least_one_kept(rate):
    n = 4000
    present = modality_presence(n, rate, seed=3)
    assert present.shape == (n, 3) and present.dtype == bool
    assert present.any(axis=1).all()  # never all three missing
    assert abs((~present).mean() - expected_modality_missing_rate(rate)) < 0.02
    presence_matrix(n, present)  # accepted by the loader's check
    if rate == 1.0:
        assert (present.sum(axis=1) == 1).all()  # exactly one kept ...
        shares = present.mean(axis=0)
        assert np.all(np.abs(shares - 1 / 3) < 0.03)  # ... chosen uniformly


def test_modality_rate_zero_keeps_everything_and_bad_inputs():
    assert modality_presence(50, 0.0, seed=0).all()
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\]"):
        modality_presence(5, 1.01, seed=0)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        modality_presence(5, 0.5, seed=-2)
    with pytest.raises(ValueError, match="n .number of samples. must be an integer >= 0"):
        modality_presence(-1, 0.5, seed=0)


def test_modality_presence_determinism_splits_and_epochs():
    p = Protocol("modality", 0.5, phase="train_test", seed=7)
    a = p.presence(300, "test")
    np.testing.assert_array_equal(a, Protocol("modality", 0.5, phase="train_test", seed=7).presence(300, "test"))
    assert not np.array_equal(a, Protocol("modality", 0.5, phase="train_test", seed=8).presence(300, "test"))
    assert not np.array_equal(a, p.presence(300, "valid"))  # each split its own stream
    assert not np.array_equal(a, p.presence(300, "test", epoch=1))
    assert Protocol("modality", 0.5, phase="test").presence(300, "train").all()  # test-only: train complete
    assert Protocol("frame", 0.5).presence(10, "test").all()  # frame-level keeps modalities present
    with pytest.raises(ValueError, match="epoch must be an integer >= 0"):
        p.presence(3, "test", epoch=-1)


# ----------------------------------------------------------------------------------------------------------
# Frame-level missing


def test_frame_realised_rate_and_zeroing():
    batch = fake_batch(b=300, seed=1)
    out, dropped = drop_frames(batch, 0.3, seed=5)
    real = sum(int((~batch[f"mask_{m}"]).sum()) for m in MODALITIES)
    n_drop = sum(int(dropped[m].sum()) for m in MODALITIES)
    assert real > 3000
    assert abs(n_drop / real - 0.3) < 0.03
    for m in MODALITIES:
        d = dropped[m]
        assert d.dtype == torch.bool and d.shape == batch[f"mask_{m}"].shape
        assert (out[m][d] == 0).all()  # dropped frames zeroed
        assert torch.equal(out[m][~d], batch[m][~d])  # everything else as it was
        assert torch.equal(out[f"mask_{m}"], batch[f"mask_{m}"])  # padding masks unchanged
    assert torch.equal(out["present"], batch["present"])


def test_frame_rate_one_and_zero():
    batch = fake_batch(b=20, seed=2)
    out, dropped = drop_frames(batch, 1.0, seed=0)
    for m in MODALITIES:
        assert torch.equal(dropped[m], ~batch[f"mask_{m}"])  # every real frame dropped
        assert (out[m] == 0).all()
    assert out["present"].all()  # still "present"
    out0, dropped0 = drop_frames(batch, 0.0, seed=0)
    assert not any(dropped0[m].any() for m in MODALITIES)
    assert all(torch.equal(out0[m], batch[m]) for m in MODALITIES)


def test_frame_padding_untouched_and_input_not_mutated():
    batch = fake_batch(b=16, seed=3, pad_value=7.0)  # nonzero padding to see that it is left alone
    before = clone(batch)
    out, dropped = drop_frames(batch, 0.6, seed=1)
    for m in MODALITIES:
        pad = batch[f"mask_{m}"]
        assert not (dropped[m] & pad).any()
        assert (out[m][pad] == 7.0).all()
        assert out[m] is not batch[m]
    assert out is not batch
    for k in before:
        assert torch.equal(batch[k], before[k])  # input tensors unmodified


def test_frame_absent_modality_has_nothing_dropped():
    batch = fake_batch(b=6, seed=4)
    batch["a"] = torch.zeros_like(batch["a"])
    batch["mask_a"] = torch.ones_like(batch["mask_a"])  # how make_loader marks an absent modality
    batch["present"][:, 1] = False
    out, dropped = drop_frames(batch, 0.9, seed=0)
    assert not dropped["a"].any() and (out["a"] == 0).all()


def test_frame_determinism_by_seed_index_and_generator():
    batch = fake_batch(b=12, seed=5)
    _, d1 = drop_frames(batch, 0.5, seed=11)
    _, d2 = drop_frames(batch, 0.5, seed=11)
    _, d3 = drop_frames(batch, 0.5, seed=12)
    assert all(torch.equal(d1[m], d2[m]) for m in MODALITIES)
    assert any(not torch.equal(d1[m], d3[m]) for m in MODALITIES)
    # seed mode keys on batch["index"]: a sample gets the same frames dropped in any batch order
    perm = torch.tensor([3, 0, 11, 5, 7, 1, 2, 4, 6, 8, 9, 10])
    shuffled = {k: v[perm] for k, v in batch.items()}
    _, dp = drop_frames(shuffled, 0.5, seed=11)
    assert all(torch.equal(dp[m], d1[m][perm]) for m in MODALITIES)
    # generator mode: reproducible from the generator's seed
    _, g1 = drop_frames(batch, 0.5, generator=torch.Generator().manual_seed(0))
    _, g2 = drop_frames(batch, 0.5, generator=torch.Generator().manual_seed(0))
    _, g3 = drop_frames(batch, 0.5, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(g1[m], g2[m]) for m in MODALITIES)
    assert any(not torch.equal(g1[m], g3[m]) for m in MODALITIES)


def test_frame_protocol_phase_split_and_epoch():
    batch = fake_batch(b=10, seed=6)
    p = Protocol("frame", 0.5, phase="test", seed=2)
    out, dropped = p.apply_batch(batch, "train")  # test-only protocol leaves train alone
    assert all(out[k] is batch[k] for k in batch) and out is not batch
    assert not any(dropped[m].any() for m in MODALITIES)
    _, dt = p.apply_batch(batch, "test")
    _, dv = p.apply_batch(batch, "valid")
    _, de = p.apply_batch(batch, "test", epoch=1)
    assert any(dt[m].any() for m in MODALITIES)
    assert any(not torch.equal(dt[m], dv[m]) for m in MODALITIES)
    assert any(not torch.equal(dt[m], de[m]) for m in MODALITIES)
    _, dtr = Protocol("frame", 0.5, phase="train_test", seed=2).apply_batch(batch, "train")
    assert any(dtr[m].any() for m in MODALITIES)
    out_m, dm = Protocol("modality", 0.5).apply_batch(batch, "test")  # presence-based kinds: batch untouched
    assert all(out_m[k] is batch[k] for k in batch) and not any(dm[m].any() for m in MODALITIES)


def test_frame_on_a_real_loader_batch_matches_per_sample_draws():
    g = np.random.default_rng(0)
    n = 6
    feats = {}
    for m, (t, d) in SHAPES.items():
        x = (g.random((n, t, d)) + 0.5).astype(np.float32)
        for i in range(n):
            x[i, g.integers(1, t + 1):] = 0.0  # trailing zero padding, as in MulT files
        feats[m] = x
    split = SplitData(l=feats["l"], a=feats["a"], v=feats["v"], labels=np.zeros((n, 1, 1), np.float32),
                      ids=np.array([f"s{i}" for i in range(n)]))
    before = {m: feats[m].copy() for m in MODALITIES}
    batch = MultimodalDataset(split).__getitems__([4, 1, 5])
    p = Protocol("frame", 0.5, seed=9)
    out, dropped = p.apply_batch(batch, "test")
    for row, i in enumerate([4, 1, 5]):  # sample i's draws: default_rng([*seed words, i]), l, a, v in turn
        rng = np.random.default_rng([*p._seed_for("test", 0), i])
        for m in MODALITIES:
            x = feats[m][i]
            expected = (rng.random(x.shape[0]) < 0.5) & (x != 0).any(-1)
            np.testing.assert_array_equal(dropped[m][row].numpy(), expected)
            np.testing.assert_array_equal(out[m][row].numpy(), np.where(expected[:, None], 0.0, x))
    for m in MODALITIES:
        np.testing.assert_array_equal(split.features(m), before[m])  # input split unmodified
    same, none_dropped = p.apply_batch(batch, "train")
    assert all(same[m] is batch[m] for m in MODALITIES) and not any(none_dropped[m].any() for m in MODALITIES)


@pytest.mark.parametrize("change, kwargs, match", [
    (None, {"seed": 1, "generator": torch.Generator()}, "exactly one of seed= .* or generator="),
    (None, {}, "exactly one of seed="),
    (None, {"seed": 1, "rate": 2.0}, r"rate must be in \[0, 1\]"),
    (None, {"seed": "abc"}, "seed must be an integer >= 0"),
    (None, {"generator": 3}, "generator must be a torch.Generator"),
    ("no_index", {"seed": 1}, r"batch\['index'\].*pass generator= instead"),
    ("no_mask", {"seed": 1}, "batch needs 'mask_a'"),
    ("int_features", {"seed": 1}, r"batch\['v'\] must be a float tensor"),
    ("short_v", {"seed": 1}, r"batch\['v'\] has 3 samples but batch\['l'\] has 4"),
    ("no_features", {"seed": 1}, "batch has none of the feature keys"),
])
def test_drop_frames_rejects_bad_inputs(change, kwargs, match):
    batch = fake_batch(b=4)
    if change == "no_index":
        del batch["index"]
    elif change == "no_mask":
        del batch["mask_a"]
    elif change == "int_features":
        batch["v"] = batch["v"].long()
    elif change == "short_v":
        batch["v"], batch["mask_v"] = batch["v"][:3], batch["mask_v"][:3]
    elif change == "no_features":
        batch = {"y": batch["y"]}
    rate = kwargs.pop("rate", 0.5)
    with pytest.raises(ValueError, match=match):
        drop_frames(batch, rate, **kwargs)


def test_apply_batch_rejects_bad_split():
    with pytest.raises(ValueError, match="split must be one of"):
        Protocol("frame", 0.5).apply_batch(fake_batch(b=2), "dev")


# ----------------------------------------------------------------------------------------------------------
# AUILC


def test_auilc_hand_worked():
    assert auilc(RATES, np.full(11, 0.7)) == pytest.approx(0.7)  # constant curve -> the constant
    assert auilc(RATES, 1 - RATES) == pytest.approx(0.5)  # linear 1 -> 0
    # 0.5 * (1 + 0.5) / 2 + 0.5 * (0.5 + 0.2) / 2 = 0.375 + 0.175
    assert auilc([0.0, 0.5, 1.0], [1.0, 0.5, 0.2]) == pytest.approx(0.55)
    # span 0.6: area 0.2 * (0.8 + 0.6) / 2 + 0.4 * (0.6 + 0.2) / 2 = 0.14 + 0.16 = 0.30; normalised 0.30 / 0.6
    assert auilc([0.1, 0.3, 0.7], [0.8, 0.6, 0.2], normalise=False) == pytest.approx(0.30)
    assert auilc([0.1, 0.3, 0.7], [0.8, 0.6, 0.2]) == pytest.approx(0.5)
    assert auilc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 4.0])) == pytest.approx(3.0)
    assert isinstance(auilc([0, 1], [1, 1]), float)
    assert math.isclose(auilc(RATES, RATES**2, normalise=False), auilc(RATES, RATES**2))  # span 1: same


@pytest.mark.parametrize("rates, values, match", [
    ([0.0, 0.2, 0.1], [1, 2, 3], "sorted in increasing order; 0.2 is followed by 0.1"),
    ([0.0, 0.1, 0.1], [1, 2, 3], r"duplicate value\(s\) \[0.1\]"),
    ([0.0, 0.5, 1.0], [1, 2], "rates has 3 points but values has 2"),
    ([0.5], [1.0], "at least 2 points, got 1"),
    ([0.0, 0.5], [1.0, float("nan")], r"values holds NaN/inf at position \[1\]"),
    ([0.0, float("inf")], [1.0, 2.0], "rates holds NaN/inf"),
    ([0.0, 1.5], [1.0, 2.0], r"rates must lie in \[0, 1\]"),
    ([[0.0, 1.0]], [[1.0, 2.0]], "rates must be 1-D"),
    ([0.0, 1.0], ["a", "b"], "values has dtype"),
])
def test_auilc_rejects_bad_input(rates, values, match):
    with pytest.raises(ValueError, match=match):
        auilc(rates, values)
