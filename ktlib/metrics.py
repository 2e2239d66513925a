"""The paper's evaluation metrics, with both binary conventions written out.

Regression (CMU-MOSI, CMU-MOSEI: sentiment scores in [-3, 3]). Every function takes ``(pred, truth)``.

* ``mae``: mean absolute error. ``corr``: Pearson correlation; ``nan`` when either side is constant.
* ``acc7`` / ``acc5``: clip to [-3, 3] / [-2, 2], round to the nearest integer, count exact matches.
  numpy rounds halves to even (``np.round(2.5) == 2``, ``np.round(-0.5) == -0.0``), as MulT and MMSA do.
* Binary accuracy and F1 come in two conventions that give different numbers on the same predictions:

  - "Non0" (MulT, and the paper): drop the samples whose truth is exactly 0, then compare
    ``truth > 0`` with ``pred > 0``. When no truth is nonzero the Non0 metrics are ``nan``.
  - "Has0" (MMSA): keep every sample, compare ``truth >= 0`` with ``pred >= 0``.

* F1 is sklearn's weighted F1 called as ``(truth, pred)``: per-class F1 weighted by the class's count in the
  truth. MulT's published code calls it as ``(pred, truth)``, which weights by the predicted counts instead.
  ``f1_non0_mult_order`` reproduces that bug; use it only to compare with numbers published by MulT.

Classification (IEMOCAP): four binary tasks, one per emotion in ``EMOTIONS``, with scores of shape (N, 4, 2)
over emotion x (no, yes). Per emotion: argmax over (no, yes), accuracy and weighted F1, and beside them the
majority baseline (always predicting the most frequent class), which already scores high on these
imbalanced tasks.

All accuracies and F1 scores are fractions in [0, 1]; results tables multiply them by 100.

Inputs may be numpy arrays, lists or torch tensors (any device, with or without grad). Regression arrays of
shape (N,), (N, 1) or (N, 1, 1) are flattened to (N,). Invalid inputs (mismatched shapes, empty arrays,
NaN/inf values) raise ``ValueError`` with a message that says what is wrong and what to pass.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .specs import EMOTIONS  # IEMOCAP label rows: labels (N, 4, 2) one-hot over emotion x (no, yes)

_MAX_POSITIONS_SHOWN = 5  # how many offending positions an error message lists


# ----------------------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------------------

# Lower is better for these metrics (and the losses); higher for every other one.
LOWER_IS_BETTER = ("mae", "loss")
# The one number a run is judged by when one is needed (curves, verdicts, the ablation table): MAE for the sentiment
# scores of MOSI and MOSEI, the mean accuracy over the four emotions for IEMOCAP.
HEADLINE = {"regression": "mae", "classification": "mean_acc"}


def headline_metric(task: str) -> str:
    """The headline metric of a task (:data:`HEADLINE`): ``"mae"`` for regression, ``"mean_acc"`` for
    classification.  Prefix ``valid_`` for the column of a run's history."""
    if task not in HEADLINE:
        raise ValueError(f"task must be one of {tuple(HEADLINE)}, got {task!r}")
    return HEADLINE[task]


