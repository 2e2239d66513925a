"""The run store: every training run lives in ``runs/<id>/``, and the same configuration is loaded, not retrained.

A finished run's folder holds ``config.json`` (model, training and data descriptions), ``metrics.json`` (valid and
test, every metric), ``history.csv`` (one row per epoch), ``model.pt`` (the best model: config + state_dict, loads
with ``weights_only=True``) and ``environment.json`` (versions, device).  The id is readable and ends with a hash
of the whole configuration, so any change of data, model or training gives a new run.  ``metrics.json`` is
written last: a folder without it is an unfinished run, which :func:`load_or_train` resumes from ``last.pt``.

:func:`grid` runs settings x seeds (x variants for ablations) and returns a tidy table; :func:`summarize` gives
mean and standard deviation per cell; :func:`compare_with_paper` puts them beside the paper's numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import __version__
from .data import MultimodalData, atomic_write, from_recipe, project_root
from .model import KTModel, ModelConfig, load_checkpoint, save_checkpoint
from .specs import LAYOUTS
from .train import TrainConfig, fit, profile

_REFERENCE = Path(__file__).with_name("reference")


def default_runs_dir() -> Path:
    env = os.environ.get("KTLIB_RUNS_DIR")
    return Path(env).expanduser() if env else project_root() / "runs"


def data_descriptor(data: MultimodalData) -> dict:
    """What identifies the data of a run: the layout, and the simulator's knobs or the real file's name and size."""
    desc = {"layout": data.layout.name, "synthetic": data.synthetic}
    if data.sim_config is not None:
        desc["simulator"] = asdict(data.sim_config)
    else:
        path = Path(data.source)
        desc["file"] = path.name
        desc["bytes"] = path.stat().st_size if path.exists() else None
    return desc


def run_id(model_cfg: ModelConfig, train_cfg: TrainConfig, data: MultimodalData) -> str:
    blob = json.dumps({"model": model_cfg.to_dict(), "train": asdict(train_cfg), "data": data_descriptor(data)},
                      sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
    return f"{data.layout.name}-{model_cfg.setting}-seed{train_cfg.seed}-{digest}"


def environment() -> dict:
    cuda = torch.cuda.is_available()
    return {"ktlib": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "pandas": pd.__version__, "platform": platform.platform(),
            "cuda": torch.version.cuda if cuda else None,
            "gpu": torch.cuda.get_device_name(0) if cuda else None, "cpu_threads": torch.get_num_threads()}


def _write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True, default=float).encode()))


@dataclass
class Run:
    """A finished run, read back from its folder."""

    id: str
    dir: Path
    config: dict
    metrics: dict
    history: pd.DataFrame

    @classmethod
    def load(cls, path: str | Path) -> Run:
        path = Path(path)
        if not (path / "metrics.json").exists():
            raise FileNotFoundError(f"{path} is not a finished run (no metrics.json); train it with load_or_train")
        return cls(id=path.name, dir=path, config=json.loads((path / "config.json").read_text()),
                   metrics=json.loads((path / "metrics.json").read_text()),
                   history=pd.read_csv(path / "history.csv"))

    def load_model(self) -> KTModel:
        return load_checkpoint(self.dir / "model.pt")[0]

    @property
    def setting(self) -> str:
        return self.config["model"]["setting"]


def load_or_train(model_cfg: ModelConfig, train_cfg: TrainConfig, data: MultimodalData,
                  runs_dir: str | Path | None = None, force: bool = False, progress: bool = True) -> Run:
    """The finished run of this configuration if there is one, else train it (resuming an interrupted run)."""
    rid = run_id(model_cfg, train_cfg, data)
    folder = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    folder = folder / rid
    if force and folder.exists():
        shutil.rmtree(folder)
    if (folder / "metrics.json").exists():
        return Run.load(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model": model_cfg.to_dict(), "train": asdict(train_cfg), "data": data_descriptor(data)}
    _write_json(folder / "config.json", config)
    teacher = None
    if train_cfg.teacher:  # distillation: the teacher is a finished run of the same store
        source = folder.parent / train_cfg.teacher
        if not (source / "metrics.json").exists():
            raise FileNotFoundError(f"the teacher run {train_cfg.teacher} is not finished in {folder.parent}; train "
                                    f"it first (train_missing orders teachers before their students)")
        teacher = Run.load(source).load_model()
    result = fit(model_cfg, train_cfg, data, run_dir=folder, progress=progress, teacher=teacher)
    save_checkpoint(folder / "model.pt", result.model, metrics=result.metrics)
    pd.DataFrame(result.history).to_csv(folder / "history.csv", index=False)
    _write_json(folder / "environment.json", environment())
    _write_json(folder / "metrics.json", result.metrics)  # last: marks the run finished
    for name in ("last.pt", "last.pt.sha256"):  # the resume state is no longer needed
        (folder / name).unlink(missing_ok=True)
    return Run.load(folder)


def _tidy_rows(run: Run, variant: str = "default") -> list[dict]:
    name = run.config["data"]["layout"]
    layout = LAYOUTS.get(name)
    dataset, alignment = (layout.dataset, layout.alignment) if layout else (name, "unknown")
    kind = "synthetic (simulator)" if run.config["data"]["synthetic"] else "real"
    seed = run.config["train"]["seed"]
    return [{"dataset": dataset, "alignment": alignment, "data": kind, "setting": run.setting, "variant": variant,
             "seed": seed, "split": split, "metric": metric, "value": value, "run": run.id}
            for split in ("valid", "test") for metric, value in run.metrics[split].items()]


def collect(runs_dir: str | Path | None = None) -> pd.DataFrame:
    """A tidy table of every finished run in the store."""
    folder = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    rows = []
    for path in sorted(folder.glob("*/metrics.json")):
        rows.extend(_tidy_rows(Run.load(path.parent)))
    return pd.DataFrame(rows)


def default_workers() -> int:
    """Training processes for :func:`grid`: one on a GPU; on a CPU one per core (up to 4), one thread each.

    The workbook's models are small, so two single-threaded runs side by side finish sooner than two runs one
    after the other with two threads each (measured: 1.5x on 2 cores).
    """
    if torch.cuda.is_available():
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def _train_job(job: tuple) -> str:
    """Run one training job in a worker process and return its run folder."""
    recipe, model_dict, train_dict, runs_dir, threads = job
    torch.set_num_threads(threads)
    data = from_recipe(recipe)
    run = load_or_train(ModelConfig.from_dict(model_dict), TrainConfig(**train_dict), data, runs_dir, progress=False)
    return str(run.dir)


@dataclass
class Job:
    """One training run to do or read back: the data, the model and training configurations, a table label."""

    data: MultimodalData
    model: ModelConfig
    train: TrainConfig
    variant: str = "default"


def plan(data: MultimodalData, settings, seeds, profile_name: str = "quick", variants: dict | None = None,
         **model_overrides) -> list[Job]:
    """Every setting x variant x seed as jobs, with the profile's model and training settings.

    ``variants`` maps a label to ModelConfig overrides, e.g. ``{"L1": {"consistency": "l1"}, "L2": {}}``.
    """
    prof = profile(profile_name)
    variants = variants or {"default": {}}
    return [Job(data, ModelConfig.for_layout(data.layout, setting=setting,
                                             **{**prof.model, **model_overrides, **overrides}),
                TrainConfig(**{**prof.train, "seed": seed}), label)
            for setting in settings for label, overrides in variants.items() for seed in seeds]


def train_missing(jobs: list[Job], runs_dir: str | Path | None = None, force: bool = False, progress: bool = True,
                  workers: int | None = None) -> None:
    """Train the jobs not yet in the store, each once however many labels share it.

    ``workers`` training processes share them (``None``: :func:`default_workers`).  A worker uses
    ``cpu_count // workers`` threads; results can differ in the last digits with the number of threads.
    """
    folder = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    todo: dict[str, Job] = {}
    for job in jobs:
        rid = run_id(job.model, job.train, job.data)
        if force and rid not in todo and (folder / rid).exists():
            shutil.rmtree(folder / rid)
        if not (folder / rid / "metrics.json").exists():
            todo[rid] = job
    workers = default_workers() if workers is None else workers
    ready = {rid for rid, j in todo.items()
             if not j.train.teacher or (folder / j.train.teacher / "metrics.json").exists()}
    for first in (True, False):  # then the distillation students whose teacher trains in the first round
        _train_round([j for rid, j in todo.items() if (rid in ready) == first], folder, progress, workers)


def _train_round(jobs: list[Job], folder: Path, progress: bool, workers: int) -> None:
    parallel = [job for job in jobs if job.data.path is not None]
    in_pool(_train_job, [(j.data.recipe(), j.model.to_dict(), asdict(j.train), str(folder)) for j in parallel],
            workers, "runs", progress)
    for job in jobs:  # what no worker took (e.g. data built in memory), in this process
        load_or_train(job.model, job.train, job.data, folder, progress=progress)


def in_pool(fn, args: list[tuple], workers: int, what: str, progress: bool = True) -> bool:
    """``fn((*arg, threads))`` for each arg in ``workers`` spawned processes sharing the CPU threads; False (and
    nothing done) when there are fewer than two args or workers.  A failed call raises here with its error."""
    if workers < 2 or len(args) < 2:
        return False
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm.auto import tqdm

    workers = min(workers, len(args))
    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn, not fork: a forked copy of a process that already runs torch threads can deadlock
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(fn, (*a, threads)) for a in args]
        for fut in tqdm(as_completed(futures), total=len(futures), desc=f"{len(futures)} {what}, {workers} workers",
                        disable=not progress, leave=False):
            fut.result()
    return True


def read_jobs(jobs: list[Job], runs_dir: str | Path | None = None) -> pd.DataFrame:
    """The finished runs of ``jobs`` as a tidy table: one row per job, split and metric."""
    folder = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    rows = []
    for job in jobs:
        rows.extend(_tidy_rows(Run.load(folder / run_id(job.model, job.train, job.data)), job.variant))
    return pd.DataFrame(rows)


def run_jobs(jobs: list[Job], runs_dir: str | Path | None = None, force: bool = False, progress: bool = True,
             workers: int | None = None) -> pd.DataFrame:
    """Train what is missing (:func:`train_missing`), then read every job back (:func:`read_jobs`)."""
    train_missing(jobs, runs_dir, force, progress, workers)
    return read_jobs(jobs, runs_dir)


def grid(data: MultimodalData, settings, seeds, profile_name: str = "quick", variants: dict | None = None,
         runs_dir: str | Path | None = None, force: bool = False, progress: bool = True, workers: int | None = None,
         **model_overrides) -> pd.DataFrame:
    """Train (or read back) every setting x variant x seed: :func:`plan` then :func:`run_jobs`."""
    return run_jobs(plan(data, settings, seeds, profile_name, variants, **model_overrides), runs_dir, force,
                    progress, workers)


def summarize(tidy: pd.DataFrame) -> pd.DataFrame:
    """Mean and population standard deviation over seeds per (setting, variant, split, metric)."""
    keys = ["dataset", "alignment", "data", "setting", "variant", "split", "metric"]
    out = tidy.groupby(keys, sort=False)["value"].agg(mean="mean", std=lambda v: float(np.std(v)), n="count")
    return out.reset_index()


def paper_table(dataset: str | None = None, alignment: str | None = None) -> pd.DataFrame:
    """The paper's numbers (Tables I-V), as published (percentages for accuracies and F1)."""
    name = "paper_tables_iemocap.csv" if dataset == "iemocap" else "paper_tables.csv"
    table = pd.read_csv(_REFERENCE / name)
    if dataset is not None:
        table = table[table["dataset"] == dataset]
    if alignment is not None:
        table = table[table["alignment"] == alignment]
    return table.reset_index(drop=True)


