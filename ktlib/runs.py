"""The run store: every training run lives in ``runs/<id>/``, and the same configuration is loaded, not retrained.

A finished run's folder holds ``config.json`` (model, training and data descriptions), ``metrics.json`` (valid and
test, every metric), ``history.csv`` (one row per epoch), ``model.pt`` (the best model: config + state_dict, loads
with ``weights_only=True``) and ``environment.json`` (versions, device).  The id is readable and ends with a hash
of the whole configuration, so any change of data, model or training gives a new run.  ``metrics.json`` is
written last: a folder without it is an unfinished run, which :func:`load_or_train` resumes from ``last.pt``.
Several processes or machines can share a store: one lock per run id (:func:`run_lock`) makes a run train once.
:func:`train_pending` trains jobs in local processes or on a Dask cluster (``scheduler``, :mod:`ktlib.pool`).

:func:`grid` runs settings x seeds (x variants for ablations) and returns a tidy table; :func:`summarize` gives
mean and sample standard deviation (the workbook's one convention, :mod:`ktlib.stats`) per configuration;
:func:`compare_with_paper` puts them beside the paper's numbers.

Which runs are seeds of one configuration: those whose ``config.json`` is the same once the training seed is
removed (:func:`config_id`, a short hash, the ``config`` column of every tidy table).  A table never averages two
configurations: the ablation variants of kt, or kt on data with another ``audio_shared``, are separate rows,
named by the job's label (``variant``) or, for runs found in the store, by what differs from the closest profile
(:func:`config_label`).  Runs on a real-data fixture (e.g. ``mosi_utterance``, see
:data:`ktlib.specs.MOSI_UTTERANCE`) carry the fixture's name and caveat in the ``data`` column
(:func:`data_label`) and never get a paper number beside them.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import __version__
from .checkpoint import load_checkpoint, save_checkpoint
from .config import PROFILES, profile
from .data import MultimodalData, atomic_write, from_recipe, project_root
from .model import SETTING_TABLE, KTModel, ModelConfig
from .pool import JobsFailed, in_pool, one_job
from .specs import LAYOUTS
from .stats import fmt_mean_std, seed_table, seeds_caption
from .train import FitResult, TrainConfig, fit, pick_device

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


def run_lock(store: Path, rid: str):
    """The lock of one run id in a run store, held while a process trains that run: another process, or another
    machine on a shared filesystem with working locks (NFSv4, Lustre mounted with ``flock``), waits and then reads
    the finished run.  An OS lock, so a process that dies (even by SIGKILL) releases it."""
    from filelock import FileLock

    locks = store / ".locks"  # beside the run folders, so that force=True can delete a run's folder under its lock
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(locks / f"{rid}.lock")


def load_or_train(model_cfg: ModelConfig, train_cfg: TrainConfig, data: MultimodalData,
                  runs_dir: str | Path | None = None, force: bool = False, progress: bool = True) -> Run:
    """The finished run of this configuration if there is one, else train it (resuming an interrupted run).

    Safe for several processes or machines on one store: one lock per run id (:func:`run_lock`), so the run is
    trained once and the others read it back; each file of a run is written whole (:func:`ktlib.data.atomic_write`).
    """
    rid = run_id(model_cfg, train_cfg, data)
    store = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    folder = store / rid
    if not force and (folder / "metrics.json").exists():
        return Run.load(folder)
    with run_lock(store, rid):
        if force and folder.exists():
            shutil.rmtree(folder)
        if not (folder / "metrics.json").exists():  # else another process trained it while this one waited
            needed = _needed_models(train_cfg, store)
            folder.mkdir(parents=True, exist_ok=True)
            config = {"model": model_cfg.to_dict(), "train": asdict(train_cfg), "data": data_descriptor(data)}
            _write_json(folder / "config.json", config)
            _write_run(folder, fit(model_cfg, train_cfg, data, run_dir=folder, progress=progress, **needed))
    return Run.load(folder)


def _needed_models(train_cfg: TrainConfig, store: Path) -> dict:
    """The models a run is trained with, from finished runs of the same store: the distillation teacher, kt's
    target run."""
    needed = {}
    for role, rid_needed in (("teacher", train_cfg.teacher), ("audio_source", train_cfg.target_run)):
        if rid_needed:
            source = store / rid_needed
            if not (source / "metrics.json").exists():
                raise FileNotFoundError(f"the run {rid_needed} ({role}) is not finished in {store}; train it "
                                        f"first (train_pending trains the runs a job needs before the job)")
            needed[role] = Run.load(source).load_model()
    return needed


def _write_run(folder: Path, result: FitResult) -> None:
    save_checkpoint(folder / "model.pt", result.model, metrics=result.metrics)
    atomic_write(folder / "history.csv", lambda f: pd.DataFrame(result.history).to_csv(f, index=False))
    _write_json(folder / "environment.json", environment())
    _write_json(folder / "metrics.json", result.metrics)  # last: marks the run finished
    for name in ("last.pt", "last.pt.sha256"):  # the resume state is no longer needed
        (folder / name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# Which runs are seeds of one configuration, and what data they ran on

_SEED_SUFFIX = re.compile(r"-seed\d+-[0-9a-f]+$")  # the end of a run id: its seed and configuration hash
_RUN_FIELDS = ("teacher", "target_run")  # TrainConfig fields that name another run of the store (same seed)


def seedless_config(config: dict, runs_dir: str | Path | None = None) -> dict:
    """A run's ``config.json`` without the training seed: what the seeds of one configuration share.

    A run that uses another run (a distillation teacher, kt's target run) names it by its run id, which holds
    that run's seed (the same as this one's): the id is replaced by that run's own :func:`config_id` when its
    folder is in ``runs_dir``, else by the id less its seed and hash.
    """
    out = json.loads(json.dumps(config, sort_keys=True, default=str))  # a deep copy, in JSON types
    train = out.get("train", {})
    train.pop("seed", None)
    for name in _RUN_FIELDS:
        other = train.get(name)
        if not other:
            continue
        source = Path(runs_dir) / other / "config.json" if runs_dir is not None else None
        if source is not None and source.is_file():
            train[name] = "config " + config_id(json.loads(source.read_text()), runs_dir)
        else:
            train[name] = _SEED_SUFFIX.sub("", other)
    return out


def config_id(config: dict, runs_dir: str | Path | None = None) -> str:
    """A short hash of a run's whole configuration except the training seed: the same for every seed of it."""
    blob = json.dumps(seedless_config(config, runs_dir), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _fmt_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "+".join(_fmt_value(v) for v in value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_fmt_value(v)}" for k, v in value.items()) + "}"
    return "none" if value is None else str(value)


