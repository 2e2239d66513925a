"""The workbook's experiment definitions: paired comparisons and claim verdicts on hand-made tables, the linear
probes that describe how predictable the simulated audio is, and the run store's tables (one row per
configuration; real-data fixtures named with their caveat)."""

import hashlib
import json
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest

from ktlib import experiments as X
from ktlib import runs as R
from ktlib.__main__ import main
from ktlib.analysis import linear_probes
from ktlib.data import load_simulated
from ktlib.simulate import preset


def _tidy(values: dict[tuple[str, int], float], metric: str = "mae", column: str = "setting") -> pd.DataFrame:
    rows = [{"dataset": "mosi", "alignment": "aligned", "data": "real", "setting": "kt", "variant": "default",
             "seed": seed, "split": "test", "metric": metric, "value": v, "run": f"{key}-{seed}", column: key}
            for (key, seed), v in values.items()]
    return pd.DataFrame(rows)


def test_paired_comparison_by_hand():
    tidy = _tidy({("kt", 1): 0.80, ("kt", 2): 0.90, ("kt", 3): 1.00,
                  ("language_vision", 1): 0.85, ("language_vision", 2): 0.92, ("language_vision", 3): 0.99})
    row = X.paired_comparison(tidy, metrics=("mae",)).iloc[0]
    # MAE: lower is better, so the signed differences are lv - kt = 0.05, 0.02, -0.01
    np.testing.assert_allclose(row["differences"], [0.05, 0.02, -0.01])
    assert row["seeds"] == [1, 2, 3] and row["n_seeds"] == 3 and row["signs"] == "2/3"
    assert row["mean_diff"] == pytest.approx(0.02)
    assert row["std"] == pytest.approx(0.03)  # sample std (ddof=1) of the differences
    half = 4.302653 * 0.03 / np.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert row["ci_low"] == pytest.approx(0.02 - half) and row["ci_high"] == pytest.approx(0.02 + half)
    assert row["verdict"] == "undecided"


def test_paired_comparison_higher_is_better_and_one_seed():
    tidy = _tidy({("kt", 1): 0.70, ("language_vision", 1): 0.60}, metric="corr")
    row = X.paired_comparison(tidy, metrics=("corr",)).iloc[0]
    assert row["mean_diff"] == pytest.approx(0.10) and row["signs"] == "1/1" and np.isnan(row["ci_low"])
    assert row["verdict"] == "undecided (1 seed)"


def test_paired_comparison_pair_by_seed_not_by_position():
    # kt ran seeds 1-3, language+vision seeds 2-4: only seeds 2 and 3 are pairs
    tidy = _tidy({("kt", 1): 0.0, ("kt", 2): 0.80, ("kt", 3): 0.90,
                  ("language_vision", 2): 0.85, ("language_vision", 3): 0.96, ("language_vision", 4): 5.0})
    row = X.paired_comparison(tidy, metrics=("mae",)).iloc[0]
    assert row["seeds"] == [2, 3] and row["n_seeds"] == 2
    np.testing.assert_allclose(row["differences"], [0.05, 0.06])
    assert row["mean_diff"] == pytest.approx(0.055)


def test_paired_comparison_refuse_two_runs_of_one_seed():
    tidy = _tidy({("kt", 1): 0.8, ("language_vision", 1): 0.9})
    twice = pd.concat([tidy, tidy.assign(value=0.7, run="other")])
    with pytest.raises(ValueError, match="several runs with the same seed"):
        X.paired_comparison(twice, metrics=("mae",))


