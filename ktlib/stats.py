"""One rule for numbers over training seeds, used by every table, figure and verdict of the workbook.

Spread: **sample standard deviation** (``ddof=1``, divisor n - 1) over seeds, written "mean ± std"
(:func:`mean_std`, :func:`fmt_mean_std`, :func:`seed_table`; tables of such cells: :func:`mean_std_table`, which
names the convention in the header, :func:`seeds_caption`).  With one seed the std is undefined (NaN) and the
formatter writes "n/a"; it is never shown as 0.

Comparisons: two configurations are compared **paired by seed**.  Each seed's difference is signed so that a
positive number means the claimed direction is better (e.g. kt's MAE is lower than language+vision's).
:func:`paired` gives the mean difference, its sample std, the number of seeds n, the 95 % Student-t interval of
the mean, ``mean ± t(0.975, n - 1) * std / sqrt(n)``, and the sign count (on how many of the n seeds the
difference is positive).  :func:`verdict` reads the interval:

- "supported": the interval lies above zero (low > 0), the claimed direction;
- "opposite": the interval lies below zero (high < 0), the other direction;
- "undecided": the interval contains zero;
- "undecided (1 seed)": a single seed has no spread to judge against (the sign count still gives its direction);
- "not run": no seed has both numbers.

Pure Python (``math`` only): the Student-t quantile is found by bisection on the t distribution's CDF, written
with the regularised incomplete beta function (Lentz's continued fraction).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

CONFIDENCE = 0.95  # of every interval the workbook reports
SUPPORTED, OPPOSITE, UNDECIDED = "supported", "opposite", "undecided"
ONE_SEED, NOT_RUN = "undecided (1 seed)", "not run"
VERDICTS = (SUPPORTED, OPPOSITE, UNDECIDED, ONE_SEED, NOT_RUN)


# ----------------------------------------------------------------------------------------------------------------
# The Student-t distribution


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz), for x < (a + 1) / (a + b + 2)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even step
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd step
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a > 0 and b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got x={x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b  # symmetry: I_x(a, b) = 1 - I_{1-x}(b, a)


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (df > 0, not necessarily whole)."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom, e.g. ``t_quantile(0.975, 2) = 4.3027``.

    Bisection on :func:`t_cdf` to about 1e-12 relative precision.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:  # bracket the quantile
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------------------------------------------
# Mean ± std over seeds


def _finite(values: Iterable) -> list[float]:
    """The values as floats, NaN and infinities left out."""
    out = [float(v) for v in values]
    return [v for v in out if math.isfinite(v)]


def sample_std(values: Iterable) -> float:
    """The sample standard deviation (ddof=1) of the finite values; NaN with fewer than two.

    Usable as a pandas aggregation: ``frame.groupby(keys)["value"].agg(sample_std)``.
    """
    xs = _finite(values)
    n = len(xs)
    if n < 2:
        return float("nan")
    mean = math.fsum(xs) / n
    return math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))


def mean_std(values: Iterable) -> tuple[float, float]:
    """(mean, sample std with ddof=1) of the finite values: the workbook's one "mean ± std over seeds".

    The mean is NaN for no value, the std NaN for fewer than two.
    """
    xs = _finite(values)
    mean = math.fsum(xs) / len(xs) if xs else float("nan")
    return mean, sample_std(xs)


def fmt_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """``"0.900 ± 0.100"``; a std that is NaN (one seed) is written ``"n/a"``, a NaN mean ``"n/a"`` alone."""
    if not math.isfinite(mean):
        return "n/a"
    spread = f"{std:.{digits}f}" if math.isfinite(std) else "n/a"
    return f"{mean:.{digits}f} ± {spread}"


def fmt_seeds(values: Iterable, digits: int = 3) -> str:
    """The values over seeds as ``"mean ± std"`` (the one convention), e.g. for ``groupby(...).agg(fmt_seeds)``."""
    return fmt_mean_std(*mean_std(values), digits)


def seed_table(frame, keys: list[str], value: str = "value", count: str = "n"):
    """Per group of ``keys``: ``mean``, ``std`` (sample, ddof=1) and the number of finite values (``count``).

    ``frame`` is a pandas DataFrame with one row per seed and group; returns a DataFrame with ``keys`` as columns.
    """
    grouped = frame.groupby(keys, sort=False, dropna=False)[value]
    out = grouped.agg(mean=lambda v: mean_std(v)[0], std=sample_std, **{count: lambda v: len(_finite(v))})
    return out.reset_index()


def seeds_caption(counts: Iterable) -> str:
    """How the "mean ± std" cells of a table were made, e.g. ``"mean ± sample std (ddof=1) over 3 seeds"``
    (``"over 1-3 seeds"`` where groups differ): every table of such cells names it, in its columns' header."""
    ns = sorted({int(n) for n in _finite(counts)})
    over = "no" if not ns else f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    return f"mean ± sample std (ddof=1) over {over} seed{'' if ns == [1] else 's'}"