def _changed(ours: dict, reference: dict, skip=()) -> dict:
    """The fields of ``ours`` that differ from ``reference`` or that it lacks, compared as JSON."""
    def same(a, b):
        return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)

    return {k: v for k, v in ours.items() if k not in skip and (k not in reference or not same(v, reference[k]))}


def config_label(config: dict) -> str:
    """A readable name for a run's configuration: the closest profile and every field that differs from it (the
    seed aside), e.g. ``"quick"``, ``"quick, consistency=l1"``, ``"quick, sim.audio_shared=0"``.

    The profile's reference is ``profile.model_config(layout, setting)``, ``profile.train_config()`` and, on
    simulated data, the simulator's defaults at the profile's scale (fields prefixed ``sim.``).  Two configurations
    can share a label (e.g. a field of an older run that no longer exists); the ``config`` hash
    (:func:`config_id`) tells them apart.
    """
    from .simulate import SimConfig

    model, train, data = config.get("model", {}), config.get("train", {}), config.get("data", {})
    layout = LAYOUTS.get(data.get("layout", ""))
    best: tuple[str, dict] | None = None
    for prof in PROFILES.values():
        try:
            if layout is not None:
                ref_model = prof.model_config(layout, model.get("setting", "kt"))
            else:
                shapes = {k: model[k] for k in ("feature_dims", "seq_lens", "task", "setting") if k in model}
                ref_model = ModelConfig(**{**prof.model, **shapes})
            ref_train = prof.train_config()
        except (TypeError, ValueError):  # a profile that cannot describe this run
            continue
        changed = {**_changed(model, ref_model.to_dict(), skip=("setting",)),
                   **_changed(train, asdict(ref_train), skip=("seed",))}
        sim = data.get("simulator")
        if sim is not None:
            try:
                ref_sim = asdict(SimConfig(dataset=sim.get("dataset", "mosi"),
                                           alignment=sim.get("alignment", "aligned"), scale=prof.scale))
            except (TypeError, ValueError):
                ref_sim = {}
            changed.update({f"sim.{k}": v for k, v in _changed(sim, ref_sim, skip=("dataset", "alignment")).items()})
        if best is None or len(changed) < len(best[1]):
            best = (prof.name, changed)
    if best is None:
        return "custom"
    name, changed = best
    for key in _RUN_FIELDS:
        if changed.get(key):
            changed[key] = _SEED_SUFFIX.sub("", changed[key])
    return ", ".join([f"{name} profile", *(f"{k}={_fmt_value(v)}" for k, v in changed.items())])


