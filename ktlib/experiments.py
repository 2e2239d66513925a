"""The workbook's experiments, defined once: the notebooks that train them and the notebook that gathers them call
the same functions, so a result is read back from the run store, never trained twice.

- :func:`main_runs`: the five settings of Tables I-III over the training seeds.
- :func:`ablation_runs`: the knowledge-transfer model with L1 vs L2 consistency (Table V), one target branch kept
  vs all (Table IV) and a sweep of the consistency weights lambda1 = lambda2.
- :func:`transfer_runs`, :func:`transfer_verdicts` and :func:`story_outcomes` (simulator only): kt with each
  consistency target against language+vision and a placebo target, in the cells of the simulator's story
  (:func:`transfer_cells`), and each of the story's predictions beside its outcome; :func:`shared_runs` sweeps
  the knob ``audio_shared``.
- :func:`paired_comparison` and :func:`claims`: kt against language+vision seed by seed, and which of the paper's
  claims a set of runs supports.  Both pair the two sides by training seed and judge with the one rule of
  :mod:`ktlib.stats`: the mean of the signed per-seed differences, its 95 % Student-t interval and the sign count;
  "supported" only when the interval excludes zero in the claimed direction, "opposite" when it excludes zero the
  other way, "undecided" otherwise ("undecided (1 seed)" with a single seed).
- :func:`robustness_runs` and :func:`auilc_table` (beyond the paper): MulT on zero-filled inputs, knowledge
  transfer for any missing modality (``kt_any``) and a MITR-DNet-style distillation student, scored under the
  missing-data protocols of :mod:`ktlib.missing` at every rate; the area under each metric-vs-rate curve.

Every "mean ± std over seeds" is the sample std (ddof=1) of :func:`ktlib.stats.mean_std`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .data import MultimodalData, atomic_write, from_recipe, load_simulated
from .metrics import LOWER_IS_BETTER
from .missing import RATES, Protocol, auilc, sweep
from .model import SETTINGS  # the five settings of Tables I-III
from .pool import in_pool, one_job
from .runs import (
    Job,
    Run,
    data_label,
    default_runs_dir,
    default_workers,
    plan,
    read_jobs,
    run_id,
    run_jobs,
    train_pending,
)
from .stats import paired, seed_table

# Ablation families: label -> ModelConfig overrides of the kt model.  The default kt model is in each family.
CONSISTENCY = {"L2": {}, "L1": {"consistency": "l1"}}  # Table V
TARGETS = {"all targets": {}, "target=language": {"targets": ("l",)}, "target=audio": {"targets": ("a",)},
           "target=vision": {"targets": ("v",)}}  # Table IV: which target modality's cross-modal branch is kept
LAMBDAS = (0.0, 1.0)  # lambda1 = lambda2; 0 trains the transfer network by the task loss alone
FAMILIES = {"consistency": CONSISTENCY, "targets": TARGETS,
            "lambda": {f"lambda={v:g}": {"lambda1": v, "lambda2": v} for v in LAMBDAS}}

def main_runs(data: MultimodalData, seeds, profile_name: str, workers: int | None = None,
              progress: bool = True, scheduler: str | None = None) -> pd.DataFrame:
    """The five settings x seeds (trained, or read back from the store): a tidy table.  ``workers``,
    ``scheduler``: where the runs train (:func:`ktlib.runs.train_pending`), here and in every ``*_runs``."""
    return run_jobs(plan(data, SETTINGS, seeds, profile_name), progress=progress, workers=workers,
                    scheduler=scheduler)


def ablation_runs(data: MultimodalData, seeds, profile_name: str, workers: int | None = None,
                  progress: bool = True, scheduler: str | None = None) -> dict[str, pd.DataFrame]:
    """Each ablation family (``FAMILIES``) of the kt model: family name -> tidy table (variant = the label)."""
    jobs = {name: plan(data, ["kt"], seeds, profile_name, variants) for name, variants in FAMILIES.items()}
    train_pending([j for js in jobs.values() for j in js], progress=progress, workers=workers,
                  scheduler=scheduler)  # all at once
    return {name: read_jobs(js) for name, js in jobs.items()}


def _seed_differences(tidy: pd.DataFrame, column: str, a: str, b: str, metric: str,
                      split: str) -> tuple[list[int], list[float]]:
    """The seeds where both ``a`` and ``b`` (values of ``column``) have ``metric`` on ``split``, and per seed
    ``a - b`` signed so that positive means ``a`` is better.  Refuses a table with two runs of one label and seed
    (two configurations under one name would be paired arbitrarily)."""
    part = tidy[(tidy["split"] == split) & (tidy["metric"] == metric) & tidy[column].isin([a, b])]
    twice = part[part.duplicated(["seed", column], keep=False)]
    if len(twice):
        labels = sorted(set(twice[column]))
        raise ValueError(f"{column} {labels}: several runs with the same seed for {metric} ({split}); pass one "
                         f"configuration per {column} (e.g. a table of read_jobs, or filter on its config column)")
    wide = part.pivot(index="seed", columns=column, values="value")
    if a not in wide or b not in wide:
        return [], []
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    diff = (sign * (wide[a] - wide[b])).dropna().sort_index()
    return [int(seed) for seed in diff.index], [float(v) for v in diff]


def _judged(diff: list[float]) -> dict:
    """The claim columns of :func:`claims` for per-seed differences (none: "not run")."""
    result = paired(diff)
    return {"n_seeds": result.n, "mean_diff": result.mean, "ci_low": result.low, "ci_high": result.high,
            "signs": result.signs, "verdict": result.verdict}


def paired_comparison(tidy: pd.DataFrame, a: str = "kt", b: str = "language_vision", split: str = "test",
                       metrics=("mae", "corr", "acc2_non0", "f1_non0", "acc7"),
                       column: str = "setting") -> pd.DataFrame:
    """Seed by seed, ``a`` minus ``b`` (values of ``column``) per metric, signed so that positive means ``a`` is
    better, judged by :func:`ktlib.stats.paired` and :func:`ktlib.stats.verdict`.

    One row per metric that both sides have: ``metric``, ``n_seeds`` (seeds with both runs), ``seeds``,
    ``differences`` (per seed, in the order of ``seeds``), ``mean_diff``, ``std`` (sample std of the differences),
    ``ci_low`` / ``ci_high`` (the 95 % Student-t interval of the mean difference; NaN with one seed), ``signs``
    (e.g. "4/5": ``a`` better on 4 of 5 seeds) and ``verdict`` ("supported": ``a`` better, "opposite": ``b``
    better, "undecided", "undecided (1 seed)").
    """
    rows = []
    for metric in metrics:
        seeds, diff = _seed_differences(tidy, column, a, b, metric, split)
        if not seeds:
            continue
        result = paired(diff)
        rows.append({"metric": metric, "n_seeds": result.n, "seeds": seeds,
                     "differences": [round(v, 4) for v in diff], "mean_diff": result.mean, "std": result.std,
                     "ci_low": result.low, "ci_high": result.high, "signs": result.signs,
                     "verdict": result.verdict})
    return pd.DataFrame(rows)


def claims(main: pd.DataFrame, ablations: dict[str, pd.DataFrame] | None = None,
           metrics: str | tuple[str, ...] | list[str] = "mae", split: str = "test") -> pd.DataFrame:
    """The paper's claims, each checked on these runs, paired by seed, in each of ``metrics`` on ``split``.

    ``metrics``: one metric name or several (e.g. ``("mae", "corr")``); one row per claim and metric, claims in
    order, metrics within a claim.  Columns: ``claim``, ``source``, ``metric``, ``mean_diff`` (mean over seeds of
    the per-seed difference, signed so that positive supports the claim), ``ci_low`` / ``ci_high`` (its 95 %
    Student-t interval), ``signs`` (e.g. "4/5": seeds on which the difference is positive), ``n_seeds`` and
    ``verdict`` (:func:`ktlib.stats.verdict`: "supported", "opposite", "undecided", "undecided (1 seed)", or
    "not run" when the runs are not there).  ``ablations``: family name -> tidy table, as
    :func:`ablation_runs` returns.
    """
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)

    def rows(claim, source, tidy, column, better, worse):
        out = []
        for metric in metrics:
            _, diff = _seed_differences(tidy, column, better, worse, metric, split) if tidy is not None else ([], [])
            out.append({"claim": claim, "source": source, "metric": metric, **_judged(diff)})
        return out

    table = [*rows("reconstructing audio beats dropping it (kt vs language+vision)", "Tables I-III", main,
                   "setting", "kt", "language_vision"),
             *rows("the full model, with real audio, is best (full vs kt)", "Tables I-III", main, "setting", "full",
                   "kt"),
             *rows("two modalities beat one (language+vision vs language only)", "Tables I-III", main, "setting",
                   "language_vision", "language_only")]
    if ablations:
        table += rows("L2 consistency beats L1", "Table V", ablations.get("consistency"), "variant", "L2", "L1")
        for single in ("target=language", "target=audio", "target=vision"):
            table += rows(f"all target branches beat {single} alone", "Table IV", ablations.get("targets"),
                          "variant", "all targets", single)
        table += rows("the consistency loss helps (lambda=1 vs lambda=0)", "beyond the paper",
                      ablations.get("lambda"), "variant", "lambda=1", "lambda=0")
    columns = ["claim", "source", "metric", "mean_diff", "ci_low", "ci_high", "signs", "n_seeds", "verdict"]
    return pd.DataFrame(table, columns=columns)


def predictions(tidy: pd.DataFrame, data: MultimodalData, seed: int, split: str = "test") -> dict[str, np.ndarray]:
    """Each setting's predictions on ``split`` from its run with ``seed``, scored as in training (no audio where
    the setting has none at test time): setting -> (N, 1) or (N, 4, 2)."""
    import torch

    from .train import eval_loader, evaluate

    out = {}
    for setting, rid in tidy[tidy["seed"] == seed].groupby("setting", sort=False)["run"].first().items():
        model = Run.load(default_runs_dir() / rid).load_model()
        out[setting] = evaluate(model, eval_loader(data, split, 64, setting), torch.device("cpu"))[2]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Robustness to missing data (beyond the paper)

# Method label -> (setting, TrainConfig overrides).  The distillation student's teacher is the MulT model trained
# on complete data with the same seed; it sees complete batches in training only.
METHODS = {
    "MulT (zero-fill)": ("full", {}),
    "kt (any modality)": ("kt_any", {"train_drop": "subsets"}),
    "distillation": ("full", {"train_drop": "subsets", "distill_pred": 1.0, "distill_rep": 1.0}),
}
# Fixed missing patterns, by what is absent: one modality, then two (what remains is the third).
FIXED = (("a",), ("v",), ("l",), ("a", "v"), ("l", "a"), ("l", "v"))
MASK_SEED = 0  # every model is scored on the same test masks; the spread over seeds is the training seeds'


def _protocols(kind: str, phase: str, rates) -> list[Protocol]:
    if kind == "fixed":
        return [Protocol("fixed", modalities=m, phase=phase, seed=MASK_SEED) for m in FIXED]
    return sweep(kind, rates, phase, MASK_SEED)


def _level(protocol: Protocol) -> str:
    return "+".join(protocol.modalities) if protocol.kind == "fixed" else f"{protocol.rate:g}"


def robustness_jobs(data: MultimodalData, seeds, profile_name: str, method: str,
                    protocol: Protocol | None = None) -> list[Job]:
    """One job per seed of ``method`` trained under ``protocol`` (None or a test-only one: complete training data)."""
    setting, train = METHODS[method]
    trained = protocol if protocol is not None and protocol.applies_to("train") else None
    if trained is not None and trained.kind != "fixed" and trained.rate == 0:
        trained = None  # nothing is missing: the same run as complete training data
    jobs = []
    for seed in seeds:
        job = plan(data, [setting], [seed], profile_name)[0]
        overrides = dict(train, protocol=trained)
        if train.get("distill_pred") or train.get("distill_rep"):
            teacher = plan(data, ["full"], [seed], profile_name)[0]
            jobs.append(teacher)
            overrides["teacher"] = run_id(teacher.model, teacher.train, data)
        job.train = replace(job.train, **overrides)
        job.variant = method
        jobs.append(job)
    return jobs


def _score_key(protocol: Protocol) -> str:
    if protocol.kind != "fixed" and protocol.rate == 0:  # nothing missing: every kind is the complete test set
        return "none"
    return f"{protocol.name}-seed{protocol.seed}"


def scores(run_dir: str | Path, data: MultimodalData, protocols, batch_size: int = 128) -> dict[str, dict]:
    """Test metrics of a finished run under each protocol (missing at test), keyed by protocol.

    Kept in the run's ``scores.json``: only protocols not scored before are computed (the model is loaded once
    for all of them), and the file is written once.
    """
    import torch

    from .train import eval_loader, evaluate

    cache = Path(run_dir) / "scores.json"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    todo = {_score_key(p): p for p in protocols if _score_key(p) not in known}
    if todo:
        model = Run.load(run_dir).load_model()
        for key, protocol in todo.items():
            loader = eval_loader(data, "test", batch_size, model.cfg.setting, protocol)
            loss, metrics, _ = evaluate(model, loader, torch.device("cpu"), protocol=protocol, split="test")
            known[key] = {"loss": loss, **metrics}
        atomic_write(cache, lambda f: f.write(json.dumps(known, indent=2).encode()))
    return {_score_key(p): known[_score_key(p)] for p in protocols}


def _score_job(job: tuple) -> None:
    """Score one run under several protocols in a worker process (see :func:`ktlib.pool.in_pool`)."""
    recipe, run_dir, protocols, threads = job
    with one_job(threads):
        scores(run_dir, from_recipe(recipe), protocols)


def robustness_runs(data: MultimodalData, seeds, profile_name: str, kinds=("fixed", "modality", "frame"),
                    phase: str = "test", rates=RATES, methods=tuple(METHODS), workers: int | None = None,
                    progress: bool = True, scheduler: str | None = None) -> pd.DataFrame:
    """Every method under every protocol of ``kinds`` and ``phase`` at every rate, over the seeds: a tidy table.

    ``phase="test"``: each method is trained once per seed on complete data (kt and the student simulate missing
    modalities themselves) and scored at every rate.  ``phase="train_test"``: one training run per rate, missing at
    train and test alike.  Columns: method, kind, phase, level (the rate, or the absent modalities for "fixed"),
    rate, seed, metric, value, data, run.
    """
    if phase not in ("test", "train_test"):
        raise ValueError(f"phase must be 'test' or 'train_test', got {phase!r}")
    workers = default_workers() if workers is None else workers
    jobs: dict[str, Job] = {}  # run id -> job (teachers included)
    cells = []  # (method, protocol, seed, run id) of every table cell
    for kind in kinds:
        for protocol in _protocols(kind, phase, rates):
            for method in methods:
                for job in robustness_jobs(data, seeds, profile_name, method, protocol):
                    rid = run_id(job.model, job.train, data)
                    jobs.setdefault(rid, job)
                    if job.variant == method:
                        cells.append((method, protocol, job.train.seed, rid))
    train_pending(list(jobs.values()), progress=progress, workers=workers, scheduler=scheduler)
    folder = default_runs_dir().resolve()
    scored: dict[str, list[Protocol]] = {}  # run id -> the protocols it is scored under (test-only runs)
    for _, protocol, _, rid in cells:
        if jobs[rid].train.protocol is None:
            scored.setdefault(rid, []).append(protocol)
    if data.path is not None:  # in worker processes, one run each
        in_pool(_score_job, [(data.recipe(), str(folder / rid), ps) for rid, ps in scored.items()], workers,
                "runs scored", progress, scheduler)
    results = {rid: scores(folder / rid, data, ps) for rid, ps in scored.items()}  # read back (or computed here)
    rows = []
    for method, protocol, seed, rid in cells:
        metrics = (results[rid][_score_key(protocol)] if rid in results
                   else Run.load(folder / rid).metrics["test"])  # trained under the protocol: its own test score
        rows += [{"method": method, "kind": protocol.kind, "phase": phase, "level": _level(protocol),
                  "rate": protocol.rate if protocol.kind != "fixed" else np.nan, "seed": seed, "metric": metric,
                  "value": value, "data": data_label(data.layout.name, data.synthetic), "run": rid}
                 for metric, value in metrics.items()]
    return pd.DataFrame(rows)


def auilc_table(tidy: pd.DataFrame, metrics=("mae", "corr", "acc2_non0", "f1_non0", "acc7")) -> pd.DataFrame:
    """AUILC (area under the metric-vs-rate curve over the rates run, per unit rate) per method, kind and phase:
    mean, sample std (ddof=1, :func:`ktlib.stats.mean_std`) and number of ``seeds``.  Fixed-pattern rows are left
    out (they have no rate).

    A correlation is undefined for constant predictions (e.g. every frame dropped at r = 1); it counts as 0 here,
    no linear relation, so that the curve has a value at every rate.
    """
    part = tidy[(tidy["kind"] != "fixed") & tidy["metric"].isin(metrics)].copy()
    part.loc[(part["metric"] == "corr") & part["value"].isna(), "value"] = 0.0
    per_seed = (part.groupby(["data", "method", "kind", "phase", "metric", "seed"], sort=False)
                .apply(lambda g: auilc(g["rate"].to_numpy(), g["value"].to_numpy()), include_groups=False)
                .rename("auilc").reset_index())
    return seed_table(per_seed, ["data", "method", "kind", "phase", "metric"], value="auilc", count="seeds")


def robustness_params(kinds: str, train_test_kinds: str, rates: str, train_test_rates: str, seeds: int):
    """Check notebook 7's parameters; returns (kinds, train_test_kinds, rates, train_test_rates, seed list).

    ``kinds`` / ``train_test_kinds``: comma-separated among fixed, modality, frame (train_test: modality, frame;
    empty: none).  ``rates``: comma-separated rates in [0, 1], increasing, from 0 (empty: 0.0, 0.1, ..., 1.0).
    """
    problems = []

    def names(text, allowed, label):
        out = tuple(k.strip() for k in text.split(",") if k.strip())
        bad = [k for k in out if k not in allowed]
        if bad or len(set(out)) != len(out):
            problems.append(f"{label}={text!r}: comma-separated distinct names among {allowed}")
        return out

    def numbers(text, label):
        if not text.strip():
            return tuple(float(r) for r in RATES)
        try:
            out = tuple(float(r) for r in text.split(","))
        except ValueError:
            out = ()
        if len(out) < 2 or out[0] != 0.0 or any(b <= a for a, b in zip(out, out[1:], strict=False)) or out[-1] > 1:
            problems.append(f"{label}={text!r}: at least two increasing rates from 0 up to at most 1, e.g. "
                            f"'0,0.5,1' (empty: 0, 0.1, ..., 1)")
        return out

    result = (names(kinds, ("fixed", "modality", "frame"), "kinds"),
              names(train_test_kinds, ("modality", "frame"), "train_test_kinds"),
              numbers(rates, "rates"), numbers(train_test_rates, "train_test_rates"))
    if not (isinstance(seeds, int) and 1 <= seeds <= 20):
        problems.append(f"robust_seeds={seeds!r}: training seeds per method, an integer from 1 to 20")
    if problems:
        raise ValueError("notebook parameters out of range:\n  - " + "\n  - ".join(problems))
    return (*result, list(range(1, seeds + 1)))


# ----------------------------------------------------------------------------------------------------------------
# When and why reconstruction helps: targets, placebo and controls under the simulator's story

# Where kt's consistency target comes from (ModelConfig overrides; target_from picks the run for kt_target="run").
TRANSFER_TARGETS = {
    "random": {"kt_target": "random"},  # a frozen, randomly initialised audio encoder (eval mode)
    "placebo": {"kt_target": "run", "kt_target_shuffle": True},  # the full run's projection of another sample
    "full": {"kt_target": "run"},  # the full run's audio projection (the workbook's default)
    "audio_only": {"kt_target": "run", "target_from": "audio_only"},  # an audio-only run's projection
    "audio_memory": {"kt_target": "run_memory", "target_from": "audio_only"},  # its memory's output over the audio
    "placebo_memory": {"kt_target": "run_memory", "target_from": "audio_only", "kt_target_shuffle": True},
}
PLACEBOS = {"audio_memory": "placebo_memory"}  # a target's placebo where it is not "placebo" (full, shuffled)
SUPERVISION = {"": {}, " +f'A": {"kt_hat_weight": 1.0}}  # delta's output f'_A supervised too (beyond the paper's loss)
SUPERVISION_CHOICES = {"without": ("",), "with": (" +f'A",), "both": ("", " +f'A")}  # notebook 4's `supervision`
MAIN_TARGET, MAIN_SUPERVISION = "audio_memory", " +f'A"  # the kt variant the controls and the story test
MAIN_METHOD = f"kt target={MAIN_TARGET}{MAIN_SUPERVISION}"
MATCHED_LV = {"d": 32, "layers": 2}  # language+vision with about kt's parameter count (quick: 96k vs 101k)


def transfer_variants(targets=tuple(TRANSFER_TARGETS), supervision=tuple(SUPERVISION), **extra) -> dict:
    """kt variants ``"target=<name><supervision>"`` -> overrides (``extra``: more labelled variants)."""
    out = {f"target={t}{s}": {**TRANSFER_TARGETS[t], **SUPERVISION[s]} for t in targets for s in supervision}
    return {**out, **extra}


@dataclass
class Cell:
    """One place of the simulator's story where methods are compared over the same seeds."""

    regime: str = "default"  # a key of ktlib.simulate.REGIMES
    knobs: dict = field(default_factory=dict)  # further SimConfig overrides
    baselines: dict = field(default_factory=lambda: {"language_vision": ("language_vision", {}),
                                                     "full": ("full", {})})  # label -> (setting, overrides)
    variants: dict = field(default_factory=transfer_variants)  # kt label -> overrides


