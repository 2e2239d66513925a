"""Tests of ktlib.metrics: small cases worked out by hand, then cross-checks against sklearn.

Every expected value in the hand cases is derived in the comment beside it, so a reader can follow the
arithmetic without running anything.
"""

import math
import warnings

import numpy as np
import pytest

from ktlib.metrics import (
    EMOTIONS,
    acc2_has0,
    acc2_non0,
    acc5,
    acc7,
    corr,
    f1_has0,
    f1_non0,
    f1_non0_mult_order,
    iemocap_metrics,
    mae,
    regression_metrics,
    weighted_f1,
)

# ---------------------------------------------------------------------------------------------------------
# A 6-sample regression case. Per sample: what rounding, clipping and the two binary conventions do.
# Classes are written truth/pred; "h" marks a half rounded to even, "c" a clipped value, x a miss.
#
#   i  truth  pred | acc7 class        | acc5 class        | Non0 (>0) truth/pred | Has0 (>=0) truth/pred
#   0   2.5    2.4 |  2h /  2          |  2h /  2          | T / T                | T / T
#   1   3.5    2.1 |  3c /  2      x   |  2c /  2c         | T / T                | T / T
#   2   0.0   -0.5 |  0  / -0h         |  0  / -0h         | dropped: truth == 0  | T / F   x
#   3  -1.0   -1.5 | -1  / -2h     x   | -1  / -2h     x   | F / F                | F / F
#   4  -2.5   -2.0 | -2h / -2          | -2h / -2          | F / F                | F / F
#   5   0.5   -0.2 |  0h / -0          |  0h / -0          | T / F   x            | T / F   x
# ---------------------------------------------------------------------------------------------------------
TRUTH = [2.5, 3.5, 0.0, -1.0, -2.5, 0.5]
PRED = [2.4, 2.1, -0.5, -1.5, -2.0, -0.2]


def test_mae_by_hand():
    # |0.1| + |1.4| + |0.5| + |0.5| + |0.5| + |0.7| = 3.7; 3.7 / 6
    assert mae(PRED, TRUTH) == pytest.approx(3.7 / 6)


def test_corr_by_hand():
    # x = pred, y = truth, n = 6
    # sum x   = 2.4 + 2.1 - 0.5 - 1.5 - 2.0 - 0.2 = 0.3
    # sum y   = 2.5 + 3.5 + 0 - 1 - 2.5 + 0.5 = 3.0
    # sum xy  = 6.0 + 7.35 + 0 + 1.5 + 5.0 - 0.1 = 19.75
    # sum x^2 = 5.76 + 4.41 + 0.25 + 2.25 + 4.0 + 0.04 = 16.71
    # sum y^2 = 6.25 + 12.25 + 0 + 1 + 6.25 + 0.25 = 26
    # r = (n sum xy - sum x sum y) / sqrt((n sum x^2 - (sum x)^2) (n sum y^2 - (sum y)^2))
    #   = (118.5 - 0.9) / sqrt((100.26 - 0.09) * (156 - 9)) = 117.6 / sqrt(100.17 * 147) = 0.96912...
    assert corr(PRED, TRUTH) == pytest.approx(117.6 / math.sqrt(100.17 * 147))
    assert corr(PRED, TRUTH) == pytest.approx(0.969125, abs=1e-6)


def test_acc7_rounds_halves_to_even():
    # matches at i = 0, 2, 4, 5 (table above) -> 4 / 6. Rounding halves up instead would turn truth 2.5 into
    # 3 and make i = 0 a miss, so this value depends on numpy's round-half-to-even.
    assert acc7(PRED, TRUTH) == pytest.approx(4 / 6)
    assert np.round(2.5) == 2 and np.round(-2.5) == -2 and np.round(-1.5) == -2


def test_acc5_clips_to_two():
    # as acc7, plus i = 1: truth 3.5 and pred 2.1 both clip to 2 -> matches at i = 0, 1, 2, 4, 5 -> 5 / 6
    assert acc5(PRED, TRUTH) == pytest.approx(5 / 6)


def test_non0_drops_the_zero_truth():
    # 5 samples kept (i = 2 dropped); misses only at i = 5 -> acc = 4 / 5
    assert acc2_non0(PRED, TRUTH) == pytest.approx(4 / 5)
    # truth>0 = [T, T, F, F, T], pred>0 = [T, T, F, F, F]  (i = 0, 1, 3, 4, 5)
    # class T: tp = 2, predicted 2, true 3 -> P = 1, R = 2/3, F1 = 2 * (2/3) / (5/3) = 0.8
    # class F: tp = 2, predicted 3, true 2 -> P = 2/3, R = 1, F1 = 0.8
    # weighted by truth support: (3 * 0.8 + 2 * 0.8) / 5 = 0.8
    assert f1_non0(PRED, TRUTH) == pytest.approx(0.8)


