"""Data: read MulT feature files safely, validate them, cache simulations, and serve batches to PyTorch.

Where data comes from
---------------------
- Real files (``mosi_data.pkl`` and friends, see ``data/README.md``) are looked for in ``data_dir``, else in
  ``$KTLIB_DATA_DIR``, else in the project's ``data/`` folder.
- The simulator (:mod:`ktlib.simulate`) writes the same layout; :func:`load_simulated` caches its output under
  ``data/sim/`` and reads it back through the same reader, so both paths are checked by the same code.
- :func:`get_data` picks: real file if present (``source="auto"``), or forces one with ``"real"`` / ``"simulated"``.

Safety
------
MulT files are pickles, and unpickling runs code named in the file.  :func:`read_pickle_safely` uses an
unpickler that can only build numpy arrays, dicts, lists, tuples, strings and numbers: any other global
(``os.system``, a class, a function) is refused with :class:`UnsafePickleError` before it is called.

Conventions of a batch
----------------------
``l``, ``a``, ``v``: float tensors (B, T_m, D_m).  ``mask_l`` / ``mask_a`` / ``mask_v``: bool (B, T_m), True on
padding frames (PyTorch's ``key_padding_mask`` convention).  ``present``: bool (B, 3) in (l, a, v) order: a
modality marked absent is never read from the file's arrays; the batch holds zeros and an all-True mask there.
``y``: regression float (B, 1), or IEMOCAP class indices int64 (B, 4) (1 = the emotion is present).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import uuid
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .simulate import VERSION as SIMULATOR_VERSION
from .simulate import SimConfig, Simulation, simulate
from .specs import (
    EMOTIONS,
    FILE_KEYS,
    MODALITIES,
    MODALITY_NAMES,
    MOSI_UTTERANCE,
    SPLITS,
    Layout,
    get_layout,
    layout_for_filename,
)

# --------------------------------------------------------------------------------------------------------------
# Errors


class DataFileError(ValueError):
    """A data file is missing, unreadable, unsafe or does not have the expected layout."""


class DataFileNotFound(DataFileError, FileNotFoundError):
    """The data file is not where it was looked for."""


class UnsafePickleError(DataFileError, pickle.UnpicklingError):
    """The pickle asks for something other than arrays, dicts, lists, strings and numbers."""


class NonFiniteValuesWarning(UserWarning):
    """NaN or +-inf feature values were found and replaced by 0."""


# --------------------------------------------------------------------------------------------------------------
# Where files are


def project_root() -> Path:
    """The checkout this package lives in (where ``pyproject.toml`` is), else the working directory."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def default_data_dir() -> Path:
    """``$KTLIB_DATA_DIR`` if set, else the project's ``data/`` folder."""
    env = os.environ.get("KTLIB_DATA_DIR")
    return Path(env).expanduser() if env else project_root() / "data"


def find_data_file(dataset: str, alignment: str = "aligned", data_dir: str | Path | None = None) -> Path:
    """Path of a real MulT file, or :class:`DataFileNotFound` saying where it was looked for and how to get it."""
    layout = get_layout(dataset, alignment)
    dirs = [Path(data_dir)] if data_dir is not None else [default_data_dir()]
    for d in dirs:
        path = d / layout.filename
        if path.is_file():
            return path
    looked = ", ".join(str(d.resolve()) for d in dirs)
    raise DataFileNotFound(
        f"{layout.filename} ({layout.description}, about {layout.size_mb:g} MB) was not found in {looked}. "
        f"Put the file there, or point data_dir / $KTLIB_DATA_DIR at the folder that holds it. "
        f"Where to download it, sizes and checksums: data/README.md. "
        f"Without it, use the built-in simulator: get_data({dataset!r}, {alignment!r}, source='simulated')."
    )


# --------------------------------------------------------------------------------------------------------------
# Safe unpickling


def _numpy_globals() -> dict[tuple[str, str], object]:
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for prefix in ("numpy.core", "numpy._core"):  # files written by numpy 1.x and 2.x name different modules
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{prefix}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


