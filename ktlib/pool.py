"""Where a list of jobs runs: spawned processes on this machine (the default) or a Dask cluster.

:func:`in_pool` calls ``fn((*arg, threads))`` for every arg and shows a progress bar over the finished jobs.  Every
job runs even when some fail; then :class:`JobsFailed` names each failed job and its error.  A job must be safe to
run again (the run store's are: a finished run is read back, an unfinished one resumes from its checkpoint),
because a job whose worker dies is given to another one:

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
            names: list[str] | None = None) -> bool:
    """``fn((*arg, threads))`` for each arg: on the Dask cluster at ``scheduler`` (``threads`` None: the worker's
    environment decides, one thread under Dask's nanny), else in ``workers`` spawned processes sharing the CPU
    threads.  Locally, False (and nothing done) when there are fewer than two args or workers.

    ``names[i]`` names ``args[i]`` in the :class:`JobsFailed` raised, once every job has run, if any failed.
    """
    if scheduler is None and (workers < 2 or len(args) < 2):
        return False
    if not args:  # nothing to send: no need to reach the cluster
        return True
    from tqdm.auto import tqdm

    names = names or [repr(a) for a in args]
    where = f"cluster {scheduler}" if scheduler else f"{min(workers, len(args))} workers"
    finished = _on_dask(fn, args, scheduler) if scheduler else _on_processes(fn, args, workers)
    failures = []
    for i, err in tqdm(finished, total=len(args), desc=f"{len(args)} {what}, {where}", disable=not progress,
                       leave=False):
        if err is not None:
            failures.append((names[i], err))
    if failures:
        raise JobsFailed(failures) from failures[0][1]
    return True


def _on_processes(fn, args: list[tuple], workers: int):
    """(index, error or None) of each job as it finishes in ``workers`` spawned processes."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    workers = min(workers, len(args))
    threads = max(1, (os.cpu_count() or 1) // workers)
    todo = list(range(len(args)))
    for attempt in range(RETRIES + 1):
        broken = []
        # spawn, not fork: a forked copy of a process that already runs torch threads can deadlock
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(fn, (*args[i], threads)): i for i in todo}
            for fut in as_completed(futures):
                err = fut.exception()
                if isinstance(err, BrokenProcessPool) and attempt < RETRIES:
                    broken.append(futures[fut])  # a worker died: this job (maybe not the culprit) runs again
                else:
                    yield futures[fut], err
        if not broken:
            return
        todo = broken


def _on_dask(fn, args: list[tuple], scheduler: str):
    """(index, error or None) of each job as it finishes on the Dask cluster at ``scheduler``."""
    try:
        from distributed import Client, as_completed
    except ImportError as err:
        raise ImportError(f"scheduler={scheduler!r} needs Dask: pip install -e \".[cluster]\" (the distributed "
                          "package) here and on every worker") from err
    with Client(scheduler) as client:  # closing the client leaves the cluster running
        # pure=False: a job is an action on the shared run store, never a cached value
        futures = {client.submit(fn, (*a, None), pure=False): i for i, a in enumerate(args)}
        for fut in as_completed(futures):
            yield futures[fut], fut.exception()
