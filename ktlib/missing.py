"""Missing-data protocols: named, documented, seeded transforms of presence matrices and batches, and AUILC.

Other systems report robustness to missing data under a few protocols (frame-level: TFR-Net, EMT-DLFR, LNLN;
modality-level: GCNet, IMDer, MMIN); this module writes each one down once so every model is scored under exactly
the same masks.

Protocols (:class:`Protocol`, field ``kind``)
---------------------------------------------
- ``"none"``: complete data.
- ``"fixed"``: the listed modalities (e.g. ``("a",)``) are absent for every sample.  Not all three.
- ``"modality"``: modality-level random missing (GCNet, IMDer, MMIN).  Per sample, each of l, a, v is missing
  independently with probability ``rate``; when all three come out missing, **one of them, chosen uniformly at
  random (an independent draw per sample), is kept**.  So every sample keeps at least one modality, and the
  realised missing rate per (sample, modality) is ``r - r**3 / 3`` (:func:`expected_modality_missing_rate`):
  slightly below ``r`` at high rates, 2/3 at ``r = 1``, where exactly one modality per sample remains.
- ``"frame"``: frame-level random missing (TFR-Net, EMT-DLFR, LNLN).  Per sample and modality, each real
  (non-padding) frame is missing independently with probability ``rate`` (Bernoulli), and missing frames are
  zeroed in the features.  Padding frames are left alone and do not count toward the rate.  Padding masks and
  presence are unchanged: a dropped frame is a zero vector the model still attends to (as in those systems), and
  a modality stays "present" even when all of its frames were dropped (always so at ``r = 1``).

Where they act (``phase``)
--------------------------
- ``"test"``: the validation and test splits only; training data is complete.  Validation follows the test
  condition, as in :mod:`ktlib.train` ("the model is selected and scored exactly as it will be used").
- ``"train_test"``: every split (missing at train and test, as in TFR-Net and EMT-DLFR).

:func:`applies` says whether a protocol changes a given split.

How to use them with :func:`ktlib.data.make_loader`
---------------------------------------------------
- fixed / modality: ``make_loader(data, split, missing=protocol.presence(len(data[split]), split))``; the loader
  then never reads the absent entries.
- frame: ``batch, dropped = protocol.apply_batch(batch, split)`` on each batch (a new dict; the input tensors are
  not modified).

Randomness
----------
Everything is drawn from ``numpy.random.Generator`` / ``torch.Generator`` objects seeded explicitly, never from
global random state.  A protocol's draws are keyed on (``seed``, the protocol kind, the split, ``epoch``) and, for
frame-level missing, on each sample's index in its split (a batch's ``index`` key), so a sample gets the same
frames dropped whatever the batch size or order, and every model is scored on the same masks.  Pass a new
``epoch`` to draw fresh masks during training.

AUILC
-----
:func:`auilc` is the area under the metric-vs-missing-rate curve by the trapezoid rule, divided by the span of
the rates so that it reads in the metric's units (over :data:`RATES`, 0.0 .. 1.0, the span is 1 and both forms
agree with the papers' "trapezoid over r = 0.0 .. 1.0 step 0.1").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from .data import presence_matrix
from .specs import MODALITIES, MODALITY_NAMES, SPLITS

KINDS = ("none", "fixed", "modality", "frame")
PHASES = ("test", "train_test")
RATES = np.round(np.arange(0, 1.01, 0.1), 1)  # 0.0, 0.1, ..., 1.0: the rates of the published sweeps

# Separate random streams per protocol kind and split, so that e.g. the train and test masks are unrelated.
_STREAM = {"modality": 1, "frame": 2}
_SPLIT_CODE = {split: i for i, split in enumerate(SPLITS)}
_PHASE_LABEL = {"test": "test only", "train_test": "train+test"}

SeedLike = int | Sequence[int]


# ----------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------


def _check_rate(rate: object, name: str = "rate") -> float:
    """``rate`` as a float, or ValueError unless it is a finite number in [0, 1]."""
    if isinstance(rate, bool) or not isinstance(rate, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a number in [0, 1], got {rate!r} ({type(rate).__name__})")
    value = float(rate)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (a missing probability), got {value!r}")
    return value


def _check_split(split: object) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return split  # type: ignore[return-value]


def _check_n(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n (number of samples) must be an integer >= 0, got {n!r}")
    return int(n)


def _check_epoch(epoch: object) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int | np.integer) or epoch < 0:
        raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
    return int(epoch)


def _seed_words(seed: object) -> list[int]:
    """A seed (int >= 0, or a sequence of them) as a list of words for ``numpy.random.SeedSequence``."""
    words = [seed] if isinstance(seed, int | np.integer) and not isinstance(seed, bool) else seed
    if isinstance(words, str | bytes) or not isinstance(words, Sequence) or len(words) == 0:
        raise ValueError(f"seed must be an integer >= 0 or a non-empty sequence of them, got {seed!r}")
    for w in words:
        if isinstance(w, bool) or not isinstance(w, int | np.integer) or w < 0:
            raise ValueError(f"seed must be an integer >= 0 or a non-empty sequence of them, got {seed!r}")
    return [int(w) for w in words]


def _check_modalities(modalities: Iterable[str] | str) -> tuple[str, ...]:
    """Missing modalities as a tuple in (l, a, v) order; unknown names and repeats are errors."""
    listed = (modalities,) if isinstance(modalities, str) else tuple(modalities)
    unknown = [m for m in listed if m not in MODALITIES]
    if unknown:
        raise ValueError(f"unknown modality {unknown}; use 'l', 'a', 'v' (language, audio, vision)")
    if len(set(listed)) != len(listed):
        raise ValueError(f"modalities lists a modality more than once: {listed}; list each missing one once")
    return tuple(m for m in MODALITIES if m in listed)


# ----------------------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """One missing-data protocol (see the module docstring for what each ``kind`` does).

    ``kind``: "none" | "fixed" | "modality" | "frame".  ``rate``: missing probability in [0, 1], for "modality"
    and "frame" only (0 otherwise).  ``modalities``: for "fixed" only, the modalities absent for every sample, in
    any order (stored in (l, a, v) order), one or two of them.  ``phase``: "test" (valid and test splits) or
    "train_test" (every split).  ``seed``: integer >= 0 that fixes every draw.
    """

    kind: str
    rate: float = 0.0
    modalities: tuple[str, ...] = ()
    phase: str = "test"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.phase not in PHASES:
            raise ValueError(f"phase must be 'test' (missing at valid/test only) or 'train_test' (missing in every "
                             f"split), got {self.phase!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        rate = _check_rate(self.rate)
        modalities = _check_modalities(self.modalities)
        if self.kind in ("modality", "frame") and modalities:
            raise ValueError(f"modalities={modalities} applies to kind 'fixed' only; a {self.kind!r} protocol "
                             f"draws missing entries at random over all modalities, so leave modalities empty")
        if self.kind in ("none", "fixed") and rate != 0.0:
            raise ValueError(f"rate={rate} applies to kinds 'modality' and 'frame' only; a {self.kind!r} protocol "
                             f"has no rate, so leave it at 0")
        if self.kind == "fixed":
            if not modalities:
                raise ValueError("a 'fixed' protocol needs the missing modalities, e.g. modalities=('a',)")
            if len(modalities) == len(MODALITIES):
                raise ValueError(f"a 'fixed' protocol cannot remove all three modalities {modalities}; "
                                 f"list one or two of 'l', 'a', 'v'")
        object.__setattr__(self, "rate", rate)
        object.__setattr__(self, "modalities", modalities)
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def name(self) -> str:
        """A short slug for file names and table keys, e.g. ``modality-r0.3-train_test`` (the seed is left out)."""
        if self.kind == "none":
            return "none"
        if self.kind == "fixed":
            return f"fixed-{''.join(self.modalities)}-{self.phase}"
        return f"{self.kind}-r{self.rate:g}-{self.phase}"

    def describe(self) -> str:
        """A short human label, e.g. ``modality-level random missing, r=0.3, train+test``."""
        if self.kind == "none":
            return "complete data (no missing)"
        phase = _PHASE_LABEL[self.phase]
        if self.kind == "fixed":
            names = "+".join(MODALITY_NAMES[m] for m in self.modalities)
            return f"fixed missing {names}, {phase}"
        return f"{self.kind}-level random missing, r={self.rate:g}, {phase}"

    def __str__(self) -> str:
        return self.describe()

    def applies_to(self, split: str) -> bool:
        """Whether this protocol changes data of ``split``; see :func:`applies`."""
        return applies(self, split)

    def presence(self, n: int, split: str, epoch: int = 0) -> np.ndarray:
        """(n, 3) bool presence matrix in (l, a, v) order for ``split``, for ``make_loader(missing=...)``.

        All True where the protocol does not apply to ``split`` and for kinds "none" and "frame" (frame-level
        missing keeps every modality present).  "modality" draws are keyed on (seed, split, ``epoch``).
        """
        n = _check_n(n)
        _check_split(split)
        epoch = _check_epoch(epoch)
        if self.applies_to(split) and self.kind == "fixed":
            return fixed_presence(n, self.modalities)
        if self.applies_to(split) and self.kind == "modality":
            return modality_presence(n, self.rate, self._seed_for(split, epoch))
        return np.ones((n, len(MODALITIES)), dtype=bool)

    def apply_batch(self, batch: Mapping[str, torch.Tensor], split: str,
                    epoch: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Frame-level missing on one batch of ``split`` (see :func:`drop_frames`); keyed on each sample's index.

        Returns a new batch dict and ``{m: (B, T_m) bool}`` True on dropped frames.  For other kinds, or a split
        the protocol does not apply to, the batch comes back unchanged (a new dict holding the same tensors) with
        all-False frame masks; fixed and modality-level missing are applied by the loader through :meth:`presence`.
        """
        _check_split(split)
        epoch = _check_epoch(epoch)
        if self.kind == "frame" and self.applies_to(split):
            return drop_frames(batch, self.rate, seed=self._seed_for(split, epoch))
        _batch_modalities(batch)  # same checks whichever protocol is in use
        return dict(batch), {m: torch.zeros_like(batch[f"mask_{m}"]) for m in MODALITIES if m in batch}

    def _seed_for(self, split: str, epoch: int) -> list[int]:
        return [self.seed, _STREAM[self.kind], _SPLIT_CODE[split], epoch]


