"""The run store with several processes at once: a grid on a Dask cluster, a worker killed mid-run, two processes
on one run id, a job that fails, and the default install without Dask.

The Dask tests start a real ``LocalCluster`` (a scheduler and two single-threaded worker processes over TCP on
127.0.0.1) and skip, with the reason, where Dask is not installed (``pip install -e ".[cluster]"``).
"""

import multiprocessing as mp
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import pytest
import torch

import ktlib.runs as R
from ktlib.__main__ import main
from ktlib.pool import JobsFailed
from ktlib.runs import Run, grid, plan, run_id, train_pending
from ktlib.train import KILL_HOOK

SETTINGS, SEEDS = ["full", "kt"], [1, 2]  # kt's target is the full run of its seed: each kt run waits for one


def _smoke_grid(data, runs_dir, **where) -> pd.DataFrame:
    return grid(data, SETTINGS, SEEDS, "smoke", runs_dir=runs_dir, progress=False, **where)


def _forbid_training_here(monkeypatch):
    """Make sure the runs train in the workers: this process may read runs, never fit one."""
    def no_fit(*args, **kwargs):
        raise AssertionError("a run was trained in the test process, not in a worker")

    monkeypatch.setattr(R, "fit", no_fit)


@pytest.fixture(scope="module")
def reference(mosi, tmp_path_factory) -> pd.DataFrame:
    """The smoke grid trained in this process, one thread (as each worker has): what the workers must give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _smoke_grid(mosi, tmp_path_factory.mktemp("in-process"), workers=1)
    finally:
        torch.set_num_threads(threads)


def test_runs_trained_two_at_a_time_in_processes_give_the_metrics_of_runs_trained_one_by_one(mosi, reference,
                                                                                            tmp_path, monkeypatch):
    """Seeds trained together on one device (``KTLIB_RUNS_PER_DEVICE`` on a GPU; the CPU here) are the runs
    trained alone: each process seeds and trains its own run."""
    _forbid_training_here(monkeypatch)
    pd.testing.assert_frame_equal(_smoke_grid(mosi, tmp_path, workers=2), reference)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Dask LocalCluster: two worker processes, one thread each, over TCP; ``cluster.armed`` is the file that
    arms the kill hook of its workers (:data:`ktlib.train.KILL_HOOK`)."""
    distributed = pytest.importorskip("distributed", reason="the cluster tests need Dask: pip install -e '.[cluster]'")
    armed = tmp_path_factory.mktemp("hook") / "kill-once"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, protocol="tcp",
                                  host="127.0.0.1", dashboard_address=None, env={KILL_HOOK: str(armed)}) as c:
        c.armed = armed
        yield c


def test_a_grid_on_a_dask_cluster_gives_the_metrics_of_the_grid_in_process(mosi, reference, cluster, tmp_path,
                                                                           monkeypatch):
    _forbid_training_here(monkeypatch)
    on_cluster = _smoke_grid(mosi, tmp_path, scheduler=cluster.scheduler_address)
    pd.testing.assert_frame_equal(on_cluster, reference)