def fixture_caveat(layout_name: str) -> str:
    """The caveat of a real-data fixture (e.g. ``mosi_utterance``); "" for any other data."""
    layout = LAYOUTS.get(layout_name)
    return layout.caveat if layout is not None else ""


def data_label(layout_name: str, synthetic: bool) -> str:
    """The ``data`` column of every table: "synthetic (simulator)", "real", or for a real-data fixture
    "real fixture <name> (<caveat>)"."""
    if synthetic:
        return "synthetic (simulator)"
    caveat = fixture_caveat(layout_name)
    return f"real fixture {layout_name} ({caveat})" if caveat else "real"


def _tidy_rows(run: Run, variant: str | None = None) -> list[dict]:
    """One row per split and metric of a run.  ``variant``: the job's label; None (a run found in the store) names
    it by :func:`config_label`.  A fixture's dataset is its layout name, never the corpus it samples."""
    name = run.config["data"]["layout"]
    layout = LAYOUTS.get(name)
    if layout is None:
        dataset, alignment = name, "unknown"
    elif layout.caveat:
        dataset = layout.name
        alignment = "utterance-level" if set(layout.seq_lens.values()) == {1} else layout.alignment
    else:
        dataset, alignment = layout.dataset, layout.alignment
    kind = data_label(name, run.config["data"]["synthetic"])
    label = variant if variant is not None else config_label(run.config)
    config = config_id(run.config, run.dir.parent)
    seed = run.config["train"]["seed"]
    return [{"dataset": dataset, "alignment": alignment, "data": kind, "setting": run.setting, "variant": label,
             "config": config, "seed": seed, "split": split, "metric": metric, "value": value, "run": run.id}
            for split in ("valid", "test") for metric, value in run.metrics[split].items()]


def collect(runs_dir: str | Path | None = None) -> pd.DataFrame:
    """A tidy table of every finished run in the store; ``variant`` is :func:`config_label` of each run."""
    folder = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    rows = []
    for path in sorted(folder.glob("*/metrics.json")):
        rows.extend(_tidy_rows(Run.load(path.parent)))
    return pd.DataFrame(rows)


def default_workers() -> int:
    """Training processes for :func:`grid`.

    On GPUs: ``KTLIB_RUNS_PER_DEVICE`` (default 1) per device; the workbook's models are too small to keep a GPU
    busy alone, and ``make gpu-check`` measures which number gives the most steps per second.  Several GPUs are
    used through a Dask worker per GPU (README).  On a CPU: one per core (up to 4), one thread each: two
    single-threaded runs side by side finish sooner than two runs one after the other with two threads each
    (measured: 1.5x on 2 cores).
    """
    if torch.cuda.is_available():
        per_device = os.environ.get("KTLIB_RUNS_PER_DEVICE", "1")
        if not per_device.isdigit() or int(per_device) < 1:
            raise ValueError(f"KTLIB_RUNS_PER_DEVICE must be a whole number >= 1, got {per_device!r}")
        return int(per_device)
    return max(1, min(4, os.cpu_count() or 1))


def _train_job(job: tuple) -> str:
    """Run one training job in a worker process (local or Dask) and return its run folder."""
    recipe, model_dict, train_dict, runs_dir, threads = job
    with one_job(threads):
        data = from_recipe(recipe)
        run = load_or_train(ModelConfig.from_dict(model_dict), TrainConfig(**train_dict), data, runs_dir,
                            progress=False)
    return str(run.dir)


@dataclass
class Job:
    """One training run to do or read back: the data, the model and training configurations, a table label, and
    the jobs whose finished runs it needs (kt's target run)."""

    data: MultimodalData
    model: ModelConfig
    train: TrainConfig
    variant: str = "default"
    needs: list = field(default_factory=list)


TARGET_FROM = ("full", "audio_only")  # settings whose audio projection can be kt's target (kt_target="run")


