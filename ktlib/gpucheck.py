"""``make gpu-check``: the workbook's GPU path checked and measured once, in about 8 minutes on one H100/H200.

``python -m ktlib.gpucheck`` runs four parts and prints each figure as it comes; ``--out FILE`` also writes them
as JSON, rewritten after every part (``"complete": false`` until the last one is done), so that a check cut short
by a machine's time limit keeps the parts it finished:

1. the CUDA tests (``tests/test_cuda.py``: every setting's forward on CUDA equals the CPU's; a run trained on CUDA
   reads back on the CPU);
2. ``make bench``'s training steps on the device (ms per step, peak memory);
3. runs per device: ``k`` processes, each timing training steps of the paper's MOSI aligned kt model at once, for
   each ``k`` in ``--per-device``; the ``k`` with the most steps per second trains part 4 (and is the value to give
   ``KTLIB_RUNS_PER_DEVICE``);
4. Table I on simulated MOSI aligned: the five settings x five seeds with the ``paper`` profile, timed end to end
   (the simulation is timed apart).  Part 4 stops at ``--budget`` seconds; then the runs finished so far give the
   rate and the whole table's time is extrapolated from it, and the report says so.

``--dry`` runs the same four parts on the CPU at toy sizes (``smoke`` profile, one seed, tiny steps) in about a
minute, so that a test keeps the script from rotting on machines without a GPU.

The check needs only torch (a CUDA build), numpy, pandas, tqdm, filelock and pytest, not the notebook packages: on
a machine without network whose ``python3`` already has them, ``make gpu-check PY=python3 STAMP=`` runs it without
setting up ``.venv``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TABLE_I = ("vision_only", "language_only", "language_vision", "full", "kt")  # the paper's Table I rows
FULL = dict(profile="paper", seeds=(1, 2, 3, 4, 5), scale=1.0, case="paper-aligned", steps=30, warmup=5,
            per_device=(1, 2, 4, 8), probe_steps=40, budget=240.0, bench_cases=("quick", "paper-aligned",
                                                                                 "paper-unaligned"))
DRY = dict(profile="smoke", seeds=(1,), scale=0.03, case="quick", steps=2, warmup=1, per_device=(1, 2),
           probe_steps=2, budget=300.0, bench_cases=("quick",))


def say(*parts) -> None:
    print(*parts, flush=True)


def device_info(dry: bool) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "dry": dry}
    if torch.cuda.is_available() and not dry:
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, devices=torch.cuda.device_count(), memory_gb=round(props.total_memory / 2**30))
    else:
        info.update(device=f"CPU ({os.cpu_count()} cores)", devices=0)
    return info


def cuda_tests() -> dict:
    """``pytest tests/test_cuda.py`` in a subprocess: its summary line and exit status (they skip without CUDA)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "test_cuda.py")], cwd=ROOT, capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    if proc.returncode not in (0, 5):
        say(proc.stdout[-4000:], proc.stderr[-2000:])
    return {"returncode": proc.returncode, "summary": summary, "seconds": time.perf_counter() - t0}


def bench_steps(cases, steps: int, warmup: int, device: str) -> list[dict]:
    from .bench import measure_step, run_isolated

    return [run_isolated(measure_step, case, steps, warmup, device) for case in cases]


def _probe_worker(case: str, steps: int, warmup: int, device: str, barrier, queue) -> None:
    """One of ``k`` processes: warm up, wait for the others, time ``steps`` training steps together."""
    import torch

    from .bench import _time, kt_step

    torch.set_num_threads(1)
    step, dev = kt_step(case, device)
    started = []

    def ready():
        barrier.wait()
        started.append(time.time())

    _, peak = _time(step, steps, warmup, dev, ready=ready)
    queue.put({"start": started[0], "end": time.time(), "peak_mb": peak})


def runs_per_device(case: str, ks, steps: int, warmup: int, device: str) -> list[dict]:
    """Steps per second of ``k`` processes training at once (all timing the same span), for each ``k``."""
    ctx = mp.get_context("spawn")
    rows = []
    for k in ks:
        barrier, queue = ctx.Barrier(k), ctx.Queue()
        procs = [ctx.Process(target=_probe_worker, args=(case, steps, warmup, device, barrier, queue))
                 for _ in range(k)]
        for p in procs:
            p.start()
        got = [queue.get(timeout=900) for _ in procs]
        for p in procs:
            p.join()
        span = max(g["end"] for g in got) - min(g["start"] for g in got)
        rows.append({"k": k, "steps_per_s": k * steps / span, "ms_per_step_each": 1000 * span / steps,
                     "peak_mb_each": max(g["peak_mb"] for g in got)})
        say(f"  {k} per device: {rows[-1]['steps_per_s']:7.1f} steps/s in all, "
            f"{rows[-1]['ms_per_step_each']:7.1f} ms per step each, peak {rows[-1]['peak_mb_each']:.0f} MB each")
    return rows


def extrapolate(finished: int, total: int, seconds: float) -> float:
    """The whole table's seconds from ``finished`` of ``total`` runs done in ``seconds`` (the same rate on)."""
    if finished <= 0:
        raise ValueError("no run finished within the budget: nothing to extrapolate from; give a larger --budget")
    return seconds * total / finished


def _finished(runs_dir: Path) -> int:
    return len(list(runs_dir.glob("*/metrics.json")))


