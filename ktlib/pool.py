"""Where a list of jobs runs: spawned processes on this machine (the default) or a Dask cluster.

:func:`in_pool` calls ``fn((*arg, threads))`` for every arg and shows a progress bar over the finished jobs.  A job
may need others (``after``): it starts as soon as they have finished, in the same pool.  Every job runs even when
some fail (but not one whose needed job failed); then :class:`JobsFailed` names each failed job and its error.  A
job must be safe to run again (the run store's are: a finished run is read back, an unfinished one resumes from its
checkpoint), because a job whose worker dies is given to another one:

- local processes: a worker that dies (killed, out of memory) breaks the whole pool, so the jobs not finished yet
  go to a fresh pool, up to :data:`RETRIES` times;
- Dask: the scheduler gives the task of a lost worker to another worker (``distributed.scheduler.allowed-failures``,
  3 by default).

Dask (the ``distributed`` package, ``pip install -e ".[cluster]"``) is imported only when a scheduler is named.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

RETRIES = 3  # fresh local pools after a worker died, as many as Dask's default allowed-failures
_ONE_JOB = threading.Lock()


class JobsFailed(RuntimeError):
    """Some jobs raised; the others finished.  ``failures``: (name of the job, its error) pairs."""

    def __init__(self, failures: list[tuple[str, BaseException]]):
        self.failures = failures
        lines = [f"  {name}: {type(err).__name__}: {err}" for name, err in failures]
        super().__init__(f"{len(failures)} job(s) failed (the others finished):\n" + "\n".join(lines))


@contextmanager
def one_job(threads: int | None):
    """Run a job alone in this worker process, with ``threads`` torch threads (None: as the process has them).

    fit seeds torch's process-wide random generator, and the thread count is process-wide too: so a Dask worker
    given several threads still runs one job at a time (start more worker processes for more jobs at once).
    """
    import torch

    with _ONE_JOB:
        if threads:
            torch.set_num_threads(threads)
        yield


def in_pool(fn, args: list[tuple], workers: int, what: str, progress: bool = True, scheduler: str | None = None,
            names: list[str] | None = None, after: list | None = None) -> bool:
    """``fn((*arg, threads))`` for each arg: on the Dask cluster at ``scheduler`` (``threads`` None: the worker's
    environment decides, one thread under Dask's nanny), else in ``workers`` spawned processes sharing the CPU
    threads.  Locally, False (and nothing done) when there are fewer than two args or workers.

    ``after[i]``: the indices of the jobs that must have finished, without error, before job ``i`` starts (e.g.
    the run whose audio projection a kt run distils).  One pool serves them all: a job starts as soon as what it
    needs is done, while other jobs keep the workers busy, instead of waiting for a whole first round.  Among the
    jobs that may start, the earliest in ``args`` goes first, so list the longest (and the most needed) first.  A
    job whose needed job failed is not run: it fails with :class:`NeededJobFailed`.

    ``names[i]`` names ``args[i]`` in the :class:`JobsFailed` raised, once every job has run, if any failed.
    """
    if scheduler is None and (workers < 2 or len(args) < 2):
        return False
    if not args:  # nothing to send: no need to reach the cluster
        return True
    from tqdm.auto import tqdm

    names = names or [repr(a) for a in args]
    order = _Order(after, names)
    where = f"cluster {scheduler}" if scheduler else f"{min(workers, len(args))} workers"
    finished = _on_dask(fn, args, scheduler, order) if scheduler else _on_processes(fn, args, workers, order)
    failures = []
    for i, err in tqdm(finished, total=len(args), desc=f"{len(args)} {what}, {where}", disable=not progress,
                       leave=False):
        if err is not None:
            failures.append((names[i], err))
    if failures:
        raise JobsFailed(failures) from failures[0][1]
    return True


class NeededJobFailed(RuntimeError):
    """A job was not run because a job it needs failed."""


class _Order:
    """Which jobs may start: those whose needed jobs (``after``) have all finished without error, earliest first.

    ``start(k)`` takes up to ``k`` of them off the waiting list; ``end(i, ok)`` records how job ``i`` ended;
    ``put_back(i)`` returns a started job to the list (its worker died); ``cancelled()`` takes off, as failed, the
    waiting jobs that need a failed one (and those that need them).
    """

    def __init__(self, after: list | None, names: list[str]):
        n = len(names)
        self.needs = [set(a) for a in after] if after is not None else [set() for _ in range(n)]
        self.names = names
        if len(self.needs) != n:
            raise ValueError(f"after has {len(self.needs)} entries for {n} jobs: give one list of indices per job")
        for i, needs in enumerate(self.needs):
            if any(not isinstance(j, int) or not 0 <= j < n or j == i for j in needs):
                raise ValueError(f"after[{i}] = {sorted(needs, key=str)}: each entry must be the index of another "
                                 f"job, 0 to {n - 1}")
        self.waiting, self.ok, self.failed = list(range(n)), set(), set()
        done: set[int] = set()
        while len(done) < n:  # a job can start only if what it needs can: no cycle
            free = {i for i in range(n) if i not in done and self.needs[i] <= done}
            if not free:
                raise ValueError("after has a cycle: jobs " + ", ".join(sorted(names[i] for i in range(n)
                                                                                   if i not in done))
                                 + " each wait for another of them")
            done |= free

    def start(self, k: float) -> list[int]:
        chosen = [i for i in self.waiting if self.needs[i] <= self.ok]
        chosen = chosen[:max(0, int(k))] if k < len(chosen) else chosen
        taken = set(chosen)
        self.waiting = [i for i in self.waiting if i not in taken]
        return chosen

    def end(self, i: int, ok: bool) -> None:
        (self.ok if ok else self.failed).add(i)

    def put_back(self, i: int) -> None:
        self.waiting = sorted([*self.waiting, i])

    def cancelled(self) -> list[tuple[int, BaseException]]:
        out = []
        while True:
            hit = [i for i in self.waiting if self.needs[i] & self.failed]
            if not hit:
                return out
            for i in hit:
                self.waiting.remove(i)
                self.failed.add(i)
                lost = ", ".join(self.names[j] for j in sorted(self.needs[i] & self.failed))
                out.append((i, NeededJobFailed(f"not run: it needs {lost}, which failed")))

    def busy(self) -> bool:
        return bool(self.waiting)


def _drive(order: _Order, submit, wait_first, slots: float, broken=lambda err: False):
    """Start jobs as ``order`` allows, at most ``slots`` at a time (``submit(i)`` -> future); yield (index, error
    or None) as each ends (``wait_first(futures)``: those done, at least one).  A job whose error is ``broken``
    (its worker pool died) goes back to ``order`` and ends the drive: the caller starts a fresh pool."""
    running: dict = {}
    while True:
        yield from order.cancelled()
        for i in order.start(slots - len(running)):
            running[submit(i)] = i
        if not running:
            return
        for fut in wait_first(list(running)):
            i, err = running.pop(fut), fut.exception()
            if broken(err):
                order.put_back(i)
                for other in running.values():  # the pool is gone: they run again in the next one
                    order.put_back(other)
                return
            order.end(i, err is None)
            yield i, err


def _on_processes(fn, args: list[tuple], workers: int, order: _Order):
    """(index, error or None) of each job as it finishes in ``workers`` spawned processes."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    workers = min(workers, len(args))
    threads = max(1, (os.cpu_count() or 1) // workers)
    for attempt in range(RETRIES + 1):
        # spawn, not fork: a forked copy of a process that already runs torch threads can deadlock
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:

            def submit(i):
                try:
                    return pool.submit(fn, (*args[i], threads))
                except BrokenProcessPool as err:  # the pool broke since the last job ended: fail like its jobs
                    fut = Future()
                    fut.set_exception(err)
                    return fut

            # as many started as there are workers, so that a job that becomes ready goes next, not to the back
            # of a queue; a worker that dies breaks the pool: the jobs not finished (the one that died among them,
            # maybe others) go to a fresh pool, up to RETRIES times
            yield from _drive(order, submit, lambda fs: wait(fs, return_when=FIRST_COMPLETED)[0], workers,
                              lambda err, last=attempt == RETRIES: isinstance(err, BrokenProcessPool) and not last)
        if not order.busy():
            return


def _on_dask(fn, args: list[tuple], scheduler: str, order: _Order):
    """(index, error or None) of each job as it finishes on the Dask cluster at ``scheduler``."""
    try:
        from distributed import Client, wait
    except ImportError as err:
        raise ImportError(f"scheduler={scheduler!r} needs Dask: pip install -e \".[cluster]\" (the distributed "
                          "package) here and on every worker") from err
    with Client(scheduler) as client:  # closing the client leaves the cluster running
        # pure=False: a job is an action on the shared run store, never a cached value; every job that may start
        # is sent (the scheduler gives the earlier ones priority); a lost worker's task goes to another worker
        yield from _drive(order, lambda i: client.submit(fn, (*args[i], None), pure=False, priority=-i),
                          lambda fs: wait(fs, return_when="FIRST_COMPLETED").done, float("inf"))