def _with_target(job: Job, profile_name: str, target_from: str, model_overrides: dict, train: dict) -> Job:
    """Point a kt job with ``kt_target="run"`` at the ``target_from`` run of the same data, profile, training
    settings and seed: the very job :func:`plan` makes for that setting, so a grid that has it trains it once."""
    if target_from not in TARGET_FROM:
        raise ValueError(f"target_from must be one of {TARGET_FROM}, got {target_from!r}")
    source = plan(job.data, [target_from], [job.train.seed], profile_name, {target_from: {}}, train,
                  **model_overrides)[0]
    job.train = replace(job.train, target_run=run_id(source.model, source.train, source.data))
    job.needs = [source]
    return job


def plan(data: MultimodalData, settings, seeds, profile_name: str = "quick", variants: dict | None = None,
         train: dict | None = None, **model_overrides) -> list[Job]:
    """Every setting x variant x seed as jobs, with the profile's model and training settings (``train``:
    TrainConfig overrides on top of the profile's).

    ``variants`` maps a label to ModelConfig overrides, e.g. ``{"L1": {"consistency": "l1"}, "L2": {}}``; the key
    ``target_from`` (full | audio_only) says which run gives kt's target when ``kt_target="run"`` (default full).
    """
    prof = profile(profile_name)
    variants = variants or {"default": {}}
    train = dict(train or {})
    jobs = []
    for setting in settings:
        for label, overrides in variants.items():
            overrides = dict(overrides)
            target_from = overrides.pop("target_from", "full")
            for seed in seeds:
                job = Job(data, prof.model_config(data.layout, setting, **{**model_overrides, **overrides}),
                          prof.train_config(**{**train, "seed": seed}), label)
                if job.model.target_from_run:
                    job = _with_target(job, profile_name, target_from, model_overrides, train)
                jobs.append(job)
    return jobs


LONG_GRID_S = 3600.0  # a grid estimated to train longer than this on a CPU is announced before it starts


def training_steps(jobs: list[Job]) -> int:
    """Optimiser steps the jobs take in all: ``epochs x ceil(training samples / batch size)`` each."""
    return sum(j.train.epochs * -(-len(j.data["train"]) // j.train.batch_size) for j in jobs)


class SlowGridWarning(UserWarning):
    """The jobs about to train will take long on this machine (see :func:`estimate_training`)."""


def estimate_training(jobs: list[Job], workers: int, step_seconds=None) -> dict:
    """How long ``jobs`` would train on this machine's CPU, from a timed first step.

    The first training step of the costliest-looking job (a ``kt`` one if any: it runs the most stacks) is timed
    with the thread count a worker gets (:func:`ktlib.bench.step_seconds`); every job is assumed to take that long
    per step, for ``epochs x ceil(training samples / batch size)`` steps, with ``workers`` jobs at a time.  The
    first step is the slowest (allocations), lighter settings take less per step, evaluation passes are left out:
    the figure is a rough one, meant to tell minutes from hours.  ``step_seconds(model_cfg, train_cfg)`` replaces
    the timing (tests).
    """
    from . import bench

    timed = next((j for j in jobs if j.model.setting == "kt"), jobs[0])
    steps = training_steps(jobs)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers)))
    try:
        sec = (step_seconds or bench.step_seconds)(timed.model, timed.train)
    finally:
        torch.set_num_threads(threads)
    at_once = max(1, min(workers, len(jobs)))
    return {"runs": len(jobs), "steps": steps, "step_s": sec, "setting": timed.model.setting, "workers": at_once,
            "seconds": sec * steps / at_once}


def warn_if_long(jobs: list[Job], workers: int, scheduler: str | None = None, step_seconds=None) -> dict | None:
    """On a CPU (no scheduler), estimate the jobs' training time (:func:`estimate_training`) when they add up to
    more than 1,000 steps, and warn (:class:`SlowGridWarning`) when it exceeds :data:`LONG_GRID_S`.  Returns the
    estimate (None when none was made)."""
    if scheduler is not None or not jobs or any(pick_device(j.train.device).type != "cpu" for j in jobs):
        return None
    if training_steps(jobs) <= 1000:
        return None
    est = estimate_training(jobs, workers, step_seconds)
    if est["seconds"] > LONG_GRID_S:
        warnings.warn(
            f"{est['runs']} runs to train on this CPU: about {est['seconds'] / 3600:.1f} hours ({est['steps']:,} "
            f"training steps at {est['step_s'] * 1000:.0f} ms, timed on a {est['setting']} step, "
            f"{est['workers']} at a time). On a GPU this takes minutes (make gpu-check measures it); "
            "for a first look use profile='quick'.", SlowGridWarning, stacklevel=3)
    return est