_ALLOWED_GLOBALS = _numpy_globals()


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays and plain containers; refuses every other global."""

    def __init__(self, file, source: str):
        super().__init__(file, encoding="latin1")  # latin1: arrays pickled by Python 2 decode correctly
        self._source = source

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source}: refused to load '{module}.{name}'. A MulT data file holds only numpy arrays, "
                f"dicts, lists, strings and numbers; this file asks for something else, so it is corrupt, not a "
                f"MulT file, or crafted to run code. Nothing from it was executed. Get the file again from the "
                f"source in data/README.md and compare its checksum."
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self._source}: persistent references are not allowed in a data file")


def read_pickle_safely(path: str | Path) -> object:
    """Unpickle ``path`` allowing only numpy arrays, dicts, lists, tuples, strings and numbers."""
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFound(f"{path}: no such file")
    size = path.stat().st_size
    with path.open("rb") as f:
        try:
            return _ArraysOnlyUnpickler(f, str(path)).load()
        except UnsafePickleError:
            raise
        except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError,
                KeyError, UnicodeDecodeError, MemoryError) as err:
            raise DataFileError(
                f"{path} ({size:,} bytes) could not be read as a pickle: {type(err).__name__}: {err}. "
                f"The file is truncated or corrupt; download it again (sizes and checksums: data/README.md)."
            ) from err


def sha256sum(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# In-memory form


@dataclass
class SplitData:
    """One split: features per modality (N, T_m, D_m) float32, labels, ids."""

    l: np.ndarray
    a: np.ndarray
    v: np.ndarray
    labels: np.ndarray  # (N, 1, 1) float32 regression or (N, 4, 2) one-hot IEMOCAP
    ids: np.ndarray  # (N,) str

    def __len__(self) -> int:
        return len(self.labels)

    def features(self, m: str) -> np.ndarray:
        return getattr(self, m)

    def lengths(self, m: str) -> np.ndarray:
        """Number of non-padding frames per utterance (padding frames are all-zero)."""
        return (self.features(m) != 0).any(-1).sum(-1)


@dataclass
class MultimodalData:
    """A dataset: three splits plus where it came from and what loading it found."""

    layout: Layout
    splits: dict[str, SplitData]
    source: str  # file path, or a description of the simulation
    synthetic: bool  # True for simulator output: label results "synthetic" wherever shown
    nonfinite: dict[str, int] = field(default_factory=dict)  # "split/key" -> values replaced by 0
    sim_config: SimConfig | None = None
    truth: dict[str, dict[str, np.ndarray]] | None = None  # simulator ground truth, per split
    ceiling: dict[str, dict[str, float]] | None = None  # simulator noise ceiling, per split
    ceiling_lv: dict[str, dict[str, float]] | None = None  # ... of an oracle that knows only what L and V see
    path: Path | None = None  # the file it was read from (the cache file for a simulation)

    def __getitem__(self, split: str) -> SplitData:
        if split not in self.splits:
            raise KeyError(f"no split {split!r}; splits are {list(self.splits)}")
        return self.splits[split]

    def recipe(self) -> dict:
        """What another process needs to read the same data again (small and picklable): see :func:`from_recipe`."""
        if self.path is None:
            raise ValueError("this dataset was built in memory, not read from a file; save it and load it from there")
        # absolute: a worker (a Dask worker on another machine, on a shared filesystem) has another working folder
        return {"path": str(Path(self.path).resolve()), "layout": self.layout.name, "sim_config": self.sim_config}

    @property
    def kind(self) -> str:
        return "synthetic (simulator)" if self.synthetic else "real"

    @property
    def task(self) -> str:
        return self.layout.task

    def summary(self):
        """A pandas table: one row per split and modality (shape, lengths, padding, value statistics)."""
        import pandas as pd

        rows = []
        for split, d in self.splits.items():
            for m in MODALITIES:
                x = d.features(m)
                lens = d.lengths(m)
                real = x[(x != 0).any(-1)]
                rows.append({
                    "data": self.kind, "split": split, "modality": MODALITY_NAMES[m], "N": x.shape[0],
                    "T": x.shape[1], "D": x.shape[2], "mean_len": float(lens.mean()),
                    "padding_share": float(1 - lens.sum() / (x.shape[0] * x.shape[1])),
                    "feature_mean": float(real.mean()) if real.size else 0.0,
                    "feature_std": float(real.std()) if real.size else 0.0,
                    "nonfinite_replaced": self.nonfinite.get(f"{split}/{FILE_KEYS[m]}", 0),
                })
        return pd.DataFrame(rows)

    def label_summary(self) -> str:
        """One line per split: label distribution (regression) or emotion shares (IEMOCAP)."""
        lines = []
        for split, d in self.splits.items():
            if self.task == "classification":
                shares = d.labels[:, :, 1].mean(0)
                text = ", ".join(f"{e} {s:.1%}" for e, s in zip(EMOTIONS, shares, strict=True))
            else:
                y = d.labels.reshape(-1)
                hist = np.bincount((np.round(np.clip(y, -3, 3)) + 3).astype(int), minlength=7) / len(y)
                text = (f"mean {y.mean():+.2f}, std {y.std():.2f}, positive {np.mean(y > 0):.1%}, zero "
                        f"{np.mean(y == 0):.1%}; 7-class shares (-3..3) " + " ".join(f"{h:.2f}" for h in hist))
            lines.append(f"labels {split:5s} [{self.kind}]: {text}")
        return "\n".join(lines)

    def describe(self) -> str:
        """A few lines saying what this data is."""
        sizes = " / ".join(f"{s} {len(d)}" for s, d in self.splits.items())
        dims = ", ".join(f"{m} {self.layout.seq_lens[m]}x{self.layout.feature_dims[m]}" for m in MODALITIES)
        lines = [f"{self.layout.name} [{self.kind}]: {sizes}; (T x D) {dims}", f"source: {self.source}"]
        if self.nonfinite:
            total = sum(self.nonfinite.values())
            lines.append(f"non-finite values replaced by 0: {total:,} ({self.nonfinite})")
        if self.ceiling and "test" in self.ceiling:
            c = self.ceiling["test"]
            shown = {k: round(v, 3) for k, v in c.items() if k in ("mae", "corr", "acc2_non0", "acc7", "mean_acc",
                                                                    "mean_f1")}
            lines.append(f"noise ceiling on test (oracle that knows the latent affect): {shown}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Validation


_REDOWNLOAD = ("This is not a complete MulT-layout file for the expected dataset: if it is a renamed published file, "
               "pass layout= (e.g. 'mosi_unaligned'); otherwise download it again (data/README.md lists each file's "
               "layout).")


def _fail(source: str, where: str, problem: str, fix: str = _REDOWNLOAD) -> DataFileError:
    """The error for a bad input: the file, where in it, what is wrong, then what to do."""
    return DataFileError(f"{source}: {where}: {problem}. {fix}")


def _features(arrays: dict, m: str, layout: Layout | None, shapes: dict, source: str, split: str, copy: bool,
              nonfinite: dict[str, int]) -> np.ndarray:
    """Modality m of one split as float32, its shape checked, NaN and +-inf set to 0 and counted in ``nonfinite``."""
    key = FILE_KEYS[m]
    x = arrays[key]
    _check_shape(x, m, layout, shapes, source, f"split '{split}', key '{key}'")
    x = np.array(x, dtype=np.float32) if copy else np.asarray(x, dtype=np.float32)  # asarray: no copy
    bad = ~np.isfinite(x)
    if bad.any():
        nonfinite[f"{split}/{key}"] = int(bad.sum())
        x[bad] = 0.0
    return x


def validate_raw(raw: object, layout: Layout | None, source: str,
                 copy: bool = True) -> tuple[dict[str, SplitData], dict[str, int]]:
    """Check a MulT-layout dict; return clean splits and counts of replaced non-finite values.

    ``copy=False`` cleans the arrays in place (for a dict just read from a file: no second copy of a large file).

    Raises :class:`DataFileError` naming the file, split, key, expected and found shapes (or the first bad row and
    its value), then what to do.  Refused: a missing split or key; arrays that are not 3-D numbers; keys of a split
    with different numbers of rows; an empty split; labels of the wrong shape, not finite, outside the layout's
    ``label_range`` (MOSI/MOSEI: [-3, 3]) or, for IEMOCAP, not one-hot per emotion; ids not one per row; shapes
    other than the layout's, or, without a layout, a (T, D) that is 0 or differs between splits.  NaN and +-inf in
    features become 0 and are counted (a :class:`NonFiniteValuesWarning` says so).
    """
    if not isinstance(raw, dict):
        raise _fail(source, "top level", f"expected a dict with keys {list(SPLITS)}, found {type(raw).__name__}")
    missing = [s for s in SPLITS if s not in raw]
    if missing:
        raise _fail(source, "top level", f"missing split(s) {missing}; expected {list(SPLITS)}, found "
                                         f"{sorted(map(str, raw))}")
    shapes: dict[str, tuple[int, ...]] = {}
    splits, nonfinite = {}, {}
    for split in SPLITS:
        arrays, n = _split_arrays(raw[split], source, split)
        labels = _labels(arrays.pop("labels"), layout, source, split)
        feats = {m: _features(arrays, m, layout, shapes, source, split, copy, nonfinite) for m in MODALITIES}
        ids = _ids(raw[split].get("id"), n, source, split)
        splits[split] = SplitData(l=feats["l"], a=feats["a"], v=feats["v"], labels=labels, ids=ids)
    if nonfinite:
        warnings.warn(
            f"{source}: replaced {sum(nonfinite.values()):,} NaN/inf feature values by 0 ({nonfinite})",
            NonFiniteValuesWarning, stacklevel=3,
        )
    return splits, nonfinite


def _split_arrays(part: object, source: str, split: str) -> tuple[dict[str, np.ndarray], int]:
    """A split's features and labels, each a 3-D numeric array with the same number of rows N > 0; and N."""
    if not isinstance(part, dict):
        raise _fail(source, f"split '{split}'", f"expected a dict, found {type(part).__name__}")
    needed = [*FILE_KEYS.values(), "labels"]
    absent = [k for k in needed if k not in part]
    if absent:
        raise _fail(source, f"split '{split}'", f"missing key(s) {absent}; expected {needed} (+ optional 'id'), "
                                                f"found {sorted(map(str, part))}")
    arrays = {}
    n = None
    for key in needed:
        x = part[key]
        where = f"split '{split}', key '{key}'"
        if not isinstance(x, np.ndarray):
            raise _fail(source, where, f"expected a numpy array, found {type(x).__name__}")
        if x.dtype.kind not in "fiub":
            raise _fail(source, where, f"expected numbers, found dtype {x.dtype}")
        if x.ndim != 3:
            raise _fail(source, where, f"expected a 3-D array (N, T, D), found shape {x.shape}")
        if n is None:
            n = x.shape[0]
        elif x.shape[0] != n:
            raise _fail(source, where, f"has {x.shape[0]} rows but '{needed[0]}' has {n}; every key of a split "
                                       f"must have one row per utterance")
        arrays[key] = x
    if n == 0:
        raise _fail(source, f"split '{split}'", f"is empty (0 rows in {needed}); every split needs at least one "
                                                f"utterance", fix="The file was cut short when it was made or "
                    "copied: download it again (data/README.md), or rebuild it with at least one utterance in each "
                    "of train, valid and test.")
    return arrays, n


