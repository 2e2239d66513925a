"""The workbook's experiments, defined once: the notebooks that train them and the notebook that gathers them call
the same functions, so a result is read back from the run store, never trained twice.

- :func:`main_runs`: the five settings of Tables I-III over the training seeds.
- :func:`ablation_runs`: the knowledge-transfer model with L1 vs L2 consistency (Table V), one target branch kept
  vs all (Table IV) and a sweep of the consistency weights lambda1 = lambda2.
- :func:`predictability_runs`: language+vision and kt on simulated data whose audio is more or less predictable
  from vision and language (the simulator's ``audio_predictability``); simulator only.
- :func:`paired_differences` and :func:`claims`: kt against language+vision seed by seed, and which of the paper's
  claims a set of runs supports.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from .data import MultimodalData, load_simulated
from .metrics import LOWER_IS_BETTER
from .model import SETTINGS  # the five settings of Tables I-III
from .runs import plan, read_jobs, run_jobs, train_missing

# Ablation families: label -> ModelConfig overrides of the kt model.  The default kt model is in each family.
CONSISTENCY = {"L2": {}, "L1": {"consistency": "l1"}}  # Table V
TARGETS = {"all targets": {}, "target=language": {"targets": ("l",)}, "target=audio": {"targets": ("a",)},
           "target=vision": {"targets": ("v",)}}  # Table IV: which target modality's cross-modal branch is kept
LAMBDAS = (0.0, 0.1, 1.0, 10.0)  # lambda1 = lambda2; 0 trains the transfer network by the task loss alone
PREDICTABILITY = (0.0, 0.35, 0.7, 1.0)  # the simulator's audio_predictability
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

    from .data import make_loader
    from .runs import Run, default_runs_dir
    from .train import AUDIO_FREE_AT_TEST, evaluate

    out = {}
    for setting, rid in tidy[tidy["seed"] == seed].groupby("setting", sort=False)["run"].first().items():
        model = Run.load(default_runs_dir() / rid).load_model()
        missing = ("a",) if setting in AUDIO_FREE_AT_TEST else ()
        out[setting] = evaluate(model, make_loader(data, split, 64, shuffle=False, missing=missing),
                                torch.device("cpu"))[2]
    return out