def test_the_cli_grid_trains_on_the_cluster_given_with_scheduler(cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KTLIB_DATA_DIR", str(tmp_path / "data"))
    _forbid_training_here(monkeypatch)
    assert main(["grid", "--settings", "language_vision", "--seeds", "1", "--profile", "smoke", "--scale", "0.03",
                 "--runs-dir", str(tmp_path / "runs"), "--quiet", "--scheduler", cluster.scheduler_address]) == 0
    assert "language_vision" in capsys.readouterr().out
    assert len(list((tmp_path / "runs").glob("*/metrics.json"))) == 1


def _killed_run_resumed(armed: Path) -> Run:
    """The run whose worker the kill hook killed; it must have resumed from its first epoch's checkpoint."""
    killed = Path(str(armed) + ".killed")
    assert not armed.exists() and killed.exists(), "the kill hook did not fire"
    run = Run.load(killed.read_text())
    assert run.metrics["resumed_at"] == [1]  # went on from epoch 0's checkpoint, not from scratch
    return run


@pytest.mark.parametrize("where", ["processes", "dask"])
def test_a_worker_killed_mid_run_loses_no_run(mosi, reference, tmp_path, monkeypatch, request, where):
    armed = tmp_path / "kill-once"
    if where == "dask":
        cluster = request.getfixturevalue("cluster")
        armed, options = cluster.armed, {"scheduler": cluster.scheduler_address}
    else:
        monkeypatch.setenv(KILL_HOOK, str(armed))  # the spawned workers inherit it
        options = {"workers": 2}
    _forbid_training_here(monkeypatch)
    armed.touch()  # the first worker to write a checkpoint SIGKILLs itself, once
    tidy = _smoke_grid(mosi, tmp_path / "runs", **options)
    run = _killed_run_resumed(armed)
    assert run.dir.parent == (tmp_path / "runs").resolve()
    pd.testing.assert_frame_equal(tidy, reference)  # the killed run's metrics too: as if never interrupted


def _train_counting(recipe, model: dict, train: dict, store: str, count: str, barrier, results) -> None:
    """In a fresh process: load_or_train, counting the fits in ``count`` (one line each); the first fit holds the
    run's lock a second longer, so the other process surely asks for it meanwhile."""
    import time

    from ktlib.data import from_recipe
    from ktlib.model import ModelConfig
    from ktlib.train import TrainConfig

    fit = R.fit

    def counted(*args, **kwargs):
        with open(count, "a") as f:
            f.write("fit\n")
        time.sleep(1.0)
        return fit(*args, **kwargs)

    R.fit = counted
    data = from_recipe(recipe)
    barrier.wait()  # both processes ask for the run at the same time
    run = R.load_or_train(ModelConfig.from_dict(model), TrainConfig(**train), data, store, progress=False)
    results.put((run.id, run.metrics["test"]))


def test_two_processes_on_one_run_id_train_it_once_and_both_read_it(mosi, tmp_path):
    job = plan(mosi, ["language_vision"], [3], "smoke")[0]
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    count = tmp_path / "fits.txt"
    args = (mosi.recipe(), job.model.to_dict(), asdict(job.train), str(tmp_path / "runs"), str(count), barrier,
            results)
    procs = [ctx.Process(target=_train_counting, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert count.read_text().splitlines() == ["fit"]  # trained once
    assert got[0] == got[1] and got[0][0] == run_id(job.model, job.train, mosi)  # both have its result


@pytest.mark.parametrize("where", ["processes", "dask"])
def test_a_failing_job_is_named_with_its_error_and_the_others_finish(mosi, tmp_path, monkeypatch, request, where):
    jobs = plan(mosi, ["kt"], [1, 2], "smoke")  # two full runs, then two kt runs that use them
    broken = plan(mosi, ["kt"], [3], "smoke")[0]
    missing = "mosi_aligned-full-seed3-0000000000"
    broken.train, broken.needs = replace(broken.train, target_run=missing), []  # its target run does not exist
    options = ({"scheduler": request.getfixturevalue("cluster").scheduler_address} if where == "dask"
               else {"workers": 2})
    _forbid_training_here(monkeypatch)
    with pytest.raises(JobsFailed) as caught:
        train_pending([*jobs, broken], tmp_path, progress=False, **options)
    assert len(caught.value.failures) == 1
    message = str(caught.value)
    broken_id = run_id(broken.model, broken.train, mosi)
    assert f"run {broken_id} (kt, variant 'default', seed 3; smoke profile, target_run=mosi_aligned-full," in message
    assert f"FileNotFoundError: the run {missing} (audio_source) is not finished" in message
    for job in [*jobs, *jobs[0].needs, *jobs[1].needs]:  # every other run finished
        assert (tmp_path / run_id(job.model, job.train, mosi) / "metrics.json").is_file()


NO_DASK = """
import sys

from ktlib.pool import in_pool

if __name__ == "__main__":  # not in the spawned workers, which import this file again
    sys.modules["distributed"] = sys.modules["dask"] = None  # as if not installed: importing them fails
    import ktlib.__main__, ktlib.experiments, ktlib.runs  # noqa: F401
    assert in_pool(len, [(1,), (2,)], 2, "jobs", progress=False)  # the local pool
    try:
        in_pool(len, [(1,)], 1, "jobs", progress=False, scheduler="tcp://127.0.0.1:1")
    except ImportError as err:
        assert ".[cluster]" in str(err), err
    else:
        raise AssertionError("a scheduler without Dask should say how to install it")
    print("ok")
"""


def test_the_default_install_needs_no_dask(tmp_path):
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    script = tmp_path / "no_dask.py"  # a file, not -c: spawned workers re-read the main module's path
    script.write_text(NO_DASK)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