def _check_shape(x: np.ndarray, m: str, layout: Layout | None, shapes: dict[str, tuple[int, ...]], source: str,
                 where: str) -> None:
    """(T, D) of modality ``m``: the layout's, else not 0 and the same in every split (``shapes`` remembers)."""
    if layout is not None:
        want = (layout.seq_lens[m], layout.feature_dims[m])
        if x.shape[1:] != want:
            raise _fail(source, where, f"expected shape (N, {want[0]}, {want[1]}) for {layout.name}, found {x.shape}")
    elif 0 in x.shape[1:]:
        raise _fail(source, where, f"shape {x.shape} has no frames or no features; every utterance needs at least "
                                   f"one frame of at least one feature")
    elif shapes.setdefault(m, x.shape[1:]) != x.shape[1:]:
        raise _fail(source, where, f"(T, D) = {x.shape[1:]} differs from {shapes[m]} in split '{SPLITS[0]}'; every "
                                   f"split must have the same sequence length and feature width")


def _labels(labels: np.ndarray, layout: Layout | None, source: str, split: str) -> np.ndarray:
    """Float32 labels (N, 1, 1) or (N, 4, 2), all finite, within the layout's range, one-hot per IEMOCAP emotion."""
    labels = labels.astype(np.float32, copy=False)
    where = f"split '{split}', key 'labels'"
    expected = layout.label_shape if layout else None
    if expected is None:
        expected = labels.shape[1:] if labels.shape[1:] in ((1, 1), (4, 2)) else (1, 1)
    if labels.shape[1:] != tuple(expected):
        raise _fail(source, where, f"expected shape (N, {', '.join(map(str, expected))}), found {labels.shape}")
    rows = labels.reshape(len(labels), -1)  # (N, 1) or (N, 8)
    _refuse_rows(~np.isfinite(rows).all(1), labels, source, where, "have a NaN/inf label",
                 "Labels must be finite: download the file again (data/README.md); for a file you made, give every "
                 "utterance its label.")
    if labels.shape[1:] == (4, 2):
        one_hot = np.isin(labels, (0, 1)).all(-1) & (labels.sum(-1) == 1)  # (N, 4): per emotion
        _refuse_rows(~one_hot.all(1), labels, source, where, "are not one-hot per emotion",
                     f"Each of the 4 emotions ({', '.join(EMOTIONS)}) must be a (no, yes) pair of 0/1 values summing "
                     f"to 1: turn class indices or probabilities into such pairs, or download the file again "
                     f"(data/README.md).")
    elif layout is not None and layout.label_range is not None:
        lo, hi = layout.label_range
        _refuse_rows(((rows < lo) | (rows > hi)).any(1), labels, source, where,
                     f"are outside [{lo:g}, {hi:g}], the range of {layout.name} sentiment labels",
                     f"Such labels are not CMU-MOSI/MOSEI sentiment scores: download the file again "
                     f"(data/README.md), or rescale labels of another scale to [{lo:g}, {hi:g}]; a file that is not "
                     f"MOSI/MOSEI loads under a name of its own, without this layout.")
    return labels