def test_claim_verdicts_follow_the_paired_interval():
    main = _tidy({("kt", 1): 0.80, ("kt", 2): 0.82, ("kt", 3): 0.81,
                  ("language_vision", 1): 0.90, ("language_vision", 2): 0.93, ("language_vision", 3): 0.91,
                  ("full", 1): 0.70, ("full", 2): 0.90, ("full", 3): 0.85,
                  ("language_only", 1): 0.85, ("language_only", 2): 0.88, ("language_only", 3): 0.86})
    table = X.claims(main)
    assert list(table.columns) == ["claim", "source", "metric", "mean_diff", "ci_low", "ci_high", "signs",
                                   "n_seeds", "verdict"]
    # kt beats lv on every seed by 0.10 +- 0.01: supported; full vs kt: +0.11, -0.08, -0.04 straddles zero;
    # lv vs language only: -0.05 on every seed, the interval below zero: opposite
    assert table["verdict"].tolist() == ["supported", "undecided", "opposite"]
    assert table["signs"].tolist() == ["3/3", "1/3", "0/3"] and (table["n_seeds"] == 3).all()
    kt = table.iloc[0]
    assert kt["mean_diff"] == pytest.approx(0.1033, abs=1e-4) and 0 < kt["ci_low"] < kt["mean_diff"] < kt["ci_high"]


def test_claims_in_several_metrics_pair_by_seed_and_judge_each():
    rows = []
    for metric, values in (("mae", {("kt", 1): 0.8, ("kt", 2): 0.9, ("language_vision", 1): 0.9,
                                    ("language_vision", 2): 1.0}),
                           ("corr", {("kt", 1): 0.5, ("kt", 2): 0.6, ("language_vision", 1): 0.55,
                                     ("language_vision", 2): 0.62})):
        rows.append(_tidy(values, metric=metric))
    table = X.claims(pd.concat(rows), metrics=["mae", "corr"])
    kt = table[table["claim"].str.startswith("reconstructing")].set_index("metric")
    assert list(kt.index) == ["mae", "corr"]
    assert kt.loc["mae", "verdict"] == "supported"  # 0.1 lower on both seeds: sd 0, the interval is the point
    # corr: lower on both seeds (-0.05, -0.02), but two seeds this far apart leave t(0.975, 1) = 12.7 * sd / sqrt(2)
    # = 0.19 either side: the sign count alone is no verdict
    assert kt.loc["corr", "verdict"] == "undecided" and kt.loc["corr", "signs"] == "0/2"
    assert set(table[table["claim"].str.contains("full")]["verdict"]) == {"not run"}  # no full runs here


def test_single_seed_claims_are_undecided_with_the_direction_in_the_sign_count():
    main = _tidy({("kt", 1): 0.8, ("language_vision", 1): 0.9, ("full", 1): 0.85, ("language_only", 1): 0.95})
    table = X.claims(main)
    assert table["verdict"].tolist() == ["undecided (1 seed)"] * 3
    assert table["signs"].tolist() == ["1/1", "0/1", "1/1"]


def test_ablation_claims_pair_variants_by_seed():
    consistency = _tidy({("L2", 1): 0.80, ("L2", 2): 0.81, ("L2", 3): 0.79, ("L1", 1): 0.85, ("L1", 2): 0.86,
                         ("L1", 3): 0.85}, column="variant")
    main = _tidy({("kt", 1): 0.8, ("language_vision", 1): 0.9})
    table = X.claims(main, {"consistency": consistency}).set_index("claim")
    assert table.loc["L2 consistency beats L1", "verdict"] == "supported"
    assert table.loc["all target branches beat target=audio alone", "verdict"] == "not run"


def test_linear_probe_finds_more_of_the_audio_when_more_of_it_is_shared(sim_cache):
    r2 = {}
    for kappa in (0.0, 1.0):
        data = load_simulated(preset("mosi", "aligned", scale=0.3, audio_shared=kappa, nuisance_shared=kappa),
                              cache_dir=sim_cache)
        probes = linear_probes(data).set_index("probe")["value"]
        r2[kappa] = probes["audio from language+vision"]
        assert probes["sentiment from audio"] > probes["sentiment from vision"]  # the simulator's ordering
    assert r2[1.0] > r2[0.0] + 0.15


# ----------------------------------------------------------------------------------------------------------------
# The run store's tables: one row per configuration (its seeds), real-data fixtures named with their caveat


