"""Training and the run store: every setting trains, runs are deterministic, resumable and reused, damaged
checkpoints are refused, and the command line trains and prints tables."""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

import ktlib.runs
import ktlib.train
from ktlib.__main__ import main
from ktlib.checkpoint import CheckpointError, load_checkpoint
from ktlib.config import model_config, profile
from ktlib.data import load_simulated
from ktlib.model import SETTINGS
from ktlib.runs import Run, compare_with_paper, grid, load_or_train, paper_table, run_id, summarize
from ktlib.simulate import preset
from ktlib.train import TrainConfig, fit

SMOKE = profile("smoke")


@pytest.fixture(scope="module")
def iemocap(tmp_path_factory):
    return load_simulated(preset("iemocap", "aligned", scale=0.02), cache_dir=tmp_path_factory.mktemp("sim"))


def _configs(data, setting="kt", epochs=2, seed=1, **train):
    """Smoke configurations for fit itself; kt takes its random target here (a target from a run needs the run
    store: see the grid tests)."""
    model_cfg = model_config(data.layout, setting=setting, **{**SMOKE.model, "kt_target": "random"})
    train_cfg = TrainConfig(**{**SMOKE.train, "epochs": epochs, "seed": seed, "device": "cpu", **train})
    return model_cfg, train_cfg