def simulated_like(data: MultimodalData, **knobs) -> MultimodalData:
    """The simulation of ``data`` with some knobs changed (cached beside it)."""
    if data.sim_config is None:
        raise ValueError(f"{data.describe().splitlines()[0]}: this needs the simulator (real data has no knobs)")
    cache = data.path.parent if data.path is not None else None
    return load_simulated(replace(data.sim_config, **knobs), cache_dir=cache)


def equal_steps(profile_name: str, train_scale: float) -> dict:
    """TrainConfig overrides that give a smaller or larger training set the profile's number of optimisation steps
    (epochs / train_scale), so that a size comparison is about the data, not the training budget."""
    from .config import profile

    epochs = profile(profile_name).train.get("epochs", 40)
    return {} if train_scale == 1 else {"epochs": max(1, round(epochs / train_scale))}


def _cell_jobs(data: MultimodalData, cell: Cell, seeds, profile_name: str) -> list[Job]:
    from .simulate import REGIMES

    sim = simulated_like(data, **{**REGIMES[cell.regime], **cell.knobs})
    train = equal_steps(profile_name, sim.sim_config.train_scale)
    jobs = []
    for label, (setting, overrides) in cell.baselines.items():
        jobs += plan(sim, [setting], seeds, profile_name, {label: overrides}, train=train)
    return jobs + plan(sim, ["kt"], seeds, profile_name, cell.variants, train=train)