def _to_numpy(x: npt.ArrayLike) -> np.ndarray:
    """Return ``x`` as a numpy array; torch tensors are detached and copied to the CPU first."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
    return np.asarray(x)


def _check_numeric(arr: np.ndarray, name: str) -> None:
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} has dtype {arr.dtype}; pass numbers (a float, int or bool array or tensor)")


def _check_finite(arr: np.ndarray, name: str) -> None:
    """Raise if ``arr`` holds NaN or inf, saying how many and where."""
    bad = ~np.isfinite(arr)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return
    positions = np.argwhere(bad)[:_MAX_POSITIONS_SHOWN]
    if arr.ndim == 1:
        shown = ", ".join(str(int(p[0])) for p in positions)
    else:
        shown = ", ".join(str(tuple(int(i) for i in p)) for p in positions)
    more = ", ..." if n_bad > _MAX_POSITIONS_SHOWN else ""
    raise ValueError(
        f"{name} has {n_bad} NaN/inf values (at index {shown}{more}); "
        "drop those samples or fix where they come from before scoring"
    )


def _check_samples(arr: np.ndarray, name: str) -> None:
    """Raise if ``arr`` has no sample, or holds NaN or inf."""
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); pass at least one sample")
    _check_finite(arr, name)


def _flatten(arr: np.ndarray, name: str, what: str) -> np.ndarray:
    """(N,), (N, 1) or (N, 1, 1) -> (N,); anything else, or an empty array, is an error."""
    if arr.ndim == 0 or any(d != 1 for d in arr.shape[1:]):
        raise ValueError(f"{name} has shape {arr.shape}; pass {what}, shape (N,), (N, 1) or (N, 1, 1)")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); pass at least one sample")
    return arr.reshape(-1)


def _check_same_length(a: np.ndarray, b: np.ndarray, a_name: str, b_name: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{a_name} has shape {a.shape} but {b_name} has shape {b.shape}; "
            f"pass one {a_name} and one {b_name} per sample, in the same order"
        )


def _regression_pair(pred: npt.ArrayLike, truth: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate regression inputs and return them as float64 arrays of shape (N,)."""
    pred_arr, truth_arr = _to_numpy(pred), _to_numpy(truth)
    _check_numeric(pred_arr, "pred")
    _check_numeric(truth_arr, "truth")
    p = _flatten(pred_arr, "pred", "one predicted score per sample")
    t = _flatten(truth_arr, "truth", "one true score per sample")
    _check_same_length(pred_arr, truth_arr, "pred", "truth")
    p, t = p.astype(np.float64), t.astype(np.float64)
    _check_finite(p, "pred")
    _check_finite(t, "truth")
    return p, t


def _as_labels(arr: np.ndarray, name: str) -> np.ndarray:
    """Integer class labels as int64; bools become 0/1, floats are accepted when they are whole numbers."""
    _check_numeric(arr, name)
    if arr.dtype.kind == "f":
        _check_finite(arr, name)
        if not np.all(arr == np.round(arr)):
            raise ValueError(
                f"{name} holds non-integer values; pass class labels (int or bool), "
                "e.g. threshold regression scores first with `pred > 0`"
            )
    return arr.astype(np.int64)