def _refuse_rows(bad: np.ndarray, labels: np.ndarray, source: str, where: str, problem: str, fix: str) -> None:
    """Refuse if any row is ``bad`` (N,): how many, the first with its value, what is wrong, then what to do."""
    rows = np.flatnonzero(bad)
    if rows.size:
        first = rows[0]
        value = labels[first].astype(np.float64).round(6).squeeze().tolist()  # 0.3, not 0.30000001192
        raise _fail(source, where, f"{rows.size} of {len(bad)} row(s) {problem} (e.g. row {first}: {value})", fix)


def _ids(ids: object, n: int, source: str, split: str) -> np.ndarray:
    """One text id per row: the file's (an id of several parts joined by '_'), else '<split>-<row>'."""
    if ids is None:
        return np.array([f"{split}-{i}" for i in range(n)])
    ids = np.asarray(ids)
    found = len(ids) if ids.ndim else "a single value"
    if found != n:
        raise _fail(source, f"split '{split}', key 'id'", f"expected {n} ids, found {found}; a split needs one id "
                                                          f"per row (or no 'id' key at all)")
    return np.array(["_".join(map(_as_text, row)) if np.ndim(row) else _as_text(row) for row in ids])


def _as_text(x) -> str:
    return x.decode("latin1") if isinstance(x, bytes) else str(x)