def transfer_runs(data: MultimodalData, cells: dict[str, Cell], seeds, profile_name: str,
                  workers: int | None = None, progress: bool = True, scheduler: str | None = None) -> pd.DataFrame:
    """Every cell's baselines and kt variants over the seeds, trained together: a tidy table with a ``cell`` and a
    ``method`` column (the baseline's or kt variant's label)."""
    jobs = {name: _cell_jobs(data, cell, seeds, profile_name) for name, cell in cells.items()}
    train_pending([j for js in jobs.values() for j in js], progress=progress, workers=workers, scheduler=scheduler)
    tables = [read_jobs(js).assign(cell=name) for name, js in jobs.items()]
    tidy = pd.concat(tables, ignore_index=True)
    tidy["method"] = np.where(tidy["setting"] == "kt", "kt " + tidy["variant"], tidy["variant"])
    return tidy


def paired_table(tidy: pd.DataFrame, pairs, metrics=("mae", "corr"), split: str = "test") -> pd.DataFrame:
    """For each cell and (a, b) method pair: a's mean ± std over seeds, and a - b paired by seed (signed so that
    positive means a is better), with its 95 % t interval, sign count and verdict (:mod:`ktlib.stats`)."""
    from .stats import fmt_mean_std, mean_std

    rows = []
    part = tidy[tidy["split"] == split]
    for cell, group in part.groupby("cell", sort=False):
        for a, b in pairs:
            for metric in metrics:
                wide = group[group["metric"] == metric].pivot_table(index="seed", columns="method", values="value")
                if a not in wide or b not in wide:
                    continue
                sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
                both = wide[[a, b]].dropna()
                result = paired(sign * (both[a] - both[b]))
                rows.append({"cell": cell, "method": a, "versus": b, "metric": metric,
                             "value": fmt_mean_std(*mean_std(both[a])), "gain": result.mean,
                             "low": result.low, "high": result.high, "signs": result.signs,
                             "verdict": result.verdict})
    return pd.DataFrame(rows)