def _label_pair(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate class-label inputs and return them as int64 arrays of shape (N,)."""
    true_arr, pred_arr = _to_numpy(y_true), _to_numpy(y_pred)
    t = _flatten(true_arr, "y_true", "one class label per sample")
    p = _flatten(pred_arr, "y_pred", "one class label per sample")
    _check_same_length(true_arr, pred_arr, "y_true", "y_pred")
    return _as_labels(t, "y_true"), _as_labels(p, "y_pred")


# ----------------------------------------------------------------------------------------------------------
# Regression metrics
# ----------------------------------------------------------------------------------------------------------


def mae(pred: npt.ArrayLike, truth: npt.ArrayLike) -> float:
    """Mean absolute error, mean(|pred - truth|)."""
    p, t = _regression_pair(pred, truth)
    return float(np.mean(np.abs(p - t)))


def corr(pred: npt.ArrayLike, truth: npt.ArrayLike) -> float:
    """Pearson correlation between pred and truth.

    Returns ``nan`` (silently, no warning) when either side is constant, a single sample included: the
    correlation is undefined there. A model that predicts the same score for every sample hits this case.
    """
    p, t = _regression_pair(pred, truth)
    if np.all(p == p[0]) or np.all(t == t[0]):
        return float("nan")
    dp, dt = p - p.mean(), t - t.mean()
    r = np.sum(dp * dt) / np.sqrt(np.sum(dp**2) * np.sum(dt**2))
    return float(np.clip(r, -1.0, 1.0))  # guard against rounding just past +-1


def _rounded_accuracy(pred: npt.ArrayLike, truth: npt.ArrayLike, bound: float) -> float:
    p, t = _regression_pair(pred, truth)
    p_class = np.round(np.clip(p, -bound, bound))  # np.round: halves go to the even neighbour
    t_class = np.round(np.clip(t, -bound, bound))
    return float(np.mean(p_class == t_class))


def acc7(pred: npt.ArrayLike, truth: npt.ArrayLike) -> float:
    """7-class accuracy: round(clip(x, -3, 3)) equal for pred and truth (classes -3..3, halves to even)."""
    return _rounded_accuracy(pred, truth, bound=3.0)


def acc5(pred: npt.ArrayLike, truth: npt.ArrayLike) -> float:
    """5-class accuracy: round(clip(x, -2, 2)) equal for pred and truth (classes -2..2, halves to even)."""
    return _rounded_accuracy(pred, truth, bound=2.0)


def weighted_f1(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """Weighted F1 over integer or bool class labels, as sklearn's ``f1_score(average="weighted")``.

    For each class in the union of the labels in ``y_true`` and ``y_pred``: precision and recall (0 when
    their denominator is 0), F1 = 2PR / (P + R) (0 when P + R = 0). The classes' F1 scores are averaged with
    weights equal to each class's count in ``y_true``, so the argument order matters.
    """
    t, p = _label_pair(y_true, y_pred)
    total = 0.0
    for label in np.union1d(t, p):
        is_true, is_pred = t == label, p == label
        true_positives = np.sum(is_true & is_pred)
        n_pred, support = np.sum(is_pred), np.sum(is_true)
        precision = true_positives / n_pred if n_pred > 0 else 0.0
        recall = true_positives / support if support > 0 else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        total += support * f1
    return float(total / t.size)


def _non0_classes(pred: npt.ArrayLike, truth: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """MulT's binary classes: samples with truth != 0 only, then (pred > 0, truth > 0)."""
    p, t = _regression_pair(pred, truth)
    keep = t != 0
    return p[keep] > 0, t[keep] > 0


def _has0_classes(pred: npt.ArrayLike, truth: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """MMSA's binary classes: all samples, (pred >= 0, truth >= 0)."""
    p, t = _regression_pair(pred, truth)
    return p >= 0, t >= 0


def acc2_non0(pred: npt.ArrayLike, truth: npt.ArrayLike) -> float:
    """Binary accuracy, MulT's "Non0" convention: samples with truth != 0, truth > 0 vs pred > 0.

    ``nan`` when every truth is 0.
    """
    p_pos, t_pos = _non0_classes(pred, truth)
    return float(np.mean(p_pos == t_pos)) if t_pos.size else float("nan")


def f1_non0(pred: npt.ArrayLike, truth: npt.ArrayLike) -> float:
    """Weighted F1, "Non0" convention, called correctly as (truth, pred). ``nan`` when every truth is 0."""
    p_pos, t_pos = _non0_classes(pred, truth)
    return weighted_f1(t_pos, p_pos) if t_pos.size else float("nan")


def f1_non0_mult_order(pred: npt.ArrayLike, truth: npt.ArrayLike) -> float:
    """Weighted F1, "Non0", with MulT's swapped argument order (pred, truth). For comparison only.

    MulT's published evaluation code passes the predictions where sklearn expects the truth, so its F1 is
    weighted by the predicted class counts. Its published F1 scores were computed this way; use this
    function only to compare with them, and ``f1_non0`` for everything else. ``nan`` when every truth is 0.
    """
    p_pos, t_pos = _non0_classes(pred, truth)
    return weighted_f1(p_pos, t_pos) if t_pos.size else float("nan")


def acc2_has0(pred: npt.ArrayLike, truth: npt.ArrayLike) -> float:
    """Binary accuracy, MMSA's "Has0" convention: all samples, truth >= 0 vs pred >= 0."""
    p_pos, t_pos = _has0_classes(pred, truth)
    return float(np.mean(p_pos == t_pos))


def f1_has0(pred: npt.ArrayLike, truth: npt.ArrayLike) -> float:
    """Weighted F1, "Has0" convention, called correctly as (truth, pred)."""
    p_pos, t_pos = _has0_classes(pred, truth)
    return weighted_f1(t_pos, p_pos)


def regression_metrics(pred: npt.ArrayLike, truth: npt.ArrayLike) -> dict[str, float]:
    """All regression metrics at once, as fractions in [0, 1] (tables multiply by 100).

    Keys: mae, corr, acc7, acc5, acc2_non0, f1_non0, acc2_has0, f1_has0, f1_non0_mult_order (the last one
    only for comparison with MulT's published numbers).
    """
    p, t = _regression_pair(pred, truth)
    return {
        "mae": mae(p, t),
        "corr": corr(p, t),
        "acc7": acc7(p, t),
        "acc5": acc5(p, t),
        "acc2_non0": acc2_non0(p, t),
        "f1_non0": f1_non0(p, t),
        "acc2_has0": acc2_has0(p, t),
        "f1_has0": f1_has0(p, t),
        "f1_non0_mult_order": f1_non0_mult_order(p, t),
    }


# ----------------------------------------------------------------------------------------------------------
# IEMOCAP
# ----------------------------------------------------------------------------------------------------------


def _iemocap_truth(arr: np.ndarray) -> np.ndarray:
    """One-hot labels (N, 4, 2) or class indices (N, 4) -> class indices (N, 4), 0 = no, 1 = yes."""
    _check_numeric(arr, "labels")
    n_emotions = len(EMOTIONS)
    if arr.ndim == 3 and arr.shape[1:] == (n_emotions, 2):
        one_hot = True
    elif arr.ndim == 2 and arr.shape[1] == n_emotions:
        one_hot = False
    else:
        raise ValueError(
            f"labels has shape {arr.shape}; pass one-hot labels of shape (N, 4, 2) over emotion x (no, yes) "
            "as in the MulT files, or class indices of shape (N, 4) with 0 = no and 1 = yes"
        )
    _check_samples(arr, "labels")
    if not np.isin(arr, (0, 1)).all():
        raise ValueError("labels must hold only 0 and 1 (one-hot rows, or class indices 0 = no, 1 = yes)")
    if not one_hot:
        return arr.astype(np.int64)
    if not np.all(arr.sum(axis=-1) == 1):
        raise ValueError("labels of shape (N, 4, 2) must be one-hot: exactly one 1 per (sample, emotion)")
    return arr.argmax(axis=-1)


def _majority_class(truth: np.ndarray) -> int:
    """Most frequent class in ``truth``; ties go to class 0 ("no")."""
    return int(np.argmax(np.bincount(truth, minlength=2)))  # argmax returns the first maximum


def iemocap_metrics(logits_or_probs: npt.ArrayLike, labels: npt.ArrayLike) -> dict[str, float]:
    """Per-emotion accuracy and weighted F1 on IEMOCAP, with the majority baseline beside each.

    ``logits_or_probs``: (N, 4, 2) scores over emotion x (no, yes); the prediction is the argmax over the last
    axis (a tie picks "no"). ``labels``: one-hot (N, 4, 2), or class indices (N, 4).

    Keys, for each emotion e in ``EMOTIONS``: ``{e}_acc``, ``{e}_f1`` (weighted F1 as (truth, pred)),
    ``{e}_majority_acc`` and ``{e}_majority_f1`` (a baseline that predicts, for every sample, the most
    frequent class of the truth being scored; ties go to "no"); then ``mean_acc`` and ``mean_f1``, the means
    over the four emotions.
    """
    scores = _to_numpy(logits_or_probs)
    _check_numeric(scores, "logits_or_probs")
    if scores.ndim != 3 or scores.shape[1:] != (len(EMOTIONS), 2):
        raise ValueError(
            f"logits_or_probs has shape {scores.shape}; pass scores of shape (N, 4, 2) over "
            "emotion x (no, yes) (reshape MulT's (N, 8) output with .reshape(-1, 4, 2))"
        )
    _check_samples(scores, "logits_or_probs")
    labels_arr = _to_numpy(labels)
    truth = _iemocap_truth(labels_arr)  # (N, 4)
    _check_same_length(scores, labels_arr, "logits_or_probs", "labels")
    pred = scores.argmax(axis=-1)  # (N, 4)

    result: dict[str, float] = {}
    for i, emotion in enumerate(EMOTIONS):
        t, p = truth[:, i], pred[:, i]
        majority = np.full_like(t, _majority_class(t))
        result[f"{emotion}_acc"] = float(np.mean(p == t))
        result[f"{emotion}_f1"] = weighted_f1(t, p)
        result[f"{emotion}_majority_acc"] = float(np.mean(majority == t))
        result[f"{emotion}_majority_f1"] = weighted_f1(t, majority)
    result["mean_acc"] = float(np.mean([result[f"{e}_acc"] for e in EMOTIONS]))
    result["mean_f1"] = float(np.mean([result[f"{e}_f1"] for e in EMOTIONS]))
    return result


def task_metrics(pred: npt.ArrayLike, truth: npt.ArrayLike, task: str) -> dict[str, float]:
    """Every metric of a task: ``regression`` (scores, any (N, 1...) shape) or ``classification`` (IEMOCAP
    (N, 4, 2) scores against one-hot (N, 4, 2) or index (N, 4) labels)."""
    if task == "classification":
        return iemocap_metrics(pred, truth)
    if task != "regression":
        raise ValueError(f"task must be 'regression' or 'classification', got {task!r}")
    return regression_metrics(pred, truth)
