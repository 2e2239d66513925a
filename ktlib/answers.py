"""What notebooks 3 to 7 conclude, in words built from their numbers.

Each notebook opens with its question and closes by printing the answer that one function here computes from the
tables it made.  Every answer starts with the kind of data in brackets, e.g. ``[synthetic (simulator)]``: on the
simulator the answer is about the method's behaviour on synthetic data, never about the real corpus.  Numbers
over seeds are "mean ± sample std" (:mod:`ktlib.stats`); comparisons are paired by seed with a 95 % interval and
read by :func:`ktlib.stats.verdict`.
"""

from __future__ import annotations

import pandas as pd

from .analysis import NAMES
from .experiments import paired_comparison
from .metrics import LOWER_IS_BETTER
from .runs import summarize
from .stats import NOT_RUN, ONE_SEED, OPPOSITE, SUPPORTED, fmt_mean_std, seeds_caption

# How a verdict on "a beats b" opens the answer to "does a beat b?".
_OPENING = {SUPPORTED: "Yes", OPPOSITE: "No, the other way round", ONE_SEED: "Not decided on one seed",
            NOT_RUN: "Not run"}


def _better(metric: str) -> str:
    return "lower" if metric in LOWER_IS_BETTER else "higher"


def _test_means(tidy: pd.DataFrame, column: str, metric: str) -> pd.DataFrame:
    """Test-split ``mean``, ``std`` and ``n`` of ``metric`` per value of ``column``, best first."""
    s = summarize(tidy)
    s = s[(s["split"] == "test") & (s["metric"] == metric)].drop_duplicates(column).set_index(column)
    return s.sort_values("mean", ascending=metric in LOWER_IS_BETTER)


def training(main: pd.DataFrame, metric: str, kind: str) -> str:
    """Notebook 3: does ``kt`` beat ``language_vision`` (both without audio at test time), and how much of the
    gap to ``full`` (with the audio) does it close?"""
    means = _test_means(main, "setting", metric)["mean"]
    row = paired_comparison(main, metrics=(metric,)).iloc[0]
    kt, lv, full = means["kt"], means["language_vision"], means["full"]
    text = (f"[{kind}] Does kt beat language+vision without the audio at test time? "
            f"{_OPENING.get(row['verdict'], 'Not shown')}: over {row['n_seeds']} seeds kt's test {metric} is "
            f"{kt:.3f} against language+vision's {lv:.3f} and full's {full:.3f} (with the audio; {_better(metric)}"
            f" is better). Paired by seed kt is ahead by {row['mean_diff']:+.4f} (95% interval "
            f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]), on {row['signs']} seeds: {row['verdict']}.")
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    if sign * (full - lv) > 0:
        text += f" kt closes {100 * (kt - lv) / (full - lv):.0f}% of the gap from language+vision to full."
    else:
        text += " Here full, with the audio, is no better than language+vision: there is no gap for kt to close."
    return text


def ablations(families: dict[str, pd.DataFrame], metric: str, kind: str) -> str:
    """Notebook 4, parts 1-3: per ablation, its variants from best to worst on the test ``metric``."""
    lines = [f"[{kind}] Test {metric} ({_better(metric)} is better), mean ± sample std over seeds:"]
    for family, tidy in families.items():
        means = _test_means(tidy, "variant", metric)
        ranked = ", then ".join(f"{v} {fmt_mean_std(r['mean'], r['std'])}" for v, r in means.iterrows())
        caveat = " (one seed each: a direction, not a verdict)" if means["n"].max() < 2 else ""
        lines.append(f"- {family}: {ranked}{caveat}.")
    return "\n".join(lines)


def reconstruction(similarity: pd.DataFrame, r2: pd.DataFrame | None, kind: str) -> str:
    """Notebook 5: is each reconstruction specific to its own utterance's audio, and (simulator) how much of
    the audio's label-relevant signal does f'_A hold?"""
    lines = []
    for _, row in similarity.iterrows():
        gap = row["cosine (same utterance)"] - row["cosine (other utterance)"]
        closer = "closer to" if gap > 0 else "no closer to"
        lines.append(f"[{kind}] {row['reconstruction']} is {closer} its own utterance's f_A than to another's: "
                     f"centred cosine {row['cosine (same utterance)']:.3f} vs {row['cosine (other utterance)']:.3f} "
                     f"(gap {gap:+.3f}); frame CKA {row['frame CKA with f_A']:.3f} vs "
                     f"{row['frame CKA, other utterance']:.3f} with another's.")
    if r2 is not None:
        label = r2[r2["truth"] == "label-relevant"].set_index("representation")["R2"]
        ceiling, shuffled = "raw language + vision (ceiling)", "f'_A vs another utterance (shuffled)"
        lines.append(f"[{kind}] R² to the audio's label-relevant signal: f'_A {label[NAMES['f_a_hat']]:.3f}, the "
                     f"ceiling of raw language + vision {label[ceiling]:.3f}, shuffled {label[shuffled]:.3f}: f'_A "
                     f"holds {'more' if label[NAMES['f_a_hat']] > label[ceiling] else 'no more'} of it than a "
                     "linear reading of language and vision.")
    return "\n".join(lines)


def claims(verdicts: pd.DataFrame, kind: str) -> str:
    """Notebook 6: each of the paper's claims and its verdicts (one per metric), then the count."""
    lines = [f"[{kind}] The paper's claims on these runs (paired by seed, 95% interval):"]
    for claim, part in verdicts.groupby("claim", sort=False):
        judged = ", ".join(f"{r.verdict} in {r.metric} ({r.signs} seeds)" for r in part.itertuples())
        lines.append(f"- {claim}: {judged}.")
    counts = verdicts["verdict"].value_counts()
    lines.append(f"{counts.get(SUPPORTED, 0)} of {len(verdicts)} claim-metric checks supported, "
                 f"{counts.get(OPPOSITE, 0)} opposite, the rest undecided or not run.")
    return "\n".join(lines)


def robustness(test_only: pd.DataFrame, auilc: pd.DataFrame | None, metric: str, kind: str) -> str:
    """Notebook 7: which method holds up best with the audio missing (the paper's case), and under each
    protocol of random missing data (AUILC)."""
    lines = []
    no_audio = test_only[(test_only["kind"] == "fixed") & (test_only["level"] == "a") & (test_only["metric"] == metric)]
    if len(no_audio):
        means = no_audio.groupby("method")["value"].agg(["mean", "std", "count"])
        means = means.sort_values("mean", ascending=metric in LOWER_IS_BETTER)
        ranked = ", then ".join(f"{m} {fmt_mean_std(r['mean'], r['std'])}" for m, r in means.iterrows())
        lines.append(f"[{kind}] Without the audio (the paper's case), test {metric} ({_better(metric)} is better): "
                     f"{ranked}; {seeds_caption(means['count'])}.")
    if auilc is not None:
        for (missing, phase), part in auilc[auilc["metric"] == metric].groupby(["kind", "phase"], sort=False):
            part = part.sort_values("mean", ascending=metric in LOWER_IS_BETTER)
            ranked = ", then ".join(f"{r.method} {fmt_mean_std(r.mean, r.std)}" for r in part.itertuples())
            when = "train and test" if phase == "train_test" else "test only"
            lines.append(f"[{kind}] {missing}-level missing at {when}, AUILC in {metric}: {ranked}; "
                         f"{seeds_caption(part['seeds'])}.")
    return "\n".join(lines) or f"[{kind}] no protocol was run"