def placebo_of(method: str) -> str:
    """The placebo with the same supervision as a kt method ("kt target=full +f'A" -> "kt target=placebo +f'A"),
    or "" where there is none (the placebo itself, other variants such as lambda=0)."""
    for supervision in SUPERVISION:
        for target in TRANSFER_TARGETS:
            if not target.startswith("placebo") and method == f"kt target={target}{supervision}":
                return f"kt target={PLACEBOS.get(target, 'placebo')}{supervision}"
    return ""


def transfer_verdicts(tidy: pd.DataFrame, metrics=("mae", "corr")) -> pd.DataFrame:
    """Per cell and kt variant: transfer is claimed only where kt beats language+vision *and* its placebo (the
    same supervision with a shuffled target) with the 95 % interval excluding zero on every metric, and full is
    not worse than kt (its interval does not lie below zero)."""
    kt_methods = [m for m in tidy["method"].unique() if m.startswith("kt ")]
    pairs = [(m, "language_vision") for m in kt_methods]
    pairs += [(m, placebo_of(m)) for m in kt_methods if placebo_of(m)]
    pairs += [("full", m) for m in kt_methods]
    table = paired_table(tidy, pairs, metrics)
    rows = []
    for (cell, method), group in table[table["method"].str.startswith("kt ")].groupby(["cell", "method"],
                                                                                     sort=False):
        vs_lv = group[group["versus"] == "language_vision"]
        vs_placebo = group[group["versus"].str.contains("placebo")]
        full = table[(table["cell"] == cell) & (table["method"] == "full") & (table["versus"] == method)]
        ahead = len(vs_lv) == len(metrics) and (vs_lv["verdict"] == "supported").all()
        beats = ahead and len(vs_placebo) == len(metrics) and (vs_placebo["verdict"] == "supported").all()
        full_ok = not (full["verdict"] == "opposite").any()
        rows.append({"cell": cell, "method": method,
                     **{f"{r.metric} vs language+vision": f"{r.gain:+.3f} [{r.low:+.3f}, {r.high:+.3f}] {r.signs}"
                        for r in vs_lv.itertuples()},
                     **{f"{r.metric} vs placebo": f"{r.gain:+.3f} [{r.low:+.3f}, {r.high:+.3f}] {r.signs}"
                        for r in vs_placebo.itertuples()},
                     "ahead of language+vision": bool(ahead), "full not worse": full_ok,
                     "transfer": "shown" if beats and full_ok else "not shown"})
    return pd.DataFrame(rows)