def applies(protocol: Protocol, split: str) -> bool:
    """Whether ``protocol`` changes data of ``split`` ("train" | "valid" | "test").

    "test"-phase protocols change the valid and test splits and leave training data complete; "train_test"
    protocols change every split; kind "none" changes nothing.
    """
    if not isinstance(protocol, Protocol):
        raise ValueError(f"protocol must be a Protocol, got {type(protocol).__name__}")
    _check_split(split)
    if protocol.kind == "none":
        return False
    return protocol.phase == "train_test" or split in ("valid", "test")


def sweep(kind: str, rates: Iterable[float] = RATES, phase: str = "test", seed: int = 0) -> list[Protocol]:
    """One "modality" or "frame" protocol per rate (default :data:`RATES`), for an AUILC curve."""
    if kind not in ("modality", "frame"):
        raise ValueError(f"a rate sweep needs kind 'modality' or 'frame', got {kind!r}")
    return [Protocol(kind, rate=float(r), phase=phase, seed=seed) for r in rates]


# ----------------------------------------------------------------------------------------------------------
# Fixed and modality-level missing: presence matrices
# ----------------------------------------------------------------------------------------------------------


def fixed_presence(n: int, modalities: Iterable[str] | str) -> np.ndarray:
    """(n, 3) bool presence in (l, a, v) order with ``modalities`` absent for every sample (one or two of them)."""
    n = _check_n(n)
    missing = _check_modalities(modalities)
    if len(missing) == len(MODALITIES):
        raise ValueError(f"cannot remove all three modalities {missing}; list one or two of 'l', 'a', 'v'")
    return presence_matrix(n, missing)