def train_pending(jobs: list[Job], runs_dir: str | Path | None = None, force: bool = False, progress: bool = True,
                  workers: int | None = None, scheduler: str | None = None) -> None:
    """Train the jobs not yet in the store, each once however many labels share it.

    ``workers`` training processes share them (``None``: :func:`default_workers`).  A worker uses
    ``cpu_count // workers`` threads; results can differ in the last digits with the number of threads.
    ``scheduler``: the address of a Dask scheduler (``tcp://host:8786``) whose workers train them instead; the
    runs folder and the data files must be at the same paths there (a shared filesystem).

    Every job runs even when some fail; then :class:`ktlib.pool.JobsFailed` names each failed run (id and
    configuration) with its error.
    """
    folder = (Path(runs_dir) if runs_dir is not None else default_runs_dir()).resolve()
    todo: dict[str, Job] = {}
    jobs = [need for job in jobs for need in job.needs] + list(jobs)  # the runs a job needs come first
    for job in jobs:
        rid = run_id(job.model, job.train, job.data)
        if force and rid not in todo and (folder / rid).exists():
            shutil.rmtree(folder / rid)
        if not (folder / rid / "metrics.json").exists():
            todo[rid] = job
    workers = default_workers() if workers is None else workers
    warn_if_long(list(todo.values()), workers, scheduler)
    failures = _train_all(todo, folder, progress, workers, scheduler)
    if failures:
        raise JobsFailed(failures) from failures[0][1]


def _needed_runs(job: Job) -> list[str]:
    """The run ids whose finished runs ``job`` reads: its teacher and kt's target run."""
    return [n for n in (job.train.teacher, job.train.target_run) if n]


def _work(job: Job) -> int:
    """A rough measure of a job's training time, to start the long ones first: transformer stacks (cross-modal
    pairs and memories of the modalities it fuses, three per rebuilt modality) times epochs."""
    setting = SETTING_TABLE[job.model.setting]
    fused = len(setting.fuses)
    return (fused * fused + 3 * len(setting.reconstructs)) * job.train.epochs


def _train_all(todo: dict[str, Job], folder: Path, progress: bool, workers: int,
               scheduler: str | None) -> list[tuple[str, BaseException]]:
    """Train ``todo`` (run id -> job): those whose data can travel as a recipe in worker processes or on the
    cluster, in one pool where each job starts once the runs it needs (teacher, kt's target run) are finished,
    the runs others need and then the longest first; the others (e.g. data built in memory) in this process, the
    needed runs first.  Returns the failures, each named by :func:`job_name`."""
    needed = {n for j in todo.values() for n in _needed_runs(j)}
    # stable: among equals, the order the jobs came in (the runs a job needs first)
    ordered = sorted(todo, key=lambda rid: (rid not in needed, -_work(todo[rid])))
    sent = [rid for rid in ordered if todo[rid].data.path is not None]
    at = {rid: i for i, rid in enumerate(sent)}
    args = [(todo[rid].data.recipe(), todo[rid].model.to_dict(), asdict(todo[rid].train), str(folder))
            for rid in sent]
    after = [[at[n] for n in _needed_runs(todo[rid]) if n in at] for rid in sent]
    failures = []
    try:
        taken = in_pool(_train_job, args, workers, "runs", progress, scheduler, [job_name(todo[r]) for r in sent],
                        after)
    except JobsFailed as err:
        taken, failures = True, err.failures
    for job in [todo[r] for r in ordered if not taken or todo[r].data.path is None]:
        try:
            load_or_train(job.model, job.train, job.data, folder, progress=progress)
        except Exception as err:  # noqa: BLE001 - reported with the run's name once every job has run
            failures.append((job_name(job), err))
    return failures


def job_name(job: Job) -> str:
    """How a failure names a job: its run id, setting, label, seed and what differs from its profile."""
    config = {"model": job.model.to_dict(), "train": asdict(job.train), "data": data_descriptor(job.data)}
    return (f"run {run_id(job.model, job.train, job.data)} ({job.model.setting}, variant {job.variant!r}, "
            f"seed {job.train.seed}; {config_label(config)})")