def transfer_answer(verdicts: pd.DataFrame, n_seeds: int) -> str:
    """The answer of :func:`transfer_verdicts` in words: where transfer is shown, or that nowhere is it, and
    which gains over language+vision its placebo explains (regularisation)."""
    shown = verdicts[verdicts["transfer"] == "shown"]
    if len(shown):
        return ("Transfer shown (kt beats language+vision and its placebo on MAE and Corr, full not worse), "
                f"{n_seeds} seeds: " + "; ".join(f"{r.method} in {r.cell}" for r in shown.itertuples()) + ".")
    lines = [f"No cell shows transfer over {n_seeds} seeds: no kt variant beats both language+vision and its "
             "placebo with intervals that exclude zero on MAE and Corr."]
    for r in verdicts[verdicts["ahead of language+vision"]].itertuples():
        if r.method.startswith("kt target=placebo"):
            lines.append(f"The placebo {r.method} in {r.cell} is ahead of language+vision on MAE and Corr: what the "
                         "extra branch gives without any audio of its own utterance.")
        else:
            lines.append(f"{r.method} in {r.cell} is ahead of language+vision on MAE and Corr but not of its "
                         "placebo: regularisation, not transfer.")
    return " ".join(lines)


CONTROLS = ("lambda=0", "matched", "audio_shared=0", "train_scale=0.5")  # the controls of notebook 4
CONTROL_CELLS = ("audio_shared=0", "train_scale=")  # controls that are cells of their own (the others join a regime)