def table_one(profile: str, seeds, scale: float, workers: int, budget: float, device: str, runs_dir: Path) -> dict:
    """Table I (``TABLE_I`` x ``seeds``, MOSI aligned simulated) through ``python -m ktlib grid``, timed, stopped at
    ``budget`` seconds.  Returns the wall time, runs finished, and the whole table's time (measured or
    extrapolated)."""
    common = ["--dataset", "mosi", "--alignment", "aligned", "--source", "simulated", "--scale", str(scale)]
    t0 = time.perf_counter()  # the simulation (cached under data/sim) first, timed apart
    subprocess.run([sys.executable, "-m", "ktlib", "data", *common], cwd=ROOT, check=True, capture_output=True)
    data_s = time.perf_counter() - t0
    total = len(TABLE_I) * len(seeds)
    cmd = [sys.executable, "-m", "ktlib", "grid", *common, "--profile", profile, "--settings", *TABLE_I,
           "--seeds", *map(str, seeds), "--workers", str(workers), "--device", device, "--runs-dir", str(runs_dir),
           "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        out, _ = proc.communicate(timeout=budget)
        complete = proc.returncode == 0
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the grid and its worker processes
        out, _ = proc.communicate()
        complete = False
    wall = time.perf_counter() - t0
    done = _finished(runs_dir)
    if not complete and done == total:
        complete = True
    if proc.returncode not in (0, None, -signal.SIGKILL) and done < total:
        say(out[-4000:])
    table_s = wall if complete else extrapolate(done, total, wall)
    return {"runs": total, "finished": done, "wall_s": wall, "table_s": table_s, "extrapolated": not complete,
            "data_s": data_s, "workers": workers, "profile": profile, "seeds": list(seeds), "scale": scale}


def save(report: dict, out: Path | None) -> None:
    """Write ``report`` to ``out`` as JSON (nothing without ``out``), whole or not at all
    (:func:`ktlib.data.atomic_write`), so that a check stopped while writing leaves the previous report."""
    if out is None:
        return
    from .data import atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: f.write(json.dumps(report, indent=1, default=str).encode()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ktlib.gpucheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="on the CPU at toy sizes (CI): the script, not figures")
    parser.add_argument("--budget", type=float, default=None, help="seconds for part 4 before it extrapolates")
    parser.add_argument("--out", type=Path, default=None, help="also write every figure to this JSON file")
    parser.add_argument("--per-device", type=int, nargs="+", default=None, metavar="K",
                        help="process counts part 3 tries (default: 1 2 4 8; --dry: 1 2)")
    parser.add_argument("--runs-dir", type=Path, default=None, help="run store for part 4 (default: a fresh "
                        "temporary folder, so that nothing is read back instead of trained)")
    args = parser.parse_args(argv)
    if args.budget is not None and args.budget <= 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
    if args.per_device is not None and min(args.per_device) < 1:
        parser.error(f"--per-device takes process counts of 1 or more, got {args.per_device}")

    import torch

    if not args.dry and not torch.cuda.is_available():
        parser.error("no CUDA device here: make gpu-check measures a GPU (use --dry to exercise it on the CPU)")
    p = DRY if args.dry else FULL
    device = "cpu" if args.dry else "cuda"
    budget = args.budget or p["budget"]
    ks = tuple(args.per_device or p["per_device"])
    report = {"device": device_info(args.dry), "complete": False}
    say(f"gpu-check on {report['device']['device']}, torch {report['device']['torch']}"
        + (" (dry: CPU, toy sizes; the figures mean nothing)" if args.dry else ""))
    started = time.perf_counter()

    def done(part: str) -> None:  # each part's figures reach --out as soon as the part is over
        report.setdefault("elapsed_s", {})[part] = time.perf_counter() - started
        save(report, args.out)

    say("1. CUDA tests")
    report["tests"] = cuda_tests()
    say(f"  {report['tests']['summary']} ({report['tests']['seconds']:.0f} s)")
    done("tests")

    say("2. training steps (make bench)")
    report["bench"] = bench_steps(p["bench_cases"], p["steps"], p["warmup"], device)
    for r in report["bench"]:
        say(f"  {r['case']:16s} {r['ms']:8.1f} ms/step   peak {r['peak_mb']:8.1f} MB")
    done("bench")

    say(f"3. runs per device ({p['case']} kt step, {p['probe_steps']} steps each)")
    report["per_device"] = runs_per_device(p["case"], ks, p["probe_steps"], p["warmup"], device)
    best = max(report["per_device"], key=lambda r: r["steps_per_s"])["k"]
    report["best_per_device"] = best
    say(f"  most throughput: {best} per device (KTLIB_RUNS_PER_DEVICE={best})")
    done("per_device")

    say(f"4. Table I, simulated MOSI aligned, {len(TABLE_I)} settings x {len(p['seeds'])} seeds, {p['profile']} "
        f"profile, {best} at a time (budget {budget:.0f} s)")
    with tempfile.TemporaryDirectory(prefix="gpucheck-runs-") as tmp:
        runs_dir = args.runs_dir or Path(tmp)
        report["table_one"] = table_one(p["profile"], p["seeds"], p["scale"], best, budget, device, runs_dir)
    t = report["table_one"]
    say(f"  simulation {t['data_s']:.0f} s; {t['finished']}/{t['runs']} runs in {t['wall_s']:.0f} s; whole table "
        f"{t['table_s']:.0f} s" + (" (extrapolated from the runs finished)" if t["extrapolated"] else " (measured)"))
    report["complete"] = True
    done("table_one")
    if args.out:
        say(f"figures written to {args.out}")
    failed = report["tests"]["returncode"] not in (0, 5)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