def test_has0_keeps_the_zero_truth():
    # all 6 samples; misses at i = 2 (truth 0 counts as >= 0, pred -0.5 does not) and i = 5 -> 4 / 6
    assert acc2_has0(PRED, TRUTH) == pytest.approx(4 / 6)
    # truth>=0 = [T, T, T, F, F, T], pred>=0 = [T, T, F, F, F, F]
    # class T: tp = 2, predicted 2, true 4 -> P = 1, R = 1/2, F1 = 2 * 0.5 / 1.5 = 2/3
    # class F: tp = 2, predicted 4, true 2 -> P = 1/2, R = 1, F1 = 2/3
    # weighted: (4 * 2/3 + 2 * 2/3) / 6 = 2/3
    assert f1_has0(PRED, TRUTH) == pytest.approx(2 / 3)
    # the conventions differ on this case only because of the zero truth at i = 2
    assert acc2_has0(PRED, TRUTH) != pytest.approx(acc2_non0(PRED, TRUTH))


def test_regression_metrics_keys_and_values():
    result = regression_metrics(PRED, TRUTH)
    assert list(result) == [
        "mae",
        "corr",
        "acc7",
        "acc5",
        "acc2_non0",
        "f1_non0",
        "acc2_has0",
        "f1_has0",
        "f1_non0_mult_order",
    ]
    assert all(isinstance(value, float) for value in result.values())
    # same numbers as the single-metric tests above; fractions, not percent
    assert result == pytest.approx(
        {
            "mae": 3.7 / 6,
            "corr": 117.6 / math.sqrt(100.17 * 147),
            "acc7": 4 / 6,
            "acc5": 5 / 6,
            "acc2_non0": 4 / 5,
            "f1_non0": 0.8,
            "acc2_has0": 4 / 6,
            "f1_has0": 2 / 3,
            "f1_non0_mult_order": 0.8,  # both classes have F1 0.8, so the weights do not matter here
        }
    )


def test_regression_inputs_of_shape_n_1_and_n_1_1_are_flattened():
    # MulT's model outputs (N, 1) and its label arrays are (N, 1, 1)
    pred = np.array(PRED).reshape(-1, 1)
    truth = np.array(TRUTH).reshape(-1, 1, 1)
    assert regression_metrics(pred, truth) == pytest.approx(regression_metrics(PRED, TRUTH))


# ---------------------------------------------------------------------------------------------------------
# Weighted F1
# ---------------------------------------------------------------------------------------------------------


def test_weighted_f1_by_hand_with_an_unpredicted_class():
    y_true = [0, 0, 1, 1, 1, 2]
    y_pred = [0, 1, 1, 1, 0, 0]
    # class 0: tp = 1 (i=0), predicted 3 (i=0,4,5), true 2 -> P = 1/3, R = 1/2, F1 = 2 * (1/6) / (5/6) = 0.4
    # class 1: tp = 2 (i=2,3), predicted 3 (i=1,2,3), true 3 -> P = 2/3, R = 2/3, F1 = 2/3
    # class 2: never predicted -> P = 0 (0/0 -> 0), R = 0/1 = 0, F1 = 0 (P + R = 0)
    # weighted by support (2, 3, 1): (2 * 0.4 + 3 * 2/3 + 1 * 0) / 6 = 2.8 / 6
    assert weighted_f1(y_true, y_pred) == pytest.approx(2.8 / 6)


def test_weighted_f1_class_only_in_pred_has_zero_weight():
    y_true = [0, 0, 1]
    y_pred = [0, 2, 1]
    # label set = union {0, 1, 2}
    # class 0: tp = 1, predicted 1, true 2 -> P = 1, R = 1/2, F1 = 2/3
    # class 1: tp = 1, predicted 1, true 1 -> F1 = 1
    # class 2: predicted 1, true 0 -> P = 0, R = 0 (0/0), F1 = 0, weight 0
    # weighted: (2 * 2/3 + 1 * 1 + 0 * 0) / 3 = 7/9
    assert weighted_f1(y_true, y_pred) == pytest.approx(7 / 9)