def read_jobs(jobs: list[Job], runs_dir: str | Path | None = None) -> pd.DataFrame:
    """The finished runs of ``jobs`` as a tidy table: one row per job, split and metric."""
    folder = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    rows = []
    for job in jobs:
        rows.extend(_tidy_rows(Run.load(folder / run_id(job.model, job.train, job.data)), job.variant))
    return pd.DataFrame(rows)


def run_jobs(jobs: list[Job], runs_dir: str | Path | None = None, force: bool = False, progress: bool = True,
             workers: int | None = None, scheduler: str | None = None) -> pd.DataFrame:
    """Train what is missing (:func:`train_pending`, locally or on the Dask cluster at ``scheduler``), then read
    every job back (:func:`read_jobs`)."""
    train_pending(jobs, runs_dir, force, progress, workers, scheduler)
    return read_jobs(jobs, runs_dir)


def grid(data: MultimodalData, settings, seeds, profile_name: str = "quick", variants: dict | None = None,
         runs_dir: str | Path | None = None, force: bool = False, progress: bool = True, workers: int | None = None,
         scheduler: str | None = None, **model_overrides) -> pd.DataFrame:
    """Train (or read back) every setting x variant x seed: :func:`plan` then :func:`run_jobs` (``scheduler``: a
    Dask scheduler's address, see :func:`train_pending`)."""
    return run_jobs(plan(data, settings, seeds, profile_name, variants, **model_overrides), runs_dir, force,
                    progress, workers, scheduler)


_GROUP = ("dataset", "alignment", "data", "setting", "variant", "config")  # a configuration; its rows are seeds


def summarize(tidy: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample standard deviation (ddof=1, :mod:`ktlib.stats`) and number of seeds ``n`` per configuration
    (dataset, alignment, data, setting, variant and ``config``, the hash of the configuration less the seed),
    split and metric.  A table without a ``config`` column (made by hand) is grouped by the others."""
    keys = [k for k in _GROUP if k in tidy.columns] + ["split", "metric"]
    return seed_table(tidy, keys)


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
    """Side by side: our mean ± std (sample std over seeds) per configuration, its number of ``seeds``, and the
    paper's row for the same dataset, alignment and setting.

    One row per configuration of :func:`summarize`.  A real-data fixture (its ``data`` column names it and its
    caveat) gets no paper numbers: its "(paper)" columns are empty.
    """
    rows = []
    part = summary[summary["split"] == split]
    group = [k for k in _GROUP if k in part.columns]
    for keys, cell in part.groupby(group, sort=False):
        row = dict(zip(group, keys, strict=True))
        dataset, alignment, setting = row["dataset"], row["alignment"], row["setting"]
        row["seeds"] = int(cell["n"].max())
        paper = paper_table(dataset, alignment) if not fixture_caveat(dataset) else paper_table().iloc[:0]
        paper = paper[(paper["method"] == "ours") & (paper["setting"] == setting)]
        for metric, (column, factor) in _paper_columns(dataset).items():
            hit = cell[cell["metric"] == metric]
            if len(hit):
                row[column] = fmt_mean_std(hit["mean"].iloc[0] * factor, hit["std"].iloc[0] * factor,
                                           3 if factor == 1 else 1)
            row[f"{column} (paper)"] = paper[column].iloc[0] if len(paper) else np.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    table.columns.name = seeds_caption(table.get("seeds", ()))  # the std convention, in the header
    return table


def table_notes(table: pd.DataFrame) -> list[str]:
    """Lines to print under a table of :func:`compare_with_paper`: the std convention, what a row is, and the
    caveat of every real-data fixture in it."""
    notes = ["mean ± std: sample std (ddof=1) over the seeds of one configuration; a row is one configuration "
             "(config: hash of everything but the seed; variant: its label or what differs from the profile)"]
    for dataset in dict.fromkeys(table.get("dataset", [])):
        caveat = fixture_caveat(dataset)
        if caveat:
            notes.append(f"{dataset} is a real-data fixture, not the corpus ({caveat}: a ridge regression on its text "
                         f"alone reaches Acc2 0.93, see its README); no paper numbers beside it")
    return notes


def paper_points(dataset: str, alignment: str) -> dict[tuple[str, str], float]:
    """The paper's Table I-III numbers for ``(setting, metric)`` in this package's units (fractions, not %)."""
    paper = paper_table(dataset, alignment)
    paper = paper[paper["method"] == "ours"]
    columns = _paper_columns(dataset)
    return {(row["setting"], metric): row[column] / factor for _, row in paper.iterrows()
            for metric, (column, factor) in columns.items()}