def mean_std_table(frame, index: list[str], columns: str = "metric", order=None, value: str = "value",
                   digits: int = 3, sort: bool = True):
    """The workbook's one table of "mean ± std" cells (:func:`fmt_mean_std`): ``index`` by ``columns``.

    ``frame``: one row per seed with a ``value`` column (summarised here by :func:`seed_table`), or one row per
    group already summarised, with ``mean``, ``std`` and a count (``n`` or ``seeds``), as :func:`seed_table`
    makes them.  ``order`` keeps those columns, in that order.  The columns' header names the convention
    (:func:`seeds_caption`).
    """
    if "mean" not in frame.columns:
        frame = seed_table(frame, [*index, columns], value)
    count = "n" if "n" in frame.columns else "seeds"
    cells = frame.assign(_mean_std=[fmt_mean_std(m, s, digits)
                                    for m, s in zip(frame["mean"], frame["std"], strict=True)])
    table = cells.pivot_table(index=index, columns=columns, values="_mean_std", aggfunc="first", sort=sort)
    if order is not None:
        table = table[list(order)]
    table.columns.name = seeds_caption(frame[count])
    return table


# ----------------------------------------------------------------------------------------------------------------
# Paired comparisons and verdicts


@dataclass(frozen=True)
class Paired:
    """Seed-by-seed differences summarised (see the module docstring); ``positive`` of ``n`` seeds favour the claim."""

    mean: float
    std: float  # sample std (ddof=1) of the differences; NaN with fewer than two seeds
    n: int
    low: float  # the 95 % Student-t interval of the mean difference; NaN with fewer than two seeds
    high: float
    positive: int

    @property
    def signs(self) -> str:
        """The sign count, e.g. "4/5": on 4 of 5 seeds the difference is positive."""
        return f"{self.positive}/{self.n}"

    @property
    def verdict(self) -> str:
        return verdict(self.low, self.high, self.n)


def paired(diff: Iterable, confidence: float = CONFIDENCE) -> Paired:
    """Summarise per-seed differences, signed so that positive means the claimed direction is better.

    Non-finite differences (a seed where a metric is undefined) are left out and not counted in ``n``.
    The interval is ``mean ± t((1 + confidence) / 2, n - 1) * std / sqrt(n)``.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    xs = _finite(diff)
    n = len(xs)
    mean, std = mean_std(xs)
    low = high = float("nan")
    if n >= 2:
        half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
        low, high = mean - half, mean + half
    return Paired(mean=mean, std=std, n=n, low=low, high=high, positive=sum(x > 0 for x in xs))


def verdict(low: float, high: float, n: int = 2) -> str:
    """The reading of an interval of a difference signed so that positive is the claimed direction.

    "supported" when low > 0, "opposite" when high < 0, "undecided" when it contains zero (or is NaN);
    with ``n`` = 1 seed "undecided (1 seed)", with none "not run".
    """
    if n < 1:
        return NOT_RUN
    if n < 2:
        return ONE_SEED
    if low > 0:
        return SUPPORTED
    if high < 0:
        return OPPOSITE
    return UNDECIDED