def test_weighted_f1_argument_order_matters():
    y_true = [0, 0, 0, 0, 1, 1]
    y_pred = [0, 0, 0, 1, 1, 1]
    # class 0: tp = 3, predicted 3, true 4 -> P = 1, R = 3/4, F1 = 1.5 / 1.75 = 6/7
    # class 1: tp = 2, predicted 3, true 2 -> P = 2/3, R = 1, F1 = (4/3) / (5/3) = 4/5
    # (truth, pred): weights = truth counts (4, 2): (4 * 6/7 + 2 * 4/5) / 6 = 176/210
    # (pred, truth): per-class F1 is unchanged, weights = predicted counts (3, 3): (6/7 + 4/5) / 2 = 58/70
    assert weighted_f1(y_true, y_pred) == pytest.approx(176 / 210)
    assert weighted_f1(y_pred, y_true) == pytest.approx(58 / 70)


def test_weighted_f1_accepts_bool_and_whole_float_labels():
    as_ints = weighted_f1([1, 0, 1], [1, 1, 1])
    assert weighted_f1([True, False, True], [True, True, True]) == pytest.approx(as_ints)
    assert weighted_f1([1.0, 0.0, 1.0], [1.0, 1.0, 1.0]) == pytest.approx(as_ints)


@pytest.mark.parametrize("n_classes", [2, 3, 5])
@pytest.mark.parametrize("seed", range(5))
def test_weighted_f1_matches_sklearn(n_classes, seed):
    f1_score = pytest.importorskip("sklearn.metrics").f1_score
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, n_classes, size=40)
    y_pred = rng.integers(0, n_classes + 1, size=40)  # sometimes a label that is absent from y_true
    expected = f1_score(y_true, y_pred, average="weighted", zero_division=0)
    assert weighted_f1(y_true, y_pred) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------------------
# MulT's swapped F1
# ---------------------------------------------------------------------------------------------------------

# Non0 classes: the zero truth (last sample) is dropped; the rest is the argument-order case above:
# truth > 0 = [F, F, F, F, T, T], pred > 0 = [F, F, F, T, T, T]
ORDER_TRUTH = [-1.0, -2.0, -1.0, -2.0, 1.0, 2.0, 0.0]
ORDER_PRED = [-1.0, -1.0, -1.0, 0.5, 1.0, 1.0, 3.0]


def test_mult_order_f1_differs_from_the_correct_one():
    # correct (truth, pred): 176/210 = 0.838; MulT's (pred, truth): 58/70 = 0.829 (see the test above)
    assert f1_non0(ORDER_PRED, ORDER_TRUTH) == pytest.approx(176 / 210)
    assert f1_non0_mult_order(ORDER_PRED, ORDER_TRUTH) == pytest.approx(58 / 70)
    assert regression_metrics(ORDER_PRED, ORDER_TRUTH)["f1_non0_mult_order"] == pytest.approx(58 / 70)


def test_has0_f1_on_the_order_case():
    # Has0 keeps the zero truth (T) with pred 3.0 (T):
    # truth >= 0 = [F, F, F, F, T, T, T], pred >= 0 = [F, F, F, T, T, T, T]
    # class F: tp = 3, predicted 3, true 4 -> P = 1, R = 3/4, F1 = 1.5 / 1.75 = 6/7
    # class T: tp = 3, predicted 4, true 3 -> P = 3/4, R = 1, F1 = 6/7
    assert f1_has0(ORDER_PRED, ORDER_TRUTH) == pytest.approx(6 / 7)


def test_regression_binary_metrics_match_sklearn_on_random_scores():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    truth = np.round(rng.uniform(-3, 3, size=200) * 3) / 3  # MOSI-like: multiples of 1/3, some exactly 0
    pred = rng.normal(truth, 1.0)
    keep = truth != 0
    t_pos, p_pos = truth[keep] > 0, pred[keep] > 0
    assert f1_non0(pred, truth) == pytest.approx(sk.f1_score(t_pos, p_pos, average="weighted"))
    assert f1_non0_mult_order(pred, truth) == pytest.approx(sk.f1_score(p_pos, t_pos, average="weighted"))
    assert acc2_non0(pred, truth) == pytest.approx(sk.accuracy_score(truth[keep] > 0, pred[keep] > 0))
    assert f1_has0(pred, truth) == pytest.approx(sk.f1_score(truth >= 0, pred >= 0, average="weighted"))
    assert corr(pred, truth) == pytest.approx(np.corrcoef(pred, truth)[0, 1])


# ---------------------------------------------------------------------------------------------------------
# Undefined cases: nan, quietly
# ---------------------------------------------------------------------------------------------------------


def test_corr_of_constant_pred_is_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(corr([0.3, 0.3, 0.3], [1.0, -1.0, 2.0]))
        assert math.isnan(corr([1.0, -1.0, 2.0], [0.1, 0.1, 0.1]))
        assert math.isnan(corr([1.0], [2.0]))  # one sample: constant on both sides