def _fake_run(store, setting: str, seed: int, mae: float, layout: str = "mosi_aligned", data_seed: int = 0,
              **model_overrides):
    """A finished run folder as load_or_train writes it (config.json, metrics.json, history.csv), no training."""
    from ktlib.config import model_config, profile
    from ktlib.simulate import SimConfig
    from ktlib.specs import LAYOUTS
    from ktlib.train import TrainConfig

    quick = profile("quick")
    model = model_config(LAYOUTS[layout], setting=setting, **{**quick.model, **model_overrides})
    train = TrainConfig(**{**quick.train, "seed": seed})
    if layout == "mosi_utterance":
        data = {"layout": layout, "synthetic": False, "file": "mosi_poria2017_utt_stdsplit.pkl", "bytes": 2_500_000}
    else:
        sim = SimConfig(dataset="mosi", alignment="aligned", scale=quick.scale, seed=data_seed)
        data = {"layout": layout, "synthetic": True, "simulator": asdict(sim)}
    config = {"model": model.to_dict(), "train": asdict(train), "data": data}
    blob = json.dumps(config, sort_keys=True, default=str)
    folder = store / f"{layout}-{setting}-seed{seed}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, default=str))
    scores = {"mae": mae, "corr": 0.5, "acc2_non0": 0.7, "f1_non0": 0.7, "acc7": 0.3, "loss": mae}
    (folder / "metrics.json").write_text(json.dumps({"valid": scores, "test": scores,
                                                     "synthetic": data["synthetic"]}))
    (folder / "history.csv").write_text("epoch,train_task\n0,1.0\n")
    return folder


