"""The workbook's experiment definitions: paired comparisons and claim verdicts on hand-made tables, and the
linear probes that describe how predictable the simulated audio is."""

import numpy as np
import pandas as pd
import pytest

from ktlib import experiments as X
from ktlib.analysis import linear_probes
from ktlib.data import load_simulated
from ktlib.simulate import preset


def _tidy(values: dict[tuple[str, int], float], metric: str = "mae", column: str = "setting") -> pd.DataFrame:
    rows = [{"dataset": "mosi", "alignment": "aligned", "data": "real", "setting": "kt", "variant": "default",
             "seed": seed, "split": "test", "metric": metric, "value": v, "run": f"{key}-{seed}", column: key}
            for (key, seed), v in values.items()]
    return pd.DataFrame(rows)


def test_paired_differences_by_hand():
    tidy = _tidy({("kt", 1): 0.80, ("kt", 2): 0.90, ("kt", 3): 1.00,
                  ("language_vision", 1): 0.85, ("language_vision", 2): 0.92, ("language_vision", 3): 0.99})
    row = X.paired_differences(tidy, metrics=("mae",)).iloc[0]
    # MAE: lower is better, so the signed differences are lv - kt = 0.05, 0.02, -0.01
    np.testing.assert_allclose(row["differences"], [0.05, 0.02, -0.01])
    assert row["mean"] == pytest.approx(0.02) and row["better_on"] == 2 and row["n_seeds"] == 3
    assert row["std"] == pytest.approx(np.std([0.05, 0.02, -0.01]))
    # t = mean / (sample sd / sqrt(n)) = 0.02 / (0.03 / sqrt(3))
    assert row["t"] == pytest.approx(0.02 / (0.03 / np.sqrt(3)))


def test_paired_differences_higher_is_better_and_one_seed():
    tidy = _tidy({("kt", 1): 0.70, ("language_vision", 1): 0.60}, metric="corr")
    row = X.paired_differences(tidy, metrics=("corr",)).iloc[0]
    assert row["mean"] == pytest.approx(0.10) and row["better_on"] == 1 and np.isnan(row["t"])


def test_claim_verdicts_follow_gain_and_noise():
    main = _tidy({("kt", 1): 0.80, ("kt", 2): 0.82, ("language_vision", 1): 0.90, ("language_vision", 2): 0.92,
                  ("full", 1): 0.70, ("full", 2): 0.90, ("language_only", 1): 0.85, ("language_only", 2): 0.85})
    table = X.claims(main).set_index("source", append=True)["verdict"].to_numpy()
    # kt beats lv by 0.10 > noise 0.01; full vs kt: gain 0.01 < noise 0.10; lv vs language only: -0.06 > 0.01
    assert list(table) == ["supported", "within seed noise", "not supported"]


def test_single_seed_claims_give_the_direction_only():
    main = _tidy({("kt", 1): 0.8, ("language_vision", 1): 0.9, ("full", 1): 0.85, ("language_only", 1): 0.95})
    verdicts = X.claims(main)["verdict"].tolist()
    assert verdicts == ["same direction (1 seed)", "opposite direction (1 seed)", "same direction (1 seed)"]


def test_linear_probe_finds_more_of_the_audio_when_it_is_more_predictable(sim_cache):
    r2 = {}
    for rho in (0.0, 1.0):
        data = load_simulated(preset("mosi", "aligned", scale=0.3, audio_predictability=rho), cache_dir=sim_cache)
        probes = linear_probes(data).set_index("probe")["value"]
        r2[rho] = probes["audio from language+vision"]
        assert probes["sentiment from language"] > probes["sentiment from audio"]  # the simulator's ordering
    assert r2[1.0] > r2[0.0] + 0.15