def test_non0_metrics_are_nan_when_every_truth_is_zero():
    pred, truth = [0.5, -0.5, 1.0], [0.0, 0.0, 0.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = regression_metrics(pred, truth)
    assert math.isnan(result["acc2_non0"])
    assert math.isnan(result["f1_non0"])
    assert math.isnan(result["f1_non0_mult_order"])
    # Has0 is defined: truth >= 0 all T, pred >= 0 = [T, F, T] -> acc 2/3
    assert result["acc2_has0"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------------------
# IEMOCAP
# ---------------------------------------------------------------------------------------------------------

# 5 samples x 4 emotions (neutral, happy, sad, angry), 0 = no, 1 = yes
IEMO_TRUTH = np.array(
    [
        [0, 0, 1, 0],
        [1, 0, 1, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 1],
        [1, 1, 0, 0],
    ]
)
IEMO_PRED = np.array(
    [
        [0, 0, 1, 0],
        [1, 0, 0, 0],
        [1, 0, 0, 0],
        [0, 0, 1, 1],
        [1, 0, 0, 0],
    ]
)


def _one_hot(classes: np.ndarray) -> np.ndarray:
    """(N, 4) class indices -> (N, 4, 2) one-hot over (no, yes)."""
    return np.eye(2)[classes]


def _probs(classes: np.ndarray) -> np.ndarray:
    """(N, 4) class indices -> (N, 4, 2) probabilities whose argmax is the class."""
    return np.where(_one_hot(classes) == 1, 0.8, 0.2)


def test_iemocap_by_hand():
    result = iemocap_metrics(_probs(IEMO_PRED), _one_hot(IEMO_TRUTH))
    expected = {
        # neutral: truth [0,1,0,0,1], pred [0,1,1,0,1] -> 4/5 right
        #   no: tp 2, predicted 2, true 3 -> P 1, R 2/3, F1 0.8;  yes: tp 2, predicted 3, true 2 -> F1 0.8
        #   F1 = (3 * 0.8 + 2 * 0.8) / 5 = 0.8
        #   majority "no" (3 of 5): acc 3/5
        #   F1: no: P 3/5, R 1, F1 1.2/1.6 = 0.75; yes: never predicted, 0 -> 3/5 * 0.75 = 0.45
        "neutral_acc": 0.8,
        "neutral_f1": 0.8,
        "neutral_majority_acc": 0.6,
        "neutral_majority_f1": 0.45,
        # happy: truth [0,0,0,0,1], pred all 0 -> 4/5 right, the same as the majority baseline
        #   no: P 4/5, R 1, F1 1.6/1.8 = 8/9; yes: never predicted -> 0 -> F1 = 4/5 * 8/9 = 32/45
        "happy_acc": 0.8,
        "happy_f1": 32 / 45,
        "happy_majority_acc": 0.8,
        "happy_majority_f1": 32 / 45,
        # sad: truth [1,1,0,0,0], pred [1,0,0,1,0] -> right at i = 0, 2, 4 -> 3/5
        #   no: tp 2, predicted 3, true 3 -> F1 2/3;  yes: tp 1, predicted 2, true 2 -> F1 1/2
        #   F1 = (3 * 2/3 + 2 * 1/2) / 5 = 3/5; majority "no" (3 of 5): acc 3/5, F1 0.45 as for neutral
        "sad_acc": 0.6,
        "sad_f1": 0.6,
        "sad_majority_acc": 0.6,
        "sad_majority_f1": 0.45,
        # angry: truth = pred = [0,0,0,1,0] -> acc 1, F1 1; majority "no" (4 of 5): acc 4/5, F1 32/45 as happy
        "angry_acc": 1.0,
        "angry_f1": 1.0,
        "angry_majority_acc": 0.8,
        "angry_majority_f1": 32 / 45,
        # means over the 4 emotions
        "mean_acc": (0.8 + 0.8 + 0.6 + 1.0) / 4,  # = 0.8
        "mean_f1": (0.8 + 32 / 45 + 0.6 + 1.0) / 4,  # = (108/45 + 32/45) / 4 = 7/9
    }
    assert set(result) == set(expected)
    assert result == pytest.approx(expected)
    assert result["mean_f1"] == pytest.approx(7 / 9)


def test_iemocap_integer_labels_and_logits_give_the_same_result():
    logits = np.log(_probs(IEMO_PRED))  # same argmax as the probabilities
    from_one_hot = iemocap_metrics(_probs(IEMO_PRED), _one_hot(IEMO_TRUTH))
    assert iemocap_metrics(logits, IEMO_TRUTH) == pytest.approx(from_one_hot)


def test_iemocap_keys_follow_emotions_order():
    keys = list(iemocap_metrics(_probs(IEMO_PRED), IEMO_TRUTH))
    assert EMOTIONS == ("neutral", "happy", "sad", "angry")
    assert keys[:4] == ["neutral_acc", "neutral_f1", "neutral_majority_acc", "neutral_majority_f1"]
    assert keys[-2:] == ["mean_acc", "mean_f1"]


def test_iemocap_majority_tie_goes_to_no():
    truth = np.array([[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])  # neutral: 2 no, 2 yes
    result = iemocap_metrics(_probs(truth), truth)
    # tie -> baseline predicts "no" everywhere: acc 2/4; F1: no: P 1/2, R 1, F1 2/3; yes: 0 -> 2/4 * 2/3 = 1/3
    assert result["neutral_majority_acc"] == pytest.approx(0.5)
    assert result["neutral_majority_f1"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------------------


def test_mismatched_lengths_name_both_shapes():
    with pytest.raises(ValueError, match=r"pred has shape \(3,\) but truth has shape \(2,\)"):
        mae([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"y_true has shape \(2,\) but y_pred has shape \(3,\)"):
        weighted_f1([0, 1], [0, 1, 1])


def test_wrong_regression_shape_says_what_to_pass():
    with pytest.raises(ValueError, match=r"pred has shape \(3, 2\); .*\(N,\), \(N, 1\) or \(N, 1, 1\)"):
        regression_metrics(np.zeros((3, 2)), np.zeros(3))


def test_nan_input_says_how_many_and_where():
    with pytest.raises(ValueError, match=r"pred has 2 NaN/inf values \(at index 1, 3\)"):
        mae([1.0, float("nan"), 3.0, float("inf")], [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match=r"truth has 1 NaN/inf values"):
        regression_metrics([1.0, 2.0], [float("nan"), 2.0])


def test_empty_input_is_rejected():
    with pytest.raises(ValueError, match=r"pred is empty"):
        mae([], [])
    with pytest.raises(ValueError, match=r"y_true is empty"):
        weighted_f1([], [])
    with pytest.raises(ValueError, match=r"logits_or_probs is empty"):
        iemocap_metrics(np.zeros((0, 4, 2)), np.zeros((0, 4)))


def test_weighted_f1_rejects_scores():
    with pytest.raises(ValueError, match=r"y_pred holds non-integer values.*pred > 0"):
        weighted_f1([0, 1], [0.3, 0.7])


def test_iemocap_input_errors():
    with pytest.raises(ValueError, match=r"logits_or_probs has shape \(5, 8\).*\(N, 4, 2\)"):
        iemocap_metrics(np.zeros((5, 8)), IEMO_TRUTH)
    with pytest.raises(ValueError, match=r"has shape \(5, 4, 2\) but labels has shape \(4, 4\)"):
        iemocap_metrics(_probs(IEMO_PRED), IEMO_TRUTH[:4])
    with pytest.raises(ValueError, match=r"labels has shape \(5, 3\)"):
        iemocap_metrics(_probs(IEMO_PRED), IEMO_TRUTH[:, :3])
    with pytest.raises(ValueError, match=r"one-hot"):
        iemocap_metrics(_probs(IEMO_PRED), np.ones((5, 4, 2)))
    bad = _probs(IEMO_PRED)
    bad[2, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"logits_or_probs has 1 NaN/inf values \(at index \(2, 1, 0\)\)"):
        iemocap_metrics(bad, IEMO_TRUTH)


# ---------------------------------------------------------------------------------------------------------
# torch tensors
# ---------------------------------------------------------------------------------------------------------


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    pred = torch.tensor(PRED, requires_grad=True).reshape(-1, 1)  # (N, 1), as a model outputs it
    truth = torch.tensor(TRUTH).reshape(-1, 1, 1)  # (N, 1, 1), as in the MulT files
    assert regression_metrics(pred, truth) == pytest.approx(regression_metrics(PRED, TRUTH))
    assert mae(pred.to(torch.bfloat16), truth) == pytest.approx(mae(PRED, TRUTH), abs=0.02)
    logits = torch.from_numpy(np.log(_probs(IEMO_PRED)))
    labels = torch.from_numpy(IEMO_TRUTH)
    assert iemocap_metrics(logits, labels) == pytest.approx(iemocap_metrics(_probs(IEMO_PRED), IEMO_TRUTH))