# Our metric -> the paper's column, and the factor that turns ours into the paper's units.
_PAPER_COLUMNS = {"acc7": ("Acc7", 100), "acc2_non0": ("Acc2", 100), "f1_non0": ("F1", 100), "mae": ("MAE", 1),
                  "corr": ("Corr", 1)}


def _paper_columns(dataset: str) -> dict[str, tuple[str, int]]:
    if dataset != "iemocap":
        return _PAPER_COLUMNS
    return {f"{e}_{m}": (f"{e}_{m}", 100) for e in ("happy", "sad", "angry", "neutral") for m in ("acc", "f1")}


def compare_with_paper(summary: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Side by side: our mean +- std per setting and the paper's row for the same dataset, alignment and setting."""
    rows = []
    part = summary[summary["split"] == split]
    for (dataset, alignment, kind, setting, variant), cell in part.groupby(
            ["dataset", "alignment", "data", "setting", "variant"], sort=False):
        paper = paper_table(dataset, alignment)
        paper = paper[(paper["method"] == "ours") & (paper["setting"] == setting)]
        columns = _paper_columns(dataset)
        row = {"dataset": dataset, "alignment": alignment, "data": kind, "setting": setting, "variant": variant}
        for metric, (column, factor) in columns.items():
            hit = cell[cell["metric"] == metric]
            if len(hit):
                mean, std = hit["mean"].iloc[0] * factor, hit["std"].iloc[0] * factor
                row[column] = f"{mean:.3f} ± {std:.3f}" if factor == 1 else f"{mean:.1f} ± {std:.1f}"
            row[f"{column} (paper)"] = paper[column].iloc[0] if len(paper) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def paper_points(dataset: str, alignment: str) -> dict[tuple[str, str], float]:
    """The paper's Table I-III numbers for ``(setting, metric)`` in this package's units (fractions, not %)."""
    paper = paper_table(dataset, alignment)
    paper = paper[paper["method"] == "ours"]
    columns = _paper_columns(dataset)
    return {(row["setting"], metric): row[column] / factor for _, row in paper.iterrows()
            for metric, (column, factor) in columns.items()}
