"""The local pool's order: a job starts once the jobs it needs have finished, without waiting for a whole round,
and a job whose needed job failed is not run.

The jobs here write what they do to a log file and wait for each other through files, so that a wrong order fails
(a timeout names what never came), never hangs.
"""

import time
from pathlib import Path

import pytest

from ktlib.pool import JobsFailed, NeededJobFailed, in_pool

WAIT_S = 60.0


def _job(job: tuple) -> None:
    """In a worker process: log the start, create the file ``make`` if named, wait for the file ``wait_for`` if
    named (and half a second more), raise if asked, log the end."""
    folder, name, wait_for, make, fail, _threads = job
    folder = Path(folder)
    with open(folder / "log.txt", "a") as log:
        log.write(f"{name} start\n")
    if make:
        (folder / make).touch()
    if wait_for:
        deadline = time.monotonic() + WAIT_S
        while not (folder / wait_for).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: {wait_for} never came")
            time.sleep(0.05)
        time.sleep(0.5)  # were the order not kept, a job started too early would show in the log meanwhile
    if fail:
        raise RuntimeError(f"{name} fails on purpose")
    with open(folder / "log.txt", "a") as log:
        log.write(f"{name} end\n")


def _log(folder: Path) -> list[str]:
    return (folder / "log.txt").read_text().splitlines()


def test_a_job_starts_as_soon_as_what_it_needs_is_done_while_the_others_still_run(tmp_path):
    # Three workers.  "a" ends only once "slow" has started; "slow" ends only once "after_a" has started;
    # "after_a" needs "a".  So after_a must wait for a (else it would start at once, a free worker being there),
    # and must not wait for slow, a job it does not need (a pool that ran the jobs without needs as a first round
    # would never start after_a, and slow would time out).
    jobs = [(str(tmp_path), "a", "slow_is_up", "", False), (str(tmp_path), "slow", "from_after_a", "slow_is_up", False),
            (str(tmp_path), "after_a", "", "from_after_a", False)]
    assert in_pool(_job, jobs, 3, "jobs", progress=False, names=["a", "slow", "after_a"], after=[[], [], [0]])
    log = _log(tmp_path)
    assert sorted(log) == sorted(f"{n} {e}" for n in ("a", "slow", "after_a") for e in ("start", "end"))
    assert log.index("a end") < log.index("after_a start") < log.index("slow end")


def test_a_job_whose_needed_job_failed_is_not_run_and_the_others_finish(tmp_path):
    jobs = [(str(tmp_path), "broken", "", "", True), (str(tmp_path), "needs_broken", "", "", False),
            (str(tmp_path), "other", "", "", False)]
    with pytest.raises(JobsFailed) as caught:
        in_pool(_job, jobs, 2, "jobs", progress=False, names=["broken", "needs_broken", "other"],
                after=[[], [0], []])
    failed = dict(caught.value.failures)
    assert set(failed) == {"broken", "needs_broken"}
    assert isinstance(failed["needs_broken"], NeededJobFailed)
    assert str(failed["needs_broken"]) == "not run: it needs broken, which failed"
    log = _log(tmp_path)
    assert "needs_broken start" not in log and "other end" in log


@pytest.mark.parametrize("after, problem", [
    ([[1], [0]], "after has a cycle: jobs a, b each wait for another of them"),
    ([[0], []], "after[0] = [0]: each entry must be the index of another job, 0 to 1"),
    ([[2], []], "after[0] = [2]: each entry must be the index of another job, 0 to 1"),
    ([[]], "after has 1 entries for 2 jobs: give one list of indices per job"),
])
def test_an_impossible_order_is_refused_before_anything_runs(tmp_path, after, problem):
    jobs = [(str(tmp_path), "a", "", "", False), (str(tmp_path), "b", "", "", False)]
    with pytest.raises(ValueError) as caught:
        in_pool(_job, jobs, 2, "jobs", progress=False, names=["a", "b"], after=after)
    assert str(caught.value) == problem
    assert not (tmp_path / "log.txt").exists()