def _without_time(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


@pytest.mark.parametrize("setting", SETTINGS)
def test_smoke_training_of_every_setting_gives_finite_metrics(mosi, setting):
    result = fit(*_configs(mosi, setting), mosi, progress=False)
    assert len(result.history) == 2
    for split in ("valid", "test"):
        values = result.metrics[split]
        assert {"mae", "corr", "acc2_non0", "f1_non0", "acc7", "loss"} <= set(values)
        assert np.isfinite([values[k] for k in ("mae", "acc2_non0", "acc7", "loss")]).all()
    assert result.metrics["synthetic"] is True
    consistency = [row["train_consistency"] for row in result.history]
    assert (np.array(consistency) > 0).all() if setting == "kt" else (np.array(consistency) == 0).all()


def test_iemocap_training_scores_every_emotion(iemocap):
    result = fit(*_configs(iemocap, "kt"), iemocap, progress=False)
    test = result.metrics["test"]
    for emotion in ("neutral", "happy", "sad", "angry"):
        assert 0 <= test[f"{emotion}_acc"] <= 1 and 0 <= test[f"{emotion}_majority_acc"] <= 1
    assert np.isfinite(test["loss"])


def test_same_seed_gives_identical_metrics_on_cpu(mosi):
    a = fit(*_configs(mosi, "kt", seed=3), mosi, progress=False)
    b = fit(*_configs(mosi, "kt", seed=3), mosi, progress=False)
    c = fit(*_configs(mosi, "kt", seed=4), mosi, progress=False)
    assert a.metrics["test"] == b.metrics["test"]
    assert _without_time(a.history) == _without_time(b.history)
    assert a.metrics["test"] != c.metrics["test"]


def test_missing_audio_settings_are_validated_and_tested_without_reading_audio(mosi, monkeypatch):
    class Untouchable:
        """Stands in for the valid/test audio: any read fails the test."""

        def __init__(self, shape):
            self.shape = shape

        def __getitem__(self, item):
            raise AssertionError("audio of the valid/test split was read")

        def __array__(self, *args, **kwargs):
            raise AssertionError("audio of the valid/test split was read")

    for split in ("valid", "test"):
        part = mosi[split]
        monkeypatch.setattr(part, "a", Untouchable(part.a.shape))
    for setting in ("kt", "language_vision", "vision_only", "language_only"):
        result = fit(*_configs(mosi, setting, epochs=1), mosi, progress=False)
        assert np.isfinite(result.metrics["test"]["mae"])
    with pytest.raises(AssertionError, match="audio of the valid/test split was read"):
        fit(*_configs(mosi, "full", epochs=1), mosi, progress=False)


def test_interrupted_run_resumes_to_the_same_result(mosi, tmp_path, monkeypatch):
    model_cfg, train_cfg = _configs(mosi, "kt", epochs=3, seed=7)
    reference = fit(model_cfg, train_cfg, mosi, run_dir=tmp_path / "whole", progress=False)

    # Kill the second run in the middle of its second epoch (after 1.5 epochs of optimiser steps).
    steps_per_epoch = -(-len(mosi["train"]) // train_cfg.batch_size)
    calls = {"n": 0}
    original_step = torch.optim.Adam.step

    class Killed(Exception):
        pass

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > steps_per_epoch + steps_per_epoch // 2:
            raise Killed("killed mid-epoch")
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", dying_step)
    with pytest.raises(Killed):
        fit(model_cfg, train_cfg, mosi, run_dir=tmp_path / "cut", progress=False)
    monkeypatch.setattr(torch.optim.Adam, "step", original_step)
    state = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert state["epoch"] == 0, "the last checkpoint is the end of the first epoch"

    resumed = fit(model_cfg, train_cfg, mosi, run_dir=tmp_path / "cut", progress=False)
    assert resumed.metrics["test"] == reference.metrics["test"]
    assert resumed.metrics["valid"] == reference.metrics["valid"]
    assert _without_time(resumed.history) == _without_time(reference.history)
    assert resumed.metrics["resumed_at"] == [1] and reference.metrics["resumed_at"] == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no_checksum"])
def test_damaged_checkpoint_is_refused_with_a_clear_message(mosi, tmp_path, damage):
    model_cfg, train_cfg = _configs(mosi, "language_vision", epochs=1)
    fit(model_cfg, train_cfg, mosi, run_dir=tmp_path, progress=False)
    last = tmp_path / "last.pt"
    if damage == "truncate":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "garbage":
        last.write_bytes(b"not a checkpoint" * 100)
    else:
        (tmp_path / "last.pt.sha256").unlink()
    longer = TrainConfig(**{**train_cfg.__dict__, "epochs": 2})
    with pytest.raises(CheckpointError, match=r"last\.pt.*(truncated or corrupt|no checksum).*delete"):
        fit(model_cfg, longer, mosi, run_dir=tmp_path, progress=False)


def test_load_or_train_writes_the_run_folder_and_reuses_it(mosi, tmp_path, monkeypatch):
    model_cfg, train_cfg = _configs(mosi, "kt")
    run = load_or_train(model_cfg, train_cfg, mosi, runs_dir=tmp_path, progress=False)
    assert run.id == run_id(model_cfg, train_cfg, mosi) and run.id.startswith("mosi_aligned-kt-seed1-")
    names = {p.name for p in run.dir.iterdir()}
    assert {"config.json", "metrics.json", "history.csv", "model.pt", "environment.json"} <= names
    assert "last.pt" not in names
    config = json.loads((run.dir / "config.json").read_text())
    assert config["model"]["setting"] == "kt" and config["data"]["synthetic"] is True
    assert len(pd.read_csv(run.dir / "history.csv")) == train_cfg.epochs
    env = json.loads((run.dir / "environment.json").read_text())
    assert env["torch"] == torch.__version__
    model, payload = load_checkpoint(run.dir / "model.pt")  # weights_only=True inside
    assert payload["metrics"]["test"] == run.metrics["test"]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ktlib.runs, "fit", no_training)
    again = load_or_train(model_cfg, train_cfg, mosi, runs_dir=tmp_path, progress=False)
    assert again.metrics == run.metrics
    monkeypatch.undo()
    forced = load_or_train(model_cfg, train_cfg, mosi, runs_dir=tmp_path, force=True, progress=False)
    assert forced.metrics["test"] == run.metrics["test"]  # retrained, same seed, same numbers


def test_loaded_best_model_reproduces_its_test_metrics(mosi, tmp_path):
    model_cfg, train_cfg = _configs(mosi, "kt")
    run = load_or_train(model_cfg, train_cfg, mosi, runs_dir=tmp_path, progress=False)
    model = run.load_model()
    loss, metrics, _ = ktlib.train.evaluate(model, ktlib.data.make_loader(mosi, "test", 16, missing=("a",)),
                                            torch.device("cpu"))
    assert metrics["mae"] == pytest.approx(run.metrics["test"]["mae"], abs=1e-6)


def test_grid_summary_and_paper_comparison(mosi, tmp_path):
    tidy = grid(mosi, ["language_vision", "kt"], [1, 2], "smoke", runs_dir=tmp_path, progress=False)
    assert set(tidy["setting"]) == {"language_vision", "kt"} and set(tidy["seed"]) == {1, 2}
    summary = summarize(tidy)
    cell = summary[(summary.setting == "kt") & (summary.split == "test") & (summary.metric == "mae")]
    values = tidy[(tidy.setting == "kt") & (tidy.split == "test") & (tidy.metric == "mae")]["value"].to_numpy()
    assert cell["mean"].item() == pytest.approx(values.mean())
    assert cell["std"].item() == pytest.approx(values.std(ddof=1))  # sample std, the one convention (ktlib.stats)
    assert cell["n"].item() == 2
    table = compare_with_paper(summary)
    kt = table[table.setting == "kt"].iloc[0]
    assert kt["MAE (paper)"] == pytest.approx(0.858) and kt["Acc2 (paper)"] == pytest.approx(82.3)
    assert kt["data"] == "synthetic (simulator)"
    assert " ± " in kt["MAE"]


def test_grid_trains_each_run_once_in_worker_processes_and_reads_it_back(mosi, tmp_path):
    variants = {"L2": {}, "same as L2": {}, "L1": {"consistency": "l1"}}
    tidy = grid(mosi, ["kt"], [1], "smoke", variants=variants, runs_dir=tmp_path, progress=False, workers=2)
    folders = sorted(tmp_path.glob("[!.]*"))  # the run folders, not the store's .locks
    # two labels with the same configuration share one run; both kt runs take their target from one full run
    assert len(folders) == 3 and sum("-full-" in f.name for f in folders) == 1
    assert all((f / "metrics.json").is_file() and (f / "model.pt").is_file() for f in folders)
    assert set(tidy["variant"]) == set(variants) and set(tidy["setting"]) == {"kt"}
    stamps = {f: (f / "metrics.json").stat().st_mtime_ns for f in folders}
    again = grid(mosi, ["kt"], [1], "smoke", variants=variants, runs_dir=tmp_path, progress=False, workers=1)
    assert {f: (f / "metrics.json").stat().st_mtime_ns for f in folders} == stamps  # read back, not retrained
    pd.testing.assert_frame_equal(tidy, again)


def test_hand_made_summary():
    tidy = pd.DataFrame({"dataset": "mosi", "alignment": "aligned", "data": "real", "setting": "kt",
                         "variant": "default", "seed": [1, 2, 3], "split": "test", "metric": "mae",
                         "value": [0.8, 0.9, 1.0], "run": ["a", "b", "c"]})
    row = summarize(tidy).iloc[0]
    assert row["mean"] == pytest.approx(0.9)
    assert row["std"] == pytest.approx(0.1)  # sample std (ddof=1): sqrt(0.02 / 2)


def test_paper_table_holds_the_published_rows():
    table = paper_table("mosi", "aligned")
    kt = table[(table.method == "ours") & (table.setting == "kt")].iloc[0]
    assert (kt.Acc7, kt.Acc2, kt.F1, kt.MAE, kt.Corr) == (39.1, 82.3, 82.2, 0.858, 0.691)
    assert len(paper_table("iemocap", "unaligned")) == 7


def test_bad_training_options_fail_clearly():
    with pytest.raises(ValueError, match="schedule must be 'plateau' or 'constant'"):
        TrainConfig(schedule="cosine")
    with pytest.raises(ValueError, match="unknown profile 'fast'"):
        profile("fast")
    with pytest.raises(ValueError, match="lr must be a positive number"):
        TrainConfig(lr=float("nan"))


def test_cli_train_prints_metrics_and_reuses_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KTLIB_DATA_DIR", str(tmp_path / "data"))
    args = ["train", "--dataset", "mosi", "--setting", "kt", "--profile", "smoke", "--seed", "1",
            "--runs-dir", str(tmp_path / "runs"), "--quiet", "--scale", "0.03"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[synthetic (simulator)]" in out and "mae" in out and "acc2_non0" in out
    assert main(args) == 0  # second time: loaded from the store
    runs = sorted(p.name for p in (tmp_path / "runs").glob("[!.]*"))  # the run folders, not .locks
    assert len(runs) == 2 and "-full-" in runs[0] and "-kt-" in runs[1]  # kt's target comes from the full run
    assert main(["table", "--runs-dir", str(tmp_path / "runs")]) == 0
    table = capsys.readouterr().out
    assert "MAE (paper)" in table and "kt" in table


def test_cli_grid_prints_the_side_by_side_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KTLIB_DATA_DIR", str(tmp_path / "data"))
    assert main(["grid", "--settings", "language_vision", "kt", "--seeds", "1", "--profile", "smoke",
                 "--runs-dir", str(tmp_path / "runs"), "--quiet", "--scale", "0.03"]) == 0
    out = capsys.readouterr().out
    assert "mean ± std over seeds" in out and "Acc2 (paper)" in out and "language_vision" in out


def test_run_load_refuses_an_unfinished_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished run"):
        Run.load(tmp_path)


def test_cli_trains_on_the_real_utterance_level_mosi_file(mosi_fixture_path, tmp_path, capsys):
    assert main(["train", "--dataset", "mosi_utterance", "--source", "real", "--data-path",
                 str(mosi_fixture_path.parent), "--setting", "kt", "--profile", "smoke", "--quiet",
                 "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mosi_utterance-kt-seed1-" in out and "[real]" in out
    run = Run.load(next(tmp_path.glob("*-kt-*")))
    assert run.config["data"]["synthetic"] is False and run.config["data"]["file"] == mosi_fixture_path.name
    assert np.isfinite(run.metrics["test"]["mae"])


def test_the_utterance_level_file_has_no_simulated_twin():
    from ktlib.data import get_data

    with pytest.raises(ValueError, match="real file only"):
        get_data("mosi_utterance", source="simulated")


def test_kt_reads_its_target_from_the_full_run_of_the_same_seed(mosi, tmp_path):
    from ktlib.runs import plan, run_jobs

    jobs = plan(mosi, ["kt"], [1], "smoke")
    (source,) = jobs[0].needs
    assert source.model.setting == "full" and source.train.seed == 1
    assert jobs[0].train.target_run == run_id(source.model, source.train, mosi)
    assert plan(mosi, ["full"], [1], "smoke")[0].model == source.model  # the grid's own full run
    run_jobs(jobs, runs_dir=tmp_path, progress=False, workers=1)
    full = Run.load(tmp_path / jobs[0].train.target_run).load_model()
    kt = Run.load(tmp_path / run_id(jobs[0].model, jobs[0].train, mosi)).load_model()
    assert torch.equal(kt.proj["a"].conv.weight, full.proj["a"].conv.weight)  # the fixed target, as trained
    with pytest.raises(ValueError, match=r"kt_target='run'.*needs both train_cfg.target_run"):
        fit(jobs[0].model, replace(jobs[0].train, target_run=""), mosi, progress=False)


def test_audio_only_trains_on_the_audio_and_language_vision_never_reads_it(mosi, monkeypatch):
    seen = {}
    import ktlib.train as T

    real_loader = T.make_loader

    def spy(data, split, batch_size, **kwargs):
        loader = real_loader(data, split, batch_size, **kwargs)
        if split == "train":
            seen[split] = next(iter(loader))["present"][:, 1]
        return loader

    monkeypatch.setattr(T, "make_loader", spy)
    fit(*_configs(mosi, "audio_only", epochs=1), mosi, progress=False)
    assert seen["train"].all()
    fit(*_configs(mosi, "language_vision", epochs=1), mosi, progress=False)
    assert not seen["train"].any()