def modality_presence(n: int, rate: float, seed: SeedLike | np.random.Generator) -> np.ndarray:
    """(n, 3) bool presence in (l, a, v) order: modality-level random missing, at least one modality kept.

    Rule: draw ``u ~ U[0, 1)`` of shape (n, 3) and ``k ~ uniform{0, 1, 2}`` of shape (n,), in that order, from
    ``numpy.random.default_rng(seed)`` (or the Generator passed).  Entry (i, j) is missing when ``u[i, j] < rate``;
    in a row where all three are missing, modality ``k[i]`` is kept.  Hence P(missing) per entry is
    ``rate - rate**3 / 3`` (:func:`expected_modality_missing_rate`), and at ``rate = 1`` exactly one modality per
    sample, uniformly chosen, remains.
    """
    n = _check_n(n)
    rate = _check_rate(rate)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(_seed_words(seed))
    u = rng.random((n, len(MODALITIES)))
    keep = rng.integers(0, len(MODALITIES), size=n)
    missing = u < rate
    all_missing = missing.all(axis=1)
    missing[all_missing, keep[all_missing]] = False
    return ~missing


def subset_presence(n: int, seed: SeedLike | np.random.Generator) -> np.ndarray:
    """(n, 3) bool in (l, a, v) order: each row one of the 7 non-empty subsets of the modalities, uniformly.

    Training-time simulation for models that must handle any subset (``TrainConfig.train_drop="subsets"``): each
    modality is then missing with probability 3/7 and each of the 7 patterns a test sample can have is seen
    equally often.
    """
    n = _check_n(n)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(_seed_words(seed))
    code = rng.integers(1, 2 ** len(MODALITIES), size=n)  # 1..7, the bits of a non-empty subset
    return (code[:, None] >> np.arange(len(MODALITIES))[None, :]) & 1 == 1


