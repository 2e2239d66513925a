"""The announcement before a long grid on a CPU: the estimate's arithmetic on a hand-made case, when it warns, and
that the timed step is fit's real step (run once, its figure never asserted)."""

import math
import warnings

import pytest

from ktlib.bench import step_seconds
from ktlib.runs import LONG_GRID_S, SlowGridWarning, estimate_training, plan, training_steps, warn_if_long


def _jobs(mosi, settings=("language_vision", "kt"), seeds=(1, 2), epochs=3):
    return plan(mosi, list(settings), list(seeds), "smoke", train={"epochs": epochs, "device": "cpu"})


def test_training_steps_count_epochs_times_batches(mosi):
    jobs = _jobs(mosi)
    per_run = 3 * math.ceil(len(mosi["train"]) / jobs[0].train.batch_size)
    assert training_steps(jobs) == per_run * len(jobs)


def test_estimate_is_steps_times_the_timed_step_over_the_workers(mosi):
    jobs = _jobs(mosi)
    timed = []

    def fake(model_cfg, train_cfg):
        timed.append(model_cfg.setting)
        return 0.5

    est = estimate_training(jobs, workers=2, step_seconds=fake)
    assert timed == ["kt"]  # the costliest-looking setting is the one timed
    assert est["runs"] == 4 and est["workers"] == 2
    assert est["seconds"] == pytest.approx(0.5 * training_steps(jobs) / 2)


def test_a_grid_longer_than_the_limit_is_announced_with_hours_and_advice(mosi):
    jobs = _jobs(mosi, epochs=1000)  # enough steps to be estimated at all
    assert training_steps(jobs) > 1000
    step = 1.01 * 2 * LONG_GRID_S / training_steps(jobs)  # just over the limit with 2 workers
    with pytest.warns(SlowGridWarning, match=r"about 1\.0 hours .*GPU.*quick"):
        est = warn_if_long(jobs, workers=2, step_seconds=lambda m, t: step)
    assert est["seconds"] > LONG_GRID_S


def test_short_grids_and_cluster_grids_are_not_timed(mosi):
    def fail(model_cfg, train_cfg):
        raise AssertionError("a short grid must not be timed")

    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowGridWarning)
        assert warn_if_long(_jobs(mosi), workers=2, step_seconds=fail) is None  # a few hundred steps
        assert warn_if_long(_jobs(mosi, epochs=1000), workers=2, scheduler="tcp://x:8786", step_seconds=fail) is None
        est = warn_if_long(_jobs(mosi, epochs=1000), workers=2, step_seconds=lambda m, t: 1e-6)
    assert est is not None and est["seconds"] < LONG_GRID_S  # estimated, under the limit: no warning


def test_the_timed_step_is_a_real_training_step(mosi):
    job = _jobs(mosi, settings=("kt",), seeds=(1,))[-1]
    assert job.model.setting == "kt" and job.model.target_from_run
    sec = step_seconds(job.model, job.train, steps=1, warmup=0, device="cpu")
    assert math.isfinite(sec) and sec > 0
