"""``make gpu-check`` in its dry mode (CPU, toy sizes), so that the script cannot rot on machines without a GPU;
the figures it prints there mean nothing and are not asserted, only that every part ran and reported."""

import json

import pytest
import torch

from ktlib import gpucheck
from ktlib.runs import default_workers


@pytest.fixture(scope="module")
def dry_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpucheck") / "report.json"
    with pytest.MonkeyPatch.context() as mp:  # the simulation goes to a private cache, not the project's data/sim
        mp.setenv("KTLIB_DATA_DIR", str(tmp_path_factory.mktemp("gpucheck-data")))
        assert gpucheck.main(["--dry", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_dry_run_reports_every_part(dry_report):
    r = dry_report
    assert r["device"]["dry"] is True and r["device"]["devices"] == 0
    assert r["tests"]["returncode"] in (0, 5) and ("skipped" in r["tests"]["summary"] or "passed" in
                                                   r["tests"]["summary"])
    assert [b["case"] for b in r["bench"]] == list(gpucheck.DRY["bench_cases"])
    assert all(b["ms"] > 0 for b in r["bench"])
    assert [row["k"] for row in r["per_device"]] == list(gpucheck.DRY["per_device"])
    assert r["best_per_device"] == max(r["per_device"], key=lambda row: row["steps_per_s"])["k"]


def test_dry_table_one_trains_every_setting_and_seed(dry_report):
    t = dry_report["table_one"]
    assert t["runs"] == len(gpucheck.TABLE_I) * len(gpucheck.DRY["seeds"]) == t["finished"]
    assert t["extrapolated"] is False and t["table_s"] == t["wall_s"] > 0


def test_extrapolation_is_the_rate_of_the_finished_runs():
    assert gpucheck.extrapolate(5, 25, 60.0) == 300.0
    with pytest.raises(ValueError, match="no run finished.*--budget"):
        gpucheck.extrapolate(0, 25, 60.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the full check would run")
def test_without_a_gpu_the_full_check_refuses_and_names_dry(capsys):
    with pytest.raises(SystemExit) as stop:
        gpucheck.main([])
    assert stop.value.code == 2 and "--dry" in capsys.readouterr().err


def test_runs_per_device_setting_is_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("KTLIB_RUNS_PER_DEVICE", "4")
    assert default_workers() == 4
    monkeypatch.setenv("KTLIB_RUNS_PER_DEVICE", "zero")
    with pytest.raises(ValueError, match="KTLIB_RUNS_PER_DEVICE must be a whole number"):
        default_workers()


def test_a_check_cut_short_keeps_the_parts_it_finished(tmp_path, monkeypatch):
    """--out is rewritten after every part: when part 3 dies, parts 1 and 2 are on disk, marked incomplete."""
    monkeypatch.setattr(gpucheck, "cuda_tests", lambda: {"returncode": 0, "summary": "3 passed", "seconds": 1.0})
    monkeypatch.setattr(gpucheck, "bench_steps", lambda cases, *a: [{"case": c, "ms": 2.0, "peak_mb": 1.0}
                                                                     for c in cases])

    def probe_dies(*args):
        raise RuntimeError("probe process killed")

    monkeypatch.setattr(gpucheck, "runs_per_device", probe_dies)
    out = tmp_path / "report.json"
    with pytest.raises(RuntimeError, match="probe process killed"):
        gpucheck.main(["--dry", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["complete"] is False
    assert report["tests"]["summary"] == "3 passed"
    assert [b["case"] for b in report["bench"]] == list(gpucheck.DRY["bench_cases"])
    assert "per_device" not in report and "table_one" not in report
    assert list(report["elapsed_s"]) == ["tests", "bench"]
    assert [f.name for f in tmp_path.iterdir()] == ["report.json"]  # no temporary file left


@pytest.mark.parametrize("args, message", [
    (["--budget", "0"], "--budget must be a positive number of seconds, got 0.0"),
    (["--budget", "-5"], "--budget must be a positive number of seconds, got -5.0"),
    (["--per-device", "1", "0"], "--per-device takes process counts of 1 or more, got [1, 0]"),
])
def test_settings_out_of_range_are_refused(args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        gpucheck.main(["--dry", *args])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_per_device_counts_reach_part_3(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(gpucheck, "cuda_tests", lambda: {"returncode": 0, "summary": "3 passed", "seconds": 1.0})
    monkeypatch.setattr(gpucheck, "bench_steps", lambda cases, *a: [])

    def probe(case, ks, *args):
        seen.append(ks)
        raise RuntimeError("stop after part 3")

    monkeypatch.setattr(gpucheck, "runs_per_device", probe)
    with pytest.raises(RuntimeError, match="stop after part 3"):
        gpucheck.main(["--dry", "--per-device", "3", "1"])
    assert seen == [(3, 1)]