# --------------------------------------------------------------------------------------------------------------
# Loading


def load_mult_file(path: str | Path, layout: Layout | str | None = None) -> MultimodalData:
    """Read and validate a MulT-layout pickle.

    ``layout`` is inferred from the file name for the published files (and the MOSI utterance fixture);
    pass one (or its name, e.g. ``"mosi_unaligned"``) for a renamed file.  A file of unknown name and no layout
    is checked for internal consistency only.
    """
    path = Path(path)
    if isinstance(layout, str):
        layout = get_layout(layout)
    if layout is None:
        layout = layout_for_filename(path.name)
    if not path.is_file():
        hint = f" It is {layout.description}, about {layout.size_mb:g} MB." if layout else ""
        raise DataFileNotFound(f"{path} does not exist.{hint} Where to get data files: data/README.md.")
    raw = read_pickle_safely(path)
    splits, nonfinite = validate_raw(raw, layout, str(path), copy=False)
    if layout is None:
        first = splits["train"]
        layout = Layout(
            name=path.stem, dataset=path.stem, alignment="unknown", filename=path.name,
            feature_dims={m: first.features(m).shape[2] for m in MODALITIES},
            seq_lens={m: first.features(m).shape[1] for m in MODALITIES},
            split_sizes={s: len(d) for s, d in splits.items()},
            label_shape=first.labels.shape[1:], size_mb=path.stat().st_size / 1e6,
            description=f"custom file {path.name}",
        )
    return MultimodalData(layout=layout, splits=splits, source=str(path), synthetic=False, nonfinite=nonfinite,
                          path=Path(path))


