"""The workbook's experiments, defined once: the notebooks that train them and the notebook that gathers them call
the same functions, so a result is read back from the run store, never trained twice.

- :func:`main_runs`: the five settings of Tables I-III over the training seeds.
- :func:`ablation_runs`: the knowledge-transfer model with L1 vs L2 consistency (Table V), one target branch kept
  vs all (Table IV) and a sweep of the consistency weights lambda1 = lambda2.
- :func:`predictability_runs`: language+vision and kt on simulated data whose audio is more or less predictable
  from vision and language (the simulator's ``audio_predictability``); simulator only.
- :func:`paired_differences` and :func:`claims`: kt against language+vision seed by seed, and which of the paper's
  claims a set of runs supports.
- :func:`robustness_runs` and :func:`auilc_table` (beyond the paper): MulT on zero-filled inputs, knowledge
  transfer for any missing modality (``kt_any``) and a MITR-DNet-style distillation student, scored under the
  missing-data protocols of :mod:`ktlib.missing` at every rate; the area under each metric-vs-rate curve.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from .data import MultimodalData, atomic_write, from_recipe, load_simulated
from .metrics import LOWER_IS_BETTER
from .missing import RATES, Protocol, auilc
from .model import SETTINGS  # the five settings of Tables I-III
from .runs import Job, Run, default_runs_dir, default_workers, in_pool, plan, read_jobs, run_id, run_jobs, train_missing

# Ablation families: label -> ModelConfig overrides of the kt model.  The default kt model is in each family.
CONSISTENCY = {"L2": {}, "L1": {"consistency": "l1"}}  # Table V
TARGETS = {"all targets": {}, "target=language": {"targets": ("l",)}, "target=audio": {"targets": ("a",)},
           "target=vision": {"targets": ("v",)}}  # Table IV: which target modality's cross-modal branch is kept
LAMBDAS = (0.0, 1.0)  # lambda1 = lambda2; 0 trains the transfer network by the task loss alone
PREDICTABILITY = (0.0, 0.7, 1.0)  # the simulator's audio_predictability (0.7: its default)
FAMILIES = {"consistency": CONSISTENCY, "targets": TARGETS,
            "lambda": {f"lambda={v:g}": {"lambda1": v, "lambda2": v} for v in LAMBDAS}}

def main_runs(data: MultimodalData, seeds, profile_name: str, workers: int | None = None,
              progress: bool = True) -> pd.DataFrame:
    """The five settings x seeds (trained, or read back from the store): a tidy table."""
    return run_jobs(plan(data, SETTINGS, seeds, profile_name), progress=progress, workers=workers)


def ablation_runs(data: MultimodalData, seeds, profile_name: str, workers: int | None = None,
                  progress: bool = True) -> dict[str, pd.DataFrame]:
    """Each ablation family (``FAMILIES``) of the kt model: family name -> tidy table (variant = the label)."""
    jobs = {name: plan(data, ["kt"], seeds, profile_name, variants) for name, variants in FAMILIES.items()}
    train_missing([j for js in jobs.values() for j in js], progress=progress, workers=workers)  # all at once
    return {name: read_jobs(js) for name, js in jobs.items()}


def predictability_runs(data: MultimodalData, seeds, profile_name: str, values=PREDICTABILITY,
                        workers: int | None = None, progress: bool = True) -> pd.DataFrame | None:
    """language+vision and kt on the simulator at each ``audio_predictability``; None for real data.

    Every other knob is the one of ``data``; the variant column reads ``audio_predictability=<value>``.
    """
    if data.sim_config is None:
        return None
    cache = data.path.parent if data.path is not None else None
    jobs = []
    for value in values:
        sim = data if value == data.sim_config.audio_predictability else load_simulated(
            replace(data.sim_config, audio_predictability=float(value)), cache_dir=cache)
        jobs += plan(sim, ["language_vision", "kt"], seeds, profile_name,
                     {f"audio_predictability={value:g}": {}})
    table = run_jobs(jobs, progress=progress, workers=workers)
    table["audio_predictability"] = table["variant"].str.split("=").str[1].astype(float)
    return table


def paired_differences(tidy: pd.DataFrame, a: str = "kt", b: str = "language_vision", split: str = "test",
                       metrics=("mae", "corr", "acc2_non0", "f1_non0", "acc7")) -> pd.DataFrame:
    """Seed by seed, ``a`` minus ``b`` per metric, signed so that a positive number means ``a`` is better.

    Returns one row per metric: the per-seed differences, their mean and population std, on how many seeds
    ``a`` is better, and a paired t statistic (mean / (sample std / sqrt(n))); NaN with fewer than two seeds.
    """
    part = tidy[(tidy["split"] == split) & tidy["setting"].isin([a, b])]
    rows = []
    for metric in metrics:
        cell = part[part["metric"] == metric].pivot_table(index="seed", columns="setting", values="value")
        if a not in cell or b not in cell:
            continue
        sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
        diff = sign * (cell[a] - cell[b]).dropna().to_numpy()
        n = len(diff)
        sd = float(np.std(diff, ddof=1)) if n > 1 else float("nan")
        t = float(diff.mean() / (sd / np.sqrt(n))) if n > 1 and sd > 0 else float("nan")
        rows.append({"metric": metric, "n_seeds": n, "differences": np.round(diff, 4).tolist(),
                     "mean": float(diff.mean()), "std": float(np.std(diff)), "better_on": int((diff > 0).sum()),
                     "t": t})
    return pd.DataFrame(rows)


def _verdict(gain: float, noise: float, seeds: int) -> str:
    if not np.isfinite(gain):
        return "not run"
    if seeds < 2:  # no spread to judge against: report the direction only
        return "same direction (1 seed)" if gain > 0 else "opposite direction (1 seed)"
    if abs(gain) <= noise:
        return "within seed noise"
    return "supported" if gain > 0 else "not supported"


def claims(main: pd.DataFrame, ablations: dict[str, pd.DataFrame] | None = None,
           metric: str = "mae") -> pd.DataFrame:
    """The paper's claims, each checked on these runs with ``metric`` on the test split.

    A claim's gain is signed so that positive supports it.  Its verdict is "supported" or "not supported" when
    the gain exceeds the noise (the larger population std over seeds of the two numbers compared), else "within
    seed noise"; with a single seed there is no noise to judge against and the verdict gives the direction only.
    """
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0

    def cell(tidy, column, value):
        return tidy[(tidy[column] == value) & (tidy["metric"] == metric) & (tidy["split"] == "test")]["value"]

    def row(claim, source, tidy, column, better, worse):
        a, b = cell(tidy, column, better), cell(tidy, column, worse)
        gain = sign * (a.mean() - b.mean()) if len(a) and len(b) else float("nan")
        noise = max(float(np.std(a)) if len(a) else 0.0, float(np.std(b)) if len(b) else 0.0)
        seeds = min(len(a), len(b))
        return {"claim": claim, "source": source, "metric": metric, "gain": gain, "noise": noise, "seeds": seeds,
                "verdict": _verdict(gain, noise, seeds)}

    rows = [row("reconstructing audio beats dropping it (kt vs language+vision)", "Tables I-III", main, "setting",
                "kt", "language_vision"),
            row("the full model, with real audio, is best (full vs kt)", "Tables I-III", main, "setting", "full",
                "kt"),
            row("two modalities beat one (language+vision vs language only)", "Tables I-III", main, "setting",
                "language_vision", "language_only")]
    if ablations:
        rows.append(row("L2 consistency beats L1", "Table V", ablations["consistency"], "variant", "L2", "L1"))
        for single in ("target=language", "target=audio", "target=vision"):
            rows.append(row(f"all target branches beat {single} alone", "Table IV", ablations["targets"],
                            "variant", "all targets", single))
        rows.append(row("the consistency loss helps (lambda=1 vs lambda=0)", "beyond the paper",
                        ablations["lambda"], "variant", "lambda=1", "lambda=0"))
    return pd.DataFrame(rows)



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
    return [Protocol(kind, rate=float(r), phase=phase, seed=MASK_SEED) for r in rates]


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
    """Score one run under several protocols in a worker process (see :func:`ktlib.runs.in_pool`)."""
    import torch

    recipe, run_dir, protocols, threads = job
    torch.set_num_threads(threads)
    scores(run_dir, from_recipe(recipe), protocols)


def robustness_runs(data: MultimodalData, seeds, profile_name: str, kinds=("fixed", "modality", "frame"),
                    phase: str = "test", rates=RATES, methods=tuple(METHODS), workers: int | None = None,
                    progress: bool = True) -> pd.DataFrame:
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
    train_missing(list(jobs.values()), progress=progress, workers=workers)
    folder = default_runs_dir()
    scored: dict[str, list[Protocol]] = {}  # run id -> the protocols it is scored under (test-only runs)
    for _, protocol, _, rid in cells:
        if jobs[rid].train.protocol is None:
            scored.setdefault(rid, []).append(protocol)
    if data.path is not None:  # in worker processes, one run each
        in_pool(_score_job, [(data.recipe(), str(folder / rid), ps) for rid, ps in scored.items()], workers,
                "runs scored", progress)
    results = {rid: scores(folder / rid, data, ps) for rid, ps in scored.items()}  # read back (or computed here)
    rows = []
    for method, protocol, seed, rid in cells:
        metrics = (results[rid][_score_key(protocol)] if rid in results
                   else Run.load(folder / rid).metrics["test"])  # trained under the protocol: its own test score
        rows += [{"method": method, "kind": protocol.kind, "phase": phase, "level": _level(protocol),
                  "rate": protocol.rate if protocol.kind != "fixed" else np.nan, "seed": seed, "metric": metric,
                  "value": value, "data": data.kind, "run": rid} for metric, value in metrics.items()]
    return pd.DataFrame(rows)


def auilc_table(tidy: pd.DataFrame, metrics=("mae", "corr", "acc2_non0", "f1_non0", "acc7")) -> pd.DataFrame:
    """AUILC (area under the metric-vs-rate curve over the rates run, per unit rate) per method, kind and phase:
    mean and population std over seeds.  Fixed-pattern rows are left out (they have no rate).

    A correlation is undefined for constant predictions (e.g. every frame dropped at r = 1); it counts as 0 here,
    no linear relation, so that the curve has a value at every rate.
    """
    part = tidy[(tidy["kind"] != "fixed") & tidy["metric"].isin(metrics)].copy()
    part.loc[(part["metric"] == "corr") & part["value"].isna(), "value"] = 0.0
    per_seed = (part.groupby(["data", "method", "kind", "phase", "metric", "seed"], sort=False)
                .apply(lambda g: auilc(g["rate"].to_numpy(), g["value"].to_numpy()), include_groups=False)
                .rename("auilc").reset_index())
    out = per_seed.groupby(["data", "method", "kind", "phase", "metric"], sort=False)["auilc"].agg(
        mean="mean", std=lambda v: float(np.std(v)), seeds="count")
    return out.reset_index()


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