def transfer_cells(targets=tuple(TRANSFER_TARGETS), supervision=tuple(SUPERVISION),
                   regimes=("labels_bottleneck", "default"), controls=CONTROLS,
                   control_regime: str = "default") -> dict[str, Cell]:
    """The comparison of the workbook's story (module :mod:`ktlib.simulate`), as cells.

    Main (one cell per regime): language+vision and full (and audio_only where it gives a target) against kt with
    each target, with (`` +f'A``) and without supervising f'_A.  Controls, in ``control_regime``, each with the
    main kt variant (:data:`MAIN_METHOD`): ``lambda=0`` (no consistency loss at all), ``matched``
    (language+vision with about kt's parameter count), ``audio_shared=0`` (nothing of the audio's affect is
    shared: the main variant and its placebo) and ``train_scale=<x>`` (x times the regime's training split, with
    the same number of optimisation steps: the gain should shrink as x grows).
    """
    bad = [c for c in controls if c not in ("lambda=0", "matched") and not c.startswith(CONTROL_CELLS)]
    if bad:
        raise ValueError(f"unknown control(s) {bad}: choose among lambda=0, matched, audio_shared=0 and "
                         "train_scale=<x>")
    lv_full = {"language_vision": ("language_vision", {}), "full": ("full", {})}
    main = transfer_variants((MAIN_TARGET, PLACEBOS[MAIN_TARGET]), (MAIN_SUPERVISION,))
    joins = [c for c in controls if c in ("lambda=0", "matched")]
    cells = {}
    for regime in dict.fromkeys([*regimes, *([control_regime] if joins else [])]):
        baselines = dict(lv_full)
        variants = transfer_variants(targets, supervision) if regime in regimes else {}
        if "matched" in joins and regime == control_regime:
            baselines["language_vision (matched)"] = ("language_vision", MATCHED_LV)
        if "lambda=0" in joins and regime == control_regime:
            variants[f"target={MAIN_TARGET}{MAIN_SUPERVISION} lambda=0"] = {
                **main[f"target={MAIN_TARGET}{MAIN_SUPERVISION}"], "lambda1": 0.0, "lambda2": 0.0, "kt_hat_weight": 0.0}
        if any(TRANSFER_TARGETS[t].get("target_from") == "audio_only" for t in targets) and regime in regimes:
            baselines["audio_only"] = ("audio_only", {})
        cells[regime] = Cell(regime, baselines=baselines, variants=variants)
    for control in controls:
        if control.startswith(CONTROL_CELLS):
            knob, value = control.split("=")
            cells[f"{control_regime}, {control}"] = Cell(control_regime, {knob: float(value)}, lv_full, main)
    return cells