def load_real(dataset: str, alignment: str = "aligned", data_dir: str | Path | None = None) -> MultimodalData:
    """Load a published MulT file from ``data_dir`` (see :func:`find_data_file`)."""
    return load_mult_file(find_data_file(dataset, alignment, data_dir), get_layout(dataset, alignment))


def _sim_key(config: SimConfig) -> str:
    text = json.dumps({"simulator": SIMULATOR_VERSION, **asdict(config)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def atomic_write(path: Path, write) -> None:
    """Write a file through ``write(binary_file)`` into a temporary name, then rename: never half a file.

    The temporary name is unique, so processes (or machines, on a shared filesystem) that write the same file at
    once never mix their bytes: the last rename wins, whole.
    """
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with tmp.open("wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when write failed


def simulation_cache_paths(config: SimConfig, cache_dir: str | Path | None = None) -> dict[str, Path]:
    root = Path(cache_dir) if cache_dir is not None else default_data_dir() / "sim"
    stem = f"{config.dataset}_{config.alignment}_{_sim_key(config)}"
    return {"data": root / f"{stem}.pkl", "truth": root / f"{stem}.truth.npz", "meta": root / f"{stem}.json"}


def save_simulation(sim: Simulation, cache_dir: str | Path | None = None) -> dict[str, Path]:
    """Write a simulation: the MulT-layout pickle, its ground truth (.npz) and its config and ceiling (.json)."""
    paths = simulation_cache_paths(sim.config, cache_dir)
    paths["data"].parent.mkdir(parents=True, exist_ok=True)
    atomic_write(paths["truth"], lambda f: np.savez(f, **{
        f"{split}/{k}": v for split, t in sim.truth.items() for k, v in t.items()}))
    meta = {"config": asdict(sim.config), "ceiling": sim.ceiling, "ceiling_lv": sim.ceiling_lv, "seconds": sim.seconds,
            "synthetic": True}
    atomic_write(paths["meta"], lambda f: f.write(json.dumps(meta, indent=2).encode()))
    # The data file last: its presence marks a complete cache entry.
    atomic_write(paths["data"], lambda f: pickle.dump(sim.raw, f, protocol=4))
    return paths


def load_simulated(config: SimConfig | None = None, cache_dir: str | Path | None = None, refresh: bool = False,
                   **knobs) -> MultimodalData:
    """The simulated dataset for ``config`` (or ``SimConfig(**knobs)``): from the cache, generated if absent."""
    config = config if config is not None else SimConfig(**knobs)
    paths = simulation_cache_paths(config, cache_dir)
    if refresh or not all(p.is_file() for p in paths.values()):
        save_simulation(simulate(config), cache_dir)
    data = load_mult_file(paths["data"], config.layout)
    with np.load(paths["truth"], allow_pickle=False) as z:
        truth: dict[str, dict[str, np.ndarray]] = {}
        for key in z.files:
            split, name = key.split("/", 1)
            truth.setdefault(split, {})[name] = z[key]
    meta = json.loads(paths["meta"].read_text())
    data.synthetic = True
    data.sim_config = config
    data.truth = truth
    data.ceiling = meta["ceiling"]
    data.ceiling_lv = meta.get("ceiling_lv")
    data.source = (f"simulator ({config.dataset}, {config.alignment}, seed {config.seed}, scale {config.scale}, "
                   f"audio_shared {config.audio_shared}); cached at {paths['data']}")
    return data


def from_recipe(recipe: dict) -> MultimodalData:
    """Read again the data described by :meth:`MultimodalData.recipe` (e.g. in a worker process)."""
    if recipe["sim_config"] is not None:
        return load_simulated(recipe["sim_config"], cache_dir=Path(recipe["path"]).parent)
    return load_mult_file(recipe["path"], recipe["layout"])


def get_data(dataset: str = "mosi", alignment: str = "aligned", source: str = "auto",
             data_dir: str | Path | None = None, **sim_knobs) -> MultimodalData:
    """Real MulT file if available (``source="auto"`` or ``"real"``), else the simulator (``"simulated"``).

    ``data_dir`` is where real files are looked for; a simulation falling back from it is cached in its ``sim/``.
    ``sim_knobs`` are :class:`~ktlib.simulate.SimConfig` fields (``scale``, ``seed``, ``audio_shared``, ...).
    """
    if source not in ("auto", "real", "simulated"):
        raise ValueError(f"source must be 'auto', 'real' or 'simulated', got {source!r}")
    if dataset == MOSI_UTTERANCE.name:  # a real file only: the simulator has no utterance-level preset
        if source == "simulated":
            raise ValueError(f"{dataset} is a real file only; for simulated data use dataset='mosi'")
        return load_real(dataset, alignment, data_dir)
    if source != "simulated":
        try:
            return load_real(dataset, alignment, data_dir)
        except DataFileNotFound:
            if source == "real":
                raise
    cache_dir = Path(data_dir) / "sim" if data_dir is not None else None
    return load_simulated(SimConfig(dataset=dataset, alignment=alignment, **sim_knobs), cache_dir=cache_dir)


# --------------------------------------------------------------------------------------------------------------
# PyTorch


def presence_matrix(n: int, missing: Iterable[str] | np.ndarray = ()) -> np.ndarray:
    """(n, 3) bool in (l, a, v) order from a list of missing modalities or an explicit matrix."""
    if isinstance(missing, np.ndarray):
        if missing.shape != (n, len(MODALITIES)) or missing.dtype != bool:
            raise ValueError(f"a presence matrix must be bool of shape ({n}, 3) in (l, a, v) order, "
                             f"found {missing.dtype} {missing.shape}")
        return missing
    missing = tuple(missing)
    unknown = [m for m in missing if m not in MODALITIES]
    if unknown:
        raise ValueError(f"unknown modality {unknown}; use 'l', 'a', 'v' (language, audio, vision)")
    return np.tile([m not in missing for m in MODALITIES], (n, 1))


class MultimodalDataset(Dataset):
    """A split as a PyTorch dataset; batches are dicts (see the module docstring).

    ``missing`` lists modalities absent for every sample (e.g. ``("a",)`` at test time), or is an (N, 3) bool
    presence matrix for per-sample patterns.  Absent entries are never read from the split's arrays.
    """

    def __init__(self, split: SplitData, missing: Iterable[str] | np.ndarray = (), task: str | None = None):
        self.n = len(split)
        self.present = torch.from_numpy(presence_matrix(self.n, missing).copy())  # (N, 3)
        self.task = task or ("classification" if split.labels.shape[1:] == (4, 2) else "regression")
        self.shapes = {m: split.features(m).shape[1:] for m in MODALITIES}
        # Only rows of present modalities are ever read, batch by batch (padding masks included).
        self.x = {m: split.features(m) for j, m in enumerate(MODALITIES) if self.present[:, j].any()}
        labels = torch.from_numpy(split.labels)
        self.y = labels.argmax(-1) if self.task == "classification" else labels.reshape(self.n, 1)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([i])
        return {k: v[0] for k, v in batch.items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        present = self.present[idx]  # (B, 3)
        batch = {"present": present, "y": self.y[idx], "index": idx}
        for j, m in enumerate(MODALITIES):
            t, d = self.shapes[m]
            has = present[:, j]  # (B,) samples that carry modality m
            x = torch.zeros(len(idx), t, d)
            pad = torch.ones(len(idx), t, dtype=torch.bool)
            if has.any():
                rows = torch.from_numpy(np.asarray(self.x[m][idx[has].numpy()]))  # (b, T, D)
                x[has] = rows
                pad[has] = ~(rows != 0).any(-1)  # True on padding frames (all-zero)
            batch[m], batch[f"mask_{m}"] = x, pad
        return batch


def _collated_already(batch):
    """The collate function: :meth:`MultimodalDataset.__getitems__` already returns the whole batch dict."""
    return batch


def make_loader(data: MultimodalData | SplitData, split: str = "train", batch_size: int = 32,
                shuffle: bool | None = None, missing: Iterable[str] | np.ndarray = (), seed: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader over one split; shuffles the training split by default, reproducibly from ``seed``."""
    part = data[split] if isinstance(data, MultimodalData) else data
    dataset = MultimodalDataset(part, missing)
    shuffle = (split == "train") if shuffle is None else shuffle
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
                      collate_fn=_collated_already, pin_memory=torch.cuda.is_available())