def test_store_table_keeps_two_kt_variants_with_the_same_seeds_apart(tmp_path, capsys):
    for seed, (default, l1, other_data) in enumerate([(1.00, 1.10, 2.0), (0.99, 1.12, 2.0), (1.01, 1.08, 2.0)], 1):
        _fake_run(tmp_path, "kt", seed, default)
        _fake_run(tmp_path, "kt", seed, l1, consistency="l1")  # an ablation variant: same seeds, not more seeds
        _fake_run(tmp_path, "kt", seed, other_data, data_seed=5)  # another simulation
    tidy = R.collect(tmp_path)
    assert tidy["config"].nunique() == 3 and tidy.groupby("config")["seed"].nunique().eq(3).all()
    table = R.compare_with_paper(R.summarize(tidy)).set_index("variant")
    assert len(table) == 3 and (table["seeds"] == 3).all()
    assert table.loc["quick profile", "MAE"] == "1.000 ± 0.010"  # 1.00, 0.99, 1.01: sample std 0.01
    assert table.loc["quick profile, consistency=l1", "MAE"] == "1.100 ± 0.020"
    assert table.loc["quick profile, sim.seed=5", "MAE"] == "2.000 ± 0.000"
    assert (table["MAE (paper)"] == 0.858).all()  # simulated MOSI: the paper's kt row beside it, as before
    assert main(["table", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("quick profile") == 3 and "sample std (ddof=1)" in out


def test_seed_and_seed_named_runs_do_not_split_a_configuration():
    from ktlib.model import ModelConfig
    from ktlib.train import TrainConfig

    def config(seed, **train):
        return {"model": ModelConfig(setting="full").to_dict(), "data": {"layout": "mosi_aligned"},
                "train": asdict(TrainConfig(seed=seed, **train))}

    assert R.config_id(config(1)) == R.config_id(config(2))
    assert R.config_id(config(1)) != R.config_id(config(1, lr=0.01))
    # a distillation student names its teacher by run id, which holds the (shared) seed
    student = [config(s, teacher=f"mosi_aligned-full-seed{s}-{h}", distill_pred=1.0)
               for s, h in ((1, "0123456789"), (2, "abcdef0123"))]
    assert R.config_id(student[0]) == R.config_id(student[1]) != R.config_id(config(1))


def test_real_fixture_runs_are_named_with_their_caveat_and_no_paper_row(tmp_path, capsys):
    for seed, mae in ((1, 0.70), (2, 0.72)):
        _fake_run(tmp_path, "kt", seed, mae, layout="mosi_utterance")
        _fake_run(tmp_path, "kt", seed, mae + 0.3)  # the simulator, beside it
    table = R.compare_with_paper(R.summarize(R.collect(tmp_path)))
    fixture = table[table["dataset"] == "mosi_utterance"].iloc[0]
    assert fixture["alignment"] == "utterance-level"
    assert fixture["data"].startswith("real fixture mosi_utterance (") and "leak" in fixture["data"]
    paper_columns = [c for c in table.columns if c.endswith("(paper)")]
    assert fixture[paper_columns].isna().all()  # no paper number beside the fixture
    assert fixture["MAE"] == "0.710 ± 0.014"
    assert table.columns.name == "mean ± sample std (ddof=1) over 2 seeds"  # the convention, in the header
    simulated = table[table["dataset"] == "mosi"].iloc[0]
    assert simulated["MAE (paper)"] == pytest.approx(0.858) and simulated["data"] == "synthetic (simulator)"
    assert not ((table["dataset"] == "mosi") & (table["data"] == "real")).any()  # never "mosi aligned real"
    assert main(["table", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mosi_utterance is a real-data fixture, not the corpus" in out and "no paper numbers beside it" in out
    assert R.data_label("mosi_utterance", False) == fixture["data"] and R.data_label("mosi_aligned", False) == "real"


# ----------------------------------------------------------------------------------------------------------------
# When reconstruction helps: verdicts over cells, and the story's predictions beside their outcomes


def _cells(values: dict[tuple[str, str, str], list[float]]) -> pd.DataFrame:
    """A tidy table of transfer_runs' shape from {(cell, method, metric): per-seed test values}."""
    rows = []
    for (cell, method, metric), per_seed in values.items():
        for seed, v in enumerate(per_seed, start=1):
            setting = "kt" if method.startswith("kt ") else method
            rows.append({"cell": cell, "method": method, "setting": setting, "seed": seed, "split": "test",
                         "metric": metric, "value": v, "run": f"{cell}-{method}-{seed}"})
    return pd.DataFrame(rows)


def _story(kt_mae, kt_corr, placebo_mae, placebo_corr, cell="labels_bottleneck", kt="kt target=full",
           placebo="kt target=placebo"):
    base = {(cell, "language_vision", "mae"): [1.00, 1.02, 0.98], (cell, "language_vision", "corr"): [0.5, 0.5, 0.5],
            (cell, "full", "mae"): [0.80, 0.81, 0.79], (cell, "full", "corr"): [0.7, 0.71, 0.69],
            (cell, kt, "mae"): kt_mae, (cell, kt, "corr"): kt_corr,
            (cell, placebo, "mae"): placebo_mae, (cell, placebo, "corr"): placebo_corr}
    return _cells(base)


def test_transfer_is_shown_only_against_both_language_vision_and_the_placebo():
    # kt better than language+vision on every seed, by 0.10 MAE and 0.1 Corr; the placebo as good as kt
    tidy = _story([0.90, 0.91, 0.89], [0.6, 0.61, 0.59], [0.90, 0.92, 0.88], [0.6, 0.6, 0.6])
    row = X.transfer_verdicts(tidy).set_index("method").loc["kt target=full"]
    assert row["mae vs language+vision"].startswith("+0.100 [") and row["mae vs language+vision"].endswith("3/3")
    assert row["transfer"] == "not shown"  # a gain the placebo gives too is regularisation
    assert row["ahead of language+vision"]
    assert row["full not worse"]
    # now the placebo does no better than language+vision
    tidy = _story([0.90, 0.91, 0.89], [0.6, 0.61, 0.59], [1.00, 1.03, 0.99], [0.5, 0.49, 0.5])
    verdicts = X.transfer_verdicts(tidy).set_index("method")
    assert verdicts.loc["kt target=full", "transfer"] == "shown"
    assert verdicts.loc["kt target=placebo", "transfer"] == "not shown"


def test_transfer_is_not_claimed_where_full_is_worse_than_kt():
    tidy = _story([0.60, 0.61, 0.59], [0.9, 0.91, 0.89], [1.00, 1.03, 0.99], [0.5, 0.49, 0.5])
    row = X.transfer_verdicts(tidy).set_index("method").loc["kt target=full"]
    assert not row["full not worse"] and row["transfer"] == "not shown"


def test_story_outcomes_set_each_prediction_beside_what_was_measured():
    shown = _story([0.90, 0.91, 0.89], [0.6, 0.61, 0.59], [1.00, 1.03, 0.99], [0.5, 0.49, 0.5])
    zero = _story([1.00, 1.02, 0.99], [0.5, 0.5, 0.51], [1.01, 1.01, 0.98], [0.5, 0.51, 0.5],
                  cell="labels_bottleneck, audio_shared=0")
    big = _story([0.95, 0.96, 0.94], [0.55, 0.56, 0.54], [1.00, 1.03, 0.99], [0.5, 0.49, 0.5],
                 cell="labels_bottleneck, train_scale=1")
    outcomes = X.story_outcomes(pd.concat([shown, zero, big], ignore_index=True))
    by = outcomes.groupby("prediction")["agrees"].apply(list).to_dict()
    assert by["P1"] == [True]  # no gain over the placebo where nothing is shared
    assert by["P2"] == [True]  # the bottleneck cell shows transfer
    assert by["P3"] == [True, True]  # MAE and Corr gains shrink from 0.25 to 1 times the training set
    # full is not worse than kt anywhere, and its lead at audio_shared=0 (0.20 MAE) is larger than at 0.8 (0.10)
    assert by["P4"] == [True, True, True, True, True]
    p3 = outcomes[outcomes["prediction"] == "P3"].iloc[0]["observed"]
    assert p3.startswith("mae gain vs language+vision by train_scale: 0.25: +0.100") and "1: +0.050" in p3


def test_story_outcomes_follow_the_main_variant_and_its_own_placebo_in_the_control_regime():
    names = dict(kt=X.MAIN_METHOD, placebo="kt target=placebo_memory +f'A")
    assert X.placebo_of(X.MAIN_METHOD) == names["placebo"]
    main = _story([0.95, 0.96, 0.94], [0.55, 0.56, 0.54], [1.00, 1.03, 0.99], [0.5, 0.49, 0.5], "default", **names)
    half = _story([0.90, 0.91, 0.89], [0.6, 0.61, 0.59], [1.00, 1.03, 0.99], [0.5, 0.49, 0.5],
                  "default, train_scale=0.5", **names)
    zero = _story([1.00, 1.02, 0.99], [0.5, 0.5, 0.51], [1.01, 1.01, 0.98], [0.5, 0.51, 0.5],
                  "default, audio_shared=0", **names)
    outcomes = X.story_outcomes(pd.concat([main, half, zero], ignore_index=True))
    by = outcomes.groupby("prediction")["agrees"].apply(list).to_dict()
    assert by["P1"] == [True] and by["P2"] == [None]  # P2 is judged in the bottleneck regime, which did not run
    assert by["P3"] == [True, True]  # half the data (0.5, listed first) gains more than the whole split (1)
    p3 = outcomes[outcomes["prediction"] == "P3"].iloc[0]["observed"]
    assert p3.startswith("mae gain vs language+vision by train_scale: 0.5: +0.100") and "; 1: +0.050" in p3
    assert "in default" in outcomes[outcomes["prediction"] == "P4"].iloc[-1]["observed"]


def test_transfer_cells_and_their_parameters():
    cells = X.transfer_cells()
    assert list(cells) == ["labels_bottleneck", "default", "default, audio_shared=0", "default, train_scale=0.5"]
    targets = ("random", "placebo", "full", "audio_only", "audio_memory", "placebo_memory")
    assert set(cells["labels_bottleneck"].variants) == {f"target={t}{s}" for t in targets for s in ("", " +f'A")}
    main = cells["default"]  # the controls' regime: lambda=0 and the matched language+vision join it
    assert set(main.variants) - set(cells["labels_bottleneck"].variants) == {"target=audio_memory +f'A lambda=0"}
    assert main.variants["target=audio_memory +f'A lambda=0"] == {
        "kt_target": "run_memory", "target_from": "audio_only", "kt_hat_weight": 0.0, "lambda1": 0.0, "lambda2": 0.0}
    assert main.variants["target=placebo"] == {"kt_target": "run", "kt_target_shuffle": True}
    assert main.baselines["language_vision (matched)"] == ("language_vision", X.MATCHED_LV)
    assert "language_vision (matched)" not in cells["labels_bottleneck"].baselines
    zero = cells["default, audio_shared=0"]
    assert zero.regime == "default" and zero.knobs == {"audio_shared": 0.0}
    assert set(zero.variants) == {"target=audio_memory +f'A", "target=placebo_memory +f'A"}
    assert cells["default, train_scale=0.5"].knobs == {"train_scale": 0.5}
    seeds, few = X.transfer_params(3, "full,placebo", "without", "labels_bottleneck", "")
    assert seeds == [1, 2, 3] and list(few) == ["labels_bottleneck"]
    assert set(few["labels_bottleneck"].variants) == {"target=full", "target=placebo"}
    assert "audio_only" not in few["labels_bottleneck"].baselines  # no target reads an audio-only run
    with pytest.raises(ValueError, match=r"transfer_seeds=1: an integer from 2 to 20.*\n.*controls='bogus'.*\n"
                                         r".*supervision='yes': one of \('without', 'with', 'both'\)"):
        X.transfer_params(1, "full", "yes", "labels_bottleneck", "bogus")
    controls_only = X.transfer_params(3, "full,placebo", "with", "", "audio_shared=0,train_scale=1",
                                      "labels_bottleneck")[1]
    assert list(controls_only) == ["labels_bottleneck, audio_shared=0", "labels_bottleneck, train_scale=1"]
    lambda_only = X.transfer_params(3, "full", "with", "", "lambda=0")[1]
    assert list(lambda_only) == ["default"] and list(lambda_only["default"].variants) == [
        "target=audio_memory +f'A lambda=0"]
    with pytest.raises(ValueError, match="nothing to run"):
        X.transfer_params(3, "full", "with", "", "")
    with pytest.raises(ValueError, match="control_regime='bogus'"):
        X.transfer_params(3, "full", "with", "default", "", "bogus")


def test_equal_steps_keeps_the_number_of_optimisation_steps():
    assert X.equal_steps("quick", 0.25) == {"epochs": 32} and X.equal_steps("quick", 1.0) == {}
    assert X.equal_steps("quick", 2.0) == {"epochs": 4}


def test_transfer_answer_says_where_transfer_is_shown_or_that_it_is_nowhere():
    shown = _story([0.90, 0.91, 0.89], [0.6, 0.61, 0.59], [1.00, 1.03, 0.99], [0.5, 0.49, 0.5])
    assert X.transfer_answer(X.transfer_verdicts(shown), 3) == (
        "Transfer shown (kt beats language+vision and its placebo on MAE and Corr, full not worse), 3 seeds: "
        "kt target=full in labels_bottleneck.")
    placebo_too = _story([0.90, 0.91, 0.89], [0.6, 0.61, 0.59], [0.90, 0.92, 0.88], [0.6, 0.6, 0.6])
    answer = X.transfer_answer(X.transfer_verdicts(placebo_too), 3)
    assert answer.startswith("No cell shows transfer over 3 seeds")
    assert "kt target=full in labels_bottleneck is ahead of language+vision on MAE and Corr but not of its " \
           "placebo: regularisation, not transfer." in answer
    assert "The placebo kt target=placebo in labels_bottleneck is ahead" in answer
    nothing = _story([1.00, 1.03, 0.99], [0.5, 0.49, 0.5], [1.00, 1.03, 0.99], [0.5, 0.49, 0.5])
    assert X.transfer_answer(X.transfer_verdicts(nothing), 3).endswith("on MAE and Corr.")