def transfer_params(seeds: int, targets: str, supervision: str, regimes: str, controls: str,
                    control_regime: str = "default"):
    """Check notebook 4's parameters of part 4; returns (seed list, cells).  ``targets``, ``regimes`` and
    ``controls`` are comma-separated (controls may be empty); ``supervision`` is without, with or both."""
    from .simulate import REGIMES

    problems = []
    if not (isinstance(seeds, int) and 2 <= seeds <= 20):
        problems.append(f"transfer_seeds={seeds!r}: an integer from 2 to 20 (a paired interval needs two seeds)")

    def names(text, allowed, label, empty_ok=False):
        out = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in out if x not in allowed and not (label == "controls" and x.startswith("train_scale="))]
        if bad or (not out and not empty_ok):
            problems.append(f"{label}={text!r}: comma-separated names among {tuple(allowed)}"
                            + (" and train_scale=<x> with 0 < x <= 20" if label == "controls" else ""))
        return out

    target_list = names(targets, TRANSFER_TARGETS, "transfer_targets")
    regime_list = names(regimes, REGIMES, "transfer_regimes", empty_ok=True)
    control_list = names(controls, ("lambda=0", "matched", "audio_shared=0"), "controls", empty_ok=True)
    if not regime_list and not control_list:
        problems.append("transfer_regimes and controls: nothing to run; name a regime or a control")
    for c in control_list:
        if c.startswith("train_scale="):
            try:
                ok = 0 < float(c.split("=")[1]) <= 20
            except ValueError:
                ok = False
            if not ok:
                problems.append(f"controls: {c!r} needs a number in (0, 20], e.g. train_scale=1")
    if supervision not in SUPERVISION_CHOICES:
        problems.append(f"supervision={supervision!r}: one of {tuple(SUPERVISION_CHOICES)}")
    if control_regime not in REGIMES:
        problems.append(f"control_regime={control_regime!r}: one of {tuple(REGIMES)}")
    if problems:
        raise ValueError("notebook parameters out of range:\n  - " + "\n  - ".join(problems))
    cells = transfer_cells(target_list, SUPERVISION_CHOICES[supervision], regime_list, control_list, control_regime)
    return list(range(1, seeds + 1)), cells


def _gain(table: pd.DataFrame, cell: str, a: str, b: str, metric: str):
    if table.empty:  # none of the pairs was run
        return None
    hit = table[(table["cell"] == cell) & (table["method"] == a) & (table["versus"] == b)
                & (table["metric"] == metric)]
    return None if hit.empty else hit.iloc[0]


def _show(row) -> str:
    if row is None:
        return "not run"
    return f"{row['gain']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}] ({row['verdict']})"