def narrow(present: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """``present & allowed`` row by row, except that a row left with nothing keeps ``present`` (one modality at
    least); (n, 3) bool in (l, a, v) order (the mask vocabulary is in :mod:`ktlib.model`)."""
    both = present & allowed
    empty = ~both.any(axis=1)
    both[empty] = present[empty]
    return both


def expected_modality_missing_rate(rate: float) -> float:
    """Expected share of missing (sample, modality) entries under :func:`modality_presence`: ``r - r**3 / 3``.

    An entry is missing when drawn missing (probability r), unless all three were (r**3) and it is the one kept
    (1/3).  Below r by r**3 / 3: 0.0003 at r = 0.1, 0.009 at r = 0.3, 0.114 at r = 0.7, 1/3 at r = 1.
    """
    r = _check_rate(rate)
    return r - r**3 / 3


# ----------------------------------------------------------------------------------------------------------
# Frame-level missing
# ----------------------------------------------------------------------------------------------------------


def _batch_modalities(batch: object) -> tuple[list[str], int]:
    """The modalities a batch holds (with their padding masks) and its size; ValueError for a malformed batch."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"batch must be a dict of tensors as made by make_loader, got {type(batch).__name__}")
    found = [m for m in MODALITIES if m in batch]
    if not found:
        raise ValueError(f"batch has none of the feature keys {list(MODALITIES)}; found keys {sorted(batch)}")
    size = None
    for m in found:
        x, mask = batch[m], batch.get(f"mask_{m}")
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
            raise ValueError(f"batch[{m!r}] must be a float tensor (B, T, D), got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"batch needs 'mask_{m}', a bool tensor (B, T) = {tuple(x.shape[:2])} True on padding "
                             f"frames, got {getattr(mask, 'dtype', type(mask).__name__)} "
                             f"{tuple(getattr(mask, 'shape', ()))}")
        if size is None:
            size = x.shape[0]
        elif x.shape[0] != size:
            raise ValueError(f"batch[{m!r}] has {x.shape[0]} samples but batch[{found[0]!r}] has {size}")
    return found, int(size)


def _uniforms_per_sample(indices: Iterable[int], lengths: Mapping[str, int],
                         seed: SeedLike) -> dict[str, np.ndarray]:
    """U[0, 1) draws (n, T_m) per modality, row i from ``default_rng([*seed, indices[i]])``, modalities in
    (l, a, v) order over every frame (padding included), so a sample's draws do not depend on its batch."""
    words = _seed_words(seed)
    rows: dict[str, list[np.ndarray]] = {m: [] for m in lengths}
    for i in indices:
        rng = np.random.default_rng([*words, int(i)])
        for m in MODALITIES:
            if m in lengths:
                rows[m].append(rng.random(lengths[m]))
    return {m: np.stack(r) if r else np.zeros((0, lengths[m])) for m, r in rows.items()}


def drop_frames(batch: Mapping[str, torch.Tensor], rate: float, *, seed: SeedLike | None = None,
                generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Frame-level random missing on a batch: each real frame is zeroed with probability ``rate``.

    ``batch`` is a dict from :func:`ktlib.data.make_loader` (or alike): features ``l`` / ``a`` / ``v`` (B, T, D)
    with padding masks ``mask_l`` / ``mask_a`` / ``mask_v`` (B, T), True on padding.  A frame is dropped when it is
    real (mask False) and its draw ``u ~ U[0, 1)`` is below ``rate``; dropped frames become zero vectors.
    Padding frames, padding masks, ``present`` and every other key are left as they are, so a modality whose
    frames were all dropped is still "present" (always the case at ``rate = 1``).  Absent modalities have only
    padding frames (all-True masks), so nothing is dropped there.

    Exactly one source of randomness:

    - ``seed`` (int or sequence of ints): sample i's draws come from ``numpy.random.default_rng([*seed, index])``
      with ``index = batch["index"][i]``, so masks do not depend on batch size or order.
    - ``generator`` (``torch.Generator`` on the CPU): ``torch.rand`` draws in batch order (fast; depends on batch
      composition).

    Returns ``(new_batch, dropped)``: a new dict (input tensors are not modified) and ``{m: (B, T_m) bool}``,
    True on dropped frames, on the features' device.
    """
    found, size = _batch_modalities(batch)
    rate = _check_rate(rate)
    if (seed is None) == (generator is None):
        raise ValueError("pass exactly one of seed= (per-sample draws keyed on batch['index']) or generator= "
                         "(a torch.Generator, draws in batch order)")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        draws = {m: torch.rand(batch[m].shape[:2], generator=generator, device=generator.device) for m in found}
    else:
        index = batch.get("index")
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or len(index) != size:
            raise ValueError(f"seed= keys each sample's draws on batch['index'], a 1-D tensor of {size} sample "
                             f"indices (make_loader adds it); this batch has none: pass generator= instead")
        lengths = {m: batch[m].shape[1] for m in found}
        draws = {m: torch.from_numpy(u) for m, u in
                 _uniforms_per_sample(index.tolist(), lengths, seed).items()}
    out = dict(batch)
    dropped: dict[str, torch.Tensor] = {}
    for m in found:
        x, pad = batch[m], batch[f"mask_{m}"]
        drop = (draws[m].to(pad.device) < rate) & ~pad  # (B, T_m)
        out[m] = x.masked_fill(drop[..., None], 0.0)  # a new tensor
        dropped[m] = drop
    return out, dropped


# ----------------------------------------------------------------------------------------------------------
# AUILC
# ----------------------------------------------------------------------------------------------------------


def auilc(rates: npt.ArrayLike, values: npt.ArrayLike, normalise: bool = True) -> float:
    """Area under the metric-vs-missing-rate curve (trapezoid rule over the given points).

    ``rates``: strictly increasing missing rates in [0, 1] (e.g. :data:`RATES`); ``values``: the metric at each
    rate.  With ``normalise=True`` (default) the area is divided by the rate span ``rates[-1] - rates[0]``, so the
    result reads in the metric's units (a constant curve gives that constant) and sweeps over different spans
    compare.  ``normalise=False`` gives the raw area.  Over 0.0 .. 1.0 the two agree.
    """
    r = np.asarray(rates.detach().cpu() if hasattr(rates, "detach") else rates)
    v = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values)
    for arr, name in ((r, "rates"), (v, "values")):
        if arr.ndim != 1:
            raise ValueError(f"{name} must be 1-D (one entry per point of the curve), got shape {arr.shape}")
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"{name} has dtype {arr.dtype}; pass numbers")
    if len(r) != len(v):
        raise ValueError(f"rates has {len(r)} points but values has {len(v)}; pass one value per rate")
    if len(r) < 2:
        raise ValueError(f"an area needs at least 2 points, got {len(r)}")
    r, v = r.astype(np.float64), v.astype(np.float64)
    for arr, name in ((r, "rates"), (v, "values")):
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise ValueError(f"{name} holds NaN/inf at position {bad.tolist()}; a curve needs finite points (a "
                             f"metric that is nan at some rate, e.g. corr on constant predictions, has no AUILC)")
    if r.min() < 0 or r.max() > 1:
        raise ValueError(f"rates must lie in [0, 1] (missing probabilities), got min {r.min()} and max {r.max()}")
    steps = np.diff(r)
    if (steps == 0).any():
        raise ValueError(f"rates has duplicate value(s) {sorted(set(r[1:][steps == 0].tolist()))}; pass each rate "
                         f"once")
    if (steps < 0).any():
        where = int(np.flatnonzero(steps < 0)[0])
        raise ValueError(f"rates must be sorted in increasing order; {r[where]} is followed by {r[where + 1]}")
    area = float(np.sum(steps * (v[1:] + v[:-1]) / 2))
    return area / float(r[-1] - r[0]) if normalise else area
