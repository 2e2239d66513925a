"""The one rule for numbers over seeds (ktlib.stats): Student-t quantiles, the paired interval, the verdict, and the
sample-std convention of every "mean ± std"."""

import math

import numpy as np
import pandas as pd
import pytest

from ktlib import stats as S


@pytest.mark.parametrize(("df", "expected"), [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622),
                                              (30, 2.0423), (1000, 1.9623)])
def test_t_quantile_matches_published_tables(df, expected):
    assert S.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


def test_t_quantile_other_levels_and_symmetry():
    assert S.t_quantile(0.995, 4) == pytest.approx(4.6041, abs=1e-4)
    assert S.t_quantile(0.95, 10) == pytest.approx(1.8125, abs=1e-4)
    assert S.t_quantile(0.025, 4) == pytest.approx(-S.t_quantile(0.975, 4))
    assert S.t_quantile(0.5, 7) == 0.0
    assert S.t_quantile(0.975, 1e6) == pytest.approx(1.95996, abs=1e-4)  # the normal quantile in the limit
    for df in (1, 2.5, 6):  # the quantile inverts the CDF
        assert S.t_cdf(S.t_quantile(0.9, df), df) == pytest.approx(0.9, abs=1e-10)


def test_t_quantile_agrees_with_scipy_where_available():
    stats = pytest.importorskip("scipy.stats")  # a dev dependency (via scikit-learn), not a runtime one
    for df in (1, 2, 3, 5, 8, 17, 50, 0.7):
        for p in (0.6, 0.9, 0.975, 0.999):
            assert S.t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_t_quantile_refuses_bad_arguments():
    with pytest.raises(ValueError, match="p must lie in"):
        S.t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        S.t_quantile(0.975, 0)


def test_betainc_known_values():
    assert S.betainc(1, 1, 0.3) == pytest.approx(0.3)  # uniform
    assert S.betainc(2, 3, 0.4) == pytest.approx(0.5248)  # 1 - sum_{k<2} C(4,k) 0.4^k 0.6^(4-k)
    assert S.betainc(0.5, 0.5, 0.5) == pytest.approx(0.5)


def test_paired_interval_by_hand():
    # diffs 1, 2, 3: mean 2, sample sd 1, t(0.975, 2) = 4.3027, half-width 4.3027 / sqrt(3) = 2.484
    result = S.paired([1.0, 2.0, 3.0])
    assert (result.mean, result.std, result.n, result.positive) == (pytest.approx(2.0), pytest.approx(1.0), 3, 3)
    assert result.high - result.mean == pytest.approx(2.484, abs=1e-3)
    assert result.low == pytest.approx(2.0 - 2.484, abs=1e-3) and result.signs == "3/3"
    assert result.verdict == "undecided"  # the interval (-0.484, 4.484) contains zero


def test_verdict_rule_on_hand_made_differences():
    assert S.paired([0.05, 0.04, 0.06, 0.05]).verdict == "supported"  # interval above zero
    assert S.paired([-0.05, -0.04, -0.06, -0.05]).verdict == "opposite"  # below zero
    straddle = S.paired([0.05, -0.03, 0.02, -0.01])
    assert straddle.low < 0 < straddle.high and straddle.verdict == "undecided" and straddle.signs == "2/4"
    one = S.paired([0.3])
    assert one.n == 1 and math.isnan(one.low) and math.isnan(one.std) and one.verdict == "undecided (1 seed)"
    assert one.signs == "1/1"  # the direction of the one seed is still there
    assert S.paired([]).verdict == "not run"
    assert S.verdict(0.1, 0.2) == "supported" and S.verdict(-0.2, -0.1) == "opposite"
    assert S.verdict(-0.1, 0.2) == "undecided" and S.verdict(0.0, 0.2) == "undecided"  # zero inside: no claim
    assert S.verdict(float("nan"), float("nan"), n=1) == "undecided (1 seed)"


def test_paired_leaves_out_non_finite_differences():
    result = S.paired([1.0, float("nan"), 3.0])
    assert result.n == 2 and result.mean == pytest.approx(2.0)


def test_mean_std_is_the_sample_std_everywhere():
    values = [0.8, 0.9, 1.0]
    mean, std = S.mean_std(values)
    assert mean == pytest.approx(0.9) and std == pytest.approx(0.1)  # ddof=1: sqrt(0.02 / 2)
    assert std == pytest.approx(np.std(values, ddof=1)) and std == pytest.approx(pd.Series(values).std())
    assert S.sample_std(np.array(values)) == pytest.approx(0.1)
    mean, std = S.mean_std([0.7])
    assert mean == pytest.approx(0.7) and math.isnan(std)


def test_fmt_mean_std():
    assert S.fmt_mean_std(0.9, 0.1) == "0.900 ± 0.100"
    assert S.fmt_mean_std(72.345, 1.06, 1) == "72.3 ± 1.1"
    assert S.fmt_mean_std(0.9, float("nan")) == "0.900 ± n/a"  # one seed: no spread, never "± 0"
    assert S.fmt_mean_std(float("nan"), float("nan")) == "n/a"


def test_seed_table_groups_with_the_sample_std():
    frame = pd.DataFrame({"method": ["a", "a", "a", "b"], "value": [0.8, 0.9, 1.0, 0.5]})
    table = S.seed_table(frame, ["method"], count="seeds").set_index("method")
    assert table.loc["a", "std"] == pytest.approx(0.1) and table.loc["a", "seeds"] == 3
    assert math.isnan(table.loc["b", "std"]) and table.loc["b", "mean"] == pytest.approx(0.5)


def test_mean_std_table_is_one_pivot_that_names_its_convention():
    per_seed = pd.DataFrame({"method": ["a", "a", "a", "b", "a"], "metric": ["mae"] * 4 + ["corr"],
                             "value": [0.8, 0.9, 1.0, 0.5, 0.3]})
    table = S.mean_std_table(per_seed, ["method"], order=["mae", "corr"])
    assert list(table.columns) == ["mae", "corr"]
    assert table.loc["a", "mae"] == "0.900 ± 0.100" and table.loc["b", "mae"] == "0.500 ± n/a"
    assert table.columns.name == "mean ± sample std (ddof=1) over 1-3 seeds"
    summarised = S.seed_table(per_seed, ["method", "metric"], count="seeds")  # already summarised: same cells
    assert S.mean_std_table(summarised, ["method"], order=["mae", "corr"]).equals(table)
    assert S.seeds_caption([2, 2]) == "mean ± sample std (ddof=1) over 2 seeds"
    assert S.seeds_caption([1]) == "mean ± sample std (ddof=1) over 1 seed"


def test_headline_metric_per_task():
    from ktlib.metrics import headline_metric

    assert headline_metric("regression") == "mae" and headline_metric("classification") == "mean_acc"
    with pytest.raises(ValueError, match="task must be one of"):
        headline_metric("ranking")