def story_outcomes(tidy: pd.DataFrame, method: str | None = None, metrics=("mae", "corr")) -> pd.DataFrame:
    """Each prediction of the simulator's story (:data:`ktlib.simulate.PREDICTIONS`) beside what the runs of
    :func:`transfer_cells` show for one kt ``method`` (default: :data:`MAIN_METHOD`, or ``"kt target=full"``
    where only that was run) against its placebo: paired gains (positive: the first method is better)
    with their 95 % intervals.

    ``agrees`` is True, False, or None where the cells it needs were not run.  P1's reconstruction half is
    checked in notebook 5 (``ktlib.analysis.reconstruction_r2``).
    """
    from .simulate import PREDICTIONS

    if method is None:
        ran = set(tidy["method"])
        method = next((m for m in (MAIN_METHOD, "kt target=full") if m in ran), MAIN_METHOD)
    placebo = placebo_of(method)
    cells = list(tidy["cell"].unique())
    pairs = [(method, "language_vision"), (method, placebo), ("full", method)]
    table = paired_table(tidy, pairs, metrics)
    rows = []

    def add(key, observed, agrees):
        rows.append({"prediction": key, "expected": PREDICTIONS[key], "observed": observed, "agrees": agrees})

    zero = next((c for c in cells if "audio_shared=0" in c), None)
    if zero is not None:
        r = [_gain(table, zero, method, placebo, m) for m in metrics]
        add("P1", "; ".join(f"{m} vs placebo {_show(x)}" for m, x in zip(metrics, r, strict=True)),
            all(x is not None and x["verdict"] != "supported" for x in r))
    for cell in (c for c in ("labels_bottleneck", "default") if c in cells):
        r = {(b, m): _gain(table, cell, method, b, m) for b in ("language_vision", placebo) for m in metrics}
        shown = all(x is not None and x["verdict"] == "supported" for x in r.values())
        add("P2", f"{cell}: " + "; ".join(f"{m} vs {b.replace('kt target=', '')} {_show(x)}"
                                          for (b, m), x in r.items()),
            shown if cell == "labels_bottleneck" else None)
    sizes = [(float(c.split("train_scale=")[1]), c) for c in cells if "train_scale=" in c]
    base = sizes[0][1].split(", ")[0] if sizes else None  # the regime the size controls vary
    if base in cells:
        from .simulate import REGIMES

        series = sorted([(REGIMES[base].get("train_scale", 1.0), base), *sizes])
        for m in metrics:
            gains = [(size, _gain(table, c, method, "language_vision", m)) for size, c in series]
            known = [(size, g["gain"]) for size, g in gains if g is not None]
            add("P3", f"{m} gain vs language+vision by train_scale: " +
                "; ".join(f"{size:g}: {_show(g)}" for size, g in gains),
                bool(known) and known[0][1] > known[-1][1])
    for cell in cells:
        r = [_gain(table, cell, "full", method, m) for m in metrics]
        if all(x is None for x in r):
            continue
        add("P4", f"{cell}: full - kt " + "; ".join(f"{m} {_show(x)}" for m, x in zip(metrics, r, strict=True)),
            all(x is None or x["verdict"] != "opposite" for x in r))
    main = zero.split(", ")[0] if zero is not None else None
    if main in cells:  # P4's second half: full's lead where nothing is shared, against the regime's own
        for m in metrics:
            at_zero, at_main = (_gain(table, c, "full", method, m) for c in (zero, main))
            if at_zero is not None and at_main is not None:
                add("P4", f"{m}: full's lead over kt at audio_shared=0 {at_zero['gain']:+.3f} vs "
                          f"{at_main['gain']:+.3f} in {main}", bool(at_zero["gain"] > at_main["gain"]))
    return pd.DataFrame(rows)


def main_variant_runs(data: MultimodalData, seeds, profile_name: str, workers: int | None = None,
                      progress: bool = True, scheduler: str | None = None) -> pd.DataFrame:
    """kt as :data:`MAIN_METHOD` on ``data`` itself (real or simulated; its target's run is trained first):
    the tidy table of :func:`ktlib.runs.run_jobs`, variant ``MAIN_METHOD`` without the ``"kt "``."""
    variants = transfer_variants((MAIN_TARGET,), (MAIN_SUPERVISION,))
    return run_jobs(plan(data, ["kt"], seeds, profile_name, variants), progress=progress, workers=workers,
                    scheduler=scheduler)


SHARED_VALUES = (0.0, 0.4, 0.8, 1.0)  # the simulator's audio_shared (0.8: its default)


def shared_runs(data: MultimodalData, seeds, profile_name: str, values=SHARED_VALUES, regime: str = "default",
                baselines=("language_vision", "full"), workers: int | None = None,
                progress: bool = True, scheduler: str | None = None) -> pd.DataFrame:
    """``baselines`` and kt (:data:`MAIN_METHOD`; its target's run is trained in any case) at each
    ``audio_shared``, in ``regime``: the tidy table of :func:`transfer_runs` with an ``audio_shared`` column."""
    lv_full = {b: (b, {}) for b in baselines}
    cells = {f"audio_shared={v:g}": Cell(regime, {"audio_shared": float(v)}, lv_full,
                                         transfer_variants((MAIN_TARGET,), (MAIN_SUPERVISION,))) for v in values}
    tidy = transfer_runs(data, cells, seeds, profile_name, workers, progress, scheduler)
    tidy["audio_shared"] = tidy["cell"].str.split("=").str[1].astype(float)
    return tidy
