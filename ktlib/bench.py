"""Benchmark: time and peak memory of a training step, on CUDA when present and on the CPU otherwise.

``python -m ktlib.bench`` (``make bench``) times the training step of :func:`ktlib.train.fit` (forward pass, task and
consistency losses, backward pass, gradient clipping, optimiser step; ``skip_padding`` on, as ``fit`` calls the
model) of a ``kt`` model on synthetic MOSI-shaped batches, in four cases (``STEPS``):

- ``quick``:            the ``quick`` profile (d=16, one layer per stack), word-aligned shapes, batch 48;
- ``paper-aligned``:    the paper's MOSI configuration (d=40, 4 layers, 10 heads, every dropout on), aligned, batch 24;
- ``paper-unaligned``:  the same on unaligned shapes (l, a, v: 50, 375, 500 steps), batch 24;
- ``quick-words``:      ``quick`` on a batch shaped like the simulated MOSI utterances that ``make reproduce`` trains
                        on: word-aligned (one length per sample for every modality), about 12 of 50 steps real.

The first three draw each sequence's length between a third and all of its steps, independently per modality; the
last draws the simulator's word counts (log-normal durations, median 3.5 s and sigma 0.55, at 3 words per second
times a uniform 0.8-1.2), so that the padding a training pass leaves out shows in the time.

Each case runs in a fresh process: ms per step is the median of ``--steps`` steps after ``--warmup`` warm-up
steps; peak memory is CUDA's ``max_memory_allocated`` or, on the CPU, the growth of the process's peak resident set
from just before the first step.  On CUDA the step runs under bfloat16 autocast, as ``fit`` does, and the device
is synchronised before every clock reading.  Figures are printed, never asserted.

``--compare PATH`` times the same steps of another checkout of this project (say a git worktree of an older
commit) against this one: fresh processes alternate between the two trees (A B, then B A, ...), each importing
its own ``ktlib``, and the ratio PATH / this tree is taken round by round, so a machine whose speed drifts still
gives a fair ratio.

``--kernels``: one attention call and one dropout call (forward + backward) of the shapes above, through the
compiled CPU kernels of :mod:`ktlib.kernels` and through the PyTorch paths, paired in one process.

``--table``: time per batch of every setting with three attention paths (train and eval, batch 24, paper
configuration, aligned and unaligned; about 12 minutes on a 2-core CPU):

- ``reference``: explicit ``softmax(QK^T / sqrt(d_k)) V`` with dropout on the attention weights;
- ``fused``: PyTorch's ``scaled_dot_product_attention`` with the same dropout on the weights;
- ``fused+keydrop``: the fused kernel with attention dropout applied to whole keys per sample and head.

This file imports ``ktlib`` by absolute name inside its functions (never at the top), so that ``--compare`` can
run it against another tree's ``ktlib``; only names that ``ktlib`` has had since the first benchmark are used.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "reference": dict(attn_impl="reference", attn_dropout_on="weights"),
    "fused": dict(attn_impl="fused", attn_dropout_on="weights"),
    "fused+keydrop": dict(attn_impl="fused", attn_dropout_on="keys"),
}
STEPS = {  # case -> (training profile whose model settings are used, alignment, batch size)
    "quick": ("quick", "aligned", 48),
    "paper-aligned": ("paper", "aligned", 24),
    "paper-unaligned": ("paper", "unaligned", 24),
    "quick-words": ("quick", "aligned", 48),
}
WORD_LENGTHS = ("quick-words",)  # cases whose batch has the simulator's word counts (synthetic_batch's ``words``)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def synthetic_batch(cfg, batch_size: int, seed: int = 0, words: bool = False):
    """A front-padded batch with the config's shapes: each sequence's length drawn between a third and all of its
    steps, or with ``words`` (word-aligned shapes) one word count per sample for every modality, drawn as the
    simulator draws MOSI's (module docstring)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    batch = {}
    if words:
        duration = 3.5 * torch.exp(0.55 * torch.randn(batch_size, generator=g))  # seconds
        rate = 3.0 * (0.8 + 0.4 * torch.rand(batch_size, generator=g))  # words per second
        n_words = (duration * rate).round().long()
    for m in ("l", "a", "v"):
        t, d = cfg.seq_lens[m], cfg.feature_dims[m]
        if words:
            lengths = n_words.clamp(1, t)
        else:
            lengths = torch.randint(max(1, t // 3), t + 1, (batch_size,), generator=g)
        pad = torch.arange(t)[None, :] < (t - lengths)[:, None]  # (B, T) front padding
        batch[m] = torch.randn(batch_size, t, d, generator=g).masked_fill(pad[..., None], 0.0)
        batch[f"mask_{m}"] = pad
    batch["present"] = torch.ones(batch_size, 3, dtype=torch.bool)
    batch["y"] = torch.randn(batch_size, 1, generator=g)
    return batch


def _time(step, steps: int, warmup: int, device, ready=None) -> tuple[list[float], float]:
    """Seconds of each of ``steps`` calls of ``step`` after ``warmup`` untimed ones, and the peak memory (MB).
    ``ready()``, if given, is called between the warm-up and the timed calls (e.g. to wait for other processes).

    CUDA: synchronised before every clock reading, peak ``max_memory_allocated``; CPU: growth of the process's
    peak resident set from just before the first call.
    """
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    base = _rss_mb()
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if ready is not None:
        ready()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)
    return times, peak


def _mosi_config(alignment: str, **overrides):
    """The paper's MOSI configuration on ``alignment``'s shapes with ``overrides``, in this tree's ``ktlib``."""
    try:
        from ktlib.config import model_config
    except ImportError:  # trees before ktlib.config: a class method of ModelConfig
        from ktlib.model import ModelConfig

        model_config = ModelConfig.for_layout
    return model_config("mosi", alignment, **overrides)


def _profiles() -> dict:
    """This tree's training profiles (trees before ktlib.config kept them in ktlib.train)."""
    from ktlib import train

    profiles = getattr(train, "PROFILES", None)
    if profiles is None:
        from ktlib.config import PROFILES as profiles
    return profiles


def _load_audio_encoder(model, source) -> None:
    if hasattr(model, "load_audio_encoder"):  # trees before ktlib.model_extras: a method of the model
        model.load_audio_encoder(source)
    else:
        from ktlib.model_extras import load_audio_encoder

        load_audio_encoder(model, source)


def training_step(model_cfg, train_cfg, batch_size: int, device: str = "auto", words: bool = False):
    """``(step, device)``: one call of ``step()`` is ``fit``'s training step (forward, task and consistency losses,
    backward, clipping, the optimiser ``fit`` builds) of a fresh model of ``model_cfg`` on a synthetic batch.

    A kt model whose target comes from a finished run reads it here from a fresh ``full`` model's audio projection
    (or, for ``run_memory``, a fresh ``audio_only`` model): the same arithmetic as the real target.
    """
    import torch

    from ktlib import train
    from ktlib.model import KTModel

    dev = train.pick_device(device)
    torch.manual_seed(0)
    model = KTModel(model_cfg)
    if model_cfg.setting == "kt" and model_cfg.kt_target in ("run", "run_memory"):
        source = "audio_only" if model_cfg.kt_target == "run_memory" else "full"
        _load_audio_encoder(model, KTModel(type(model_cfg).from_dict({**model_cfg.to_dict(), "setting": source})))
    model = model.to(dev).train()
    # trees before the fused optimiser have no make_optimizer: their fit used plain Adam
    make_optimizer = getattr(train, "make_optimizer", lambda m, lr: torch.optim.Adam(m.parameters(), lr=lr))
    opt = make_optimizer(model, train_cfg.lr)
    batch = {k: v.to(dev) for k, v in synthetic_batch(model_cfg, batch_size, words=words).items()}
    # as fit calls it; trees before skip_padding computed every step
    skip = {"skip_padding": True} if "skip_padding" in inspect.signature(model.forward).parameters else {}
    try:  # the compiled kernels built or loaded now, so that no timed step (say, the estimate's) includes that
        from ktlib import kernels
    except ImportError:  # trees before them
        pass
    else:
        kernels.available()

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out, details = model(batch, return_details=True, **skip)
            loss = train.task_loss(out, batch["y"], model_cfg.task) + model.consistency_term(details)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.clip)
        opt.step()

    return step, dev


def step_seconds(model_cfg, train_cfg, steps: int = 1, warmup: int = 0, device: str = "auto") -> float:
    """Median seconds of ``steps`` training steps (:func:`training_step`, batch ``train_cfg.batch_size``) after
    ``warmup`` untimed ones, in this process with its current torch thread count."""
    step, dev = training_step(model_cfg, train_cfg, train_cfg.batch_size, device)
    return statistics.median(_time(step, steps, warmup, dev)[0])


def kt_step(case: str, device: str = "auto"):
    """:func:`training_step` of case ``case`` of ``STEPS``: a ``kt`` model of the case's profile whose consistency
    target is the audio projection of a fresh ``full`` model, at the case's batch size."""
    from ktlib import train

    profile, alignment, batch_size = STEPS[case]
    prof = _profiles()[profile]
    cfg = _mosi_config(alignment, setting="kt", **{**prof.model, "kt_target": "run"})
    return training_step(cfg, train.TrainConfig(**prof.train), batch_size, device, words=case in WORD_LENGTHS)


def measure_step(case: str, steps: int = 5, warmup: int = 2, device: str = "auto") -> dict:
    """ms per training step of case ``case`` of ``STEPS`` (:func:`kt_step`; median of ``steps`` after ``warmup``),
    peak memory.  Call it in a fresh process (:func:`run_isolated`) for the peak memory to be the step's own."""
    import torch

    step, dev = kt_step(case, device)
    times, peak = _time(step, steps, warmup, dev)
    return {"case": case, "device": str(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "ms": 1000 * statistics.median(times), "ms_all": [1000 * t for t in times], "peak_mb": peak,
            "batch_size": STEPS[case][2]}


def measure(alignment: str, setting: str, variant: str, batch_size: int, steps: int, device: str,
            mode: str) -> dict:
    """Seconds per ``mode`` (train | eval) step, median of ``steps`` after one warm-up; samples/s; peak memory.

    Peak memory: CUDA ``max_memory_allocated``; on the CPU the growth of the process's peak resident set from just
    before the warm-up, so call it in a fresh process (:func:`run_isolated`) for one mode at a time.
    """
    import torch

    from ktlib.model import KTModel
    from ktlib.train import pick_device, task_loss

    dev = pick_device(device)
    torch.manual_seed(0)
    cfg = _mosi_config(alignment, setting=setting, **VARIANTS[variant])
    model = KTModel(cfg).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = {k: v.to(dev) for k, v in synthetic_batch(cfg, batch_size).items()}

    def train_step():
        model.train()
        out, details = model(batch, return_details=True)
        loss = task_loss(out, batch["y"], cfg.task) + model.consistency_term(details)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def eval_step():
        model.eval()
        with torch.no_grad():
            model(batch)

    step = train_step if mode == "train" else eval_step  # one mode per process: its peak memory is its own
    times, peak = _time(step, steps, 1, dev)
    sec = statistics.median(times)
    return {"alignment": alignment, "setting": setting, "variant": variant, "device": str(dev), f"{mode}_s": sec,
            f"{mode}_samples_per_s": batch_size / sec, f"{mode}_peak_mb": peak}


def _child(fn, args, queue):
    queue.put(fn(*args))


def run_isolated(fn, *args) -> dict:
    """``fn(*args)`` in a fresh (spawned) process of this tree."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


# A fresh interpreter that runs this file's measure_step against the ktlib of its working directory.
_TREE_CHILD = ("import json, runpy, sys; "
               "print(json.dumps(runpy.run_path(sys.argv[1])['measure_step'](*json.loads(sys.argv[2]))))")


def measure_step_in(tree: Path, case: str, steps: int, warmup: int, device: str) -> dict:
    """:func:`measure_step` in a fresh process that imports the ``ktlib`` of checkout ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-c", _TREE_CHILD, __file__, json.dumps([case, steps, warmup, device])],
                          cwd=tree, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"timing {case} in {tree} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return dict(result, tree=str(tree))


def compare(other: Path, cases, rounds: int, steps: int, warmup: int, device: str) -> list[dict]:
    """Rounds of paired measurements, ``other`` vs this tree, alternating which goes first; one row per case."""
    here = Path(__file__).resolve().parent.parent
    rows = []
    for case in cases:
        pairs = []
        for r in range(rounds):
            if r % 2 == 0:
                o = measure_step_in(other, case, steps, warmup, device)
                h = measure_step_in(here, case, steps, warmup, device)
            else:
                h = measure_step_in(here, case, steps, warmup, device)
                o = measure_step_in(other, case, steps, warmup, device)
            pairs.append((o, h))
            print(f"  {case:16s} round {r + 1}: {other.name} {o['ms']:9.1f} ms   {here.name} {h['ms']:9.1f} ms   "
                  f"ratio {o['ms'] / h['ms']:5.2f}", flush=True)
        ratios = [o["ms"] / h["ms"] for o, h in pairs]
        row = {"case": case, "rounds": rounds, "ratio": statistics.median(ratios), "ratio_min": min(ratios),
               "ratio_max": max(ratios)}
        for i, who in enumerate(("other", "this")):  # each tree's median over rounds
            row.update({f"{who}_{key}": statistics.median(pair[i][key] for pair in pairs) for key in ("ms", "peak_mb")})
        rows.append(row)
    return rows


KERNEL_CASES = [  # (what, B, H, T, S, d_k, dropout on the weights, causal over real frames first)
    ("quick: language stacks", 48, 4, 50, 50, 4, 0.1, False),
    ("quick: other stacks", 48, 4, 50, 50, 4, 0.0, False),
    ("paper aligned: language stacks", 24, 10, 50, 50, 4, 0.1, False),
    ("paper aligned: language memory", 24, 10, 50, 50, 8, 0.1, False),
    ("paper unaligned: language on vision", 24, 10, 50, 500, 4, 0.1, False),
    ("paper unaligned: vision on language", 24, 10, 500, 50, 4, 0.0, False),
    ("paper unaligned: vision on audio", 24, 10, 500, 375, 4, 0.0, False),
    ("paper unaligned: audio on vision", 24, 10, 375, 500, 4, 0.0, False),
    ("paper unaligned: vision memory (causal, real first)", 24, 10, 500, 500, 8, 0.0, True),
]
DROPOUT_CASES = [("quick: a stack's activations", (48, 50, 64), 0.1), ("paper unaligned: vision", (24, 500, 40), 0.1)]


def kernel_table(rounds: int = 5, calls: int = 5) -> list[dict]:
    """Forward + backward of one attention call (MulT's masks: key padding and the stretched causal mask, lengths
    drawn between a third and all) and one dropout call, through the compiled kernels and through the PyTorch paths
    (``ktlib.kernels.turned_off``), in this process: ``rounds`` rounds alternating which goes first, each the median
    of ``calls`` calls after one; ms is the median over rounds, ratio (PyTorch / compiled) the median of the
    rounds' ratios with its smallest and largest."""
    import torch

    from ktlib import kernels
    from ktlib.layers import CAUSAL_CHUNK, AttentionMask, attend, causal_mask, dropout

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def paired(what: str, fn) -> dict:
        pairs = []
        for r in range(rounds):
            order = (True, False) if r % 2 == 0 else (False, True)
            ms = {}
            for compiled in order:
                with contextlib.nullcontext() if compiled else kernels.turned_off():
                    ms[compiled] = 1000 * timed(fn)
            pairs.append((ms[False], ms[True]))
        ratios = [a / b for a, b in pairs]
        return {"what": what, "pytorch_ms": statistics.median(a for a, _ in pairs),
                "compiled_ms": statistics.median(b for _, b in pairs), "ratio": statistics.median(ratios),
                "ratio_min": min(ratios), "ratio_max": max(ratios)}

    g = torch.Generator().manual_seed(0)
    rows = []
    for what, b, h, t, s, d_k, p, real_first in KERNEL_CASES:
        q, k, v = (torch.randn(b, n, h, d_k, generator=g).transpose(1, 2).requires_grad_() for n in (t, s, s))
        grad = torch.randn(b, h, t, d_k, generator=g)
        if real_first:
            mask = AttentionMask.causal_real_first(torch.randint(t // 3, t + 1, (b, 1), generator=g), t, CAUSAL_CHUNK)
        else:
            pad = torch.arange(s)[None, :] < s - torch.randint(s // 3, s + 1, (b, 1), generator=g)
            mask = AttentionMask.build(pad, causal_mask(t, s))

        def call(q=q, k=k, v=v, mask=mask, p=p, grad=grad):
            attend(q, k, v, mask, p)[0].backward(grad)

        rows.append(paired(f"attention {b} x {h} x {t} x {s}, d_k {d_k}, p {p}: {what}", call))
    for what, shape, p in DROPOUT_CASES:
        x = torch.randn(*shape, generator=g).requires_grad_()
        grad = torch.randn(*shape, generator=g)
        rows.append(paired(f"dropout {' x '.join(map(str, shape))}, p {p}: {what}",
                           lambda x=x, p=p, grad=grad: dropout(x, p).backward(grad)))
    return rows


def _device_name(device: str) -> str:
    import torch

    if torch.cuda.is_available() and device != "cpu":
        return torch.cuda.get_device_name(0)
    try:  # trees before the compiled kernels have no ktlib.kernels
        from ktlib import kernels
    except ImportError:
        return f"CPU, {torch.get_num_threads()} threads"
    return f"CPU, {torch.get_num_threads()} threads, compiled kernels {kernels.status()}"


def _table(args) -> None:
    import pandas as pd

    rows = []
    for alignment in args.alignments:
        for setting in args.settings:
            for variant in args.variants:
                row = {}
                for mode in ("train", "eval"):
                    row.update(run_isolated(measure, alignment, setting, variant, args.batch_size, args.steps,
                                            args.device, mode))
                rows.append(row)
                print(f"  {alignment:9s} {setting:16s} {variant:14s} train {row['train_s']:7.3f} s/batch  "
                      f"eval {row['eval_s']:7.3f} s/batch  peak {row['train_peak_mb']:8.1f} MB", flush=True)
    table = pd.DataFrame(rows)
    if "reference" in args.variants:
        ref = table[table.variant == "reference"].set_index(["alignment", "setting"])["train_s"]
        table["train_speedup_vs_reference"] = [
            ref.get((r.alignment, r.setting), float("nan")) / r.train_s for r in table.itertuples()]
    cols = ["alignment", "setting", "variant", "train_s", "eval_s", "train_samples_per_s", "eval_samples_per_s",
            "train_peak_mb", "eval_peak_mb"] + (["train_speedup_vs_reference"] if "reference" in args.variants
                                                 else [])
    with pd.option_context("display.width", 220, "display.max_columns", 20, "display.precision", 3):
        print(table[cols].to_string(index=False))


def main(argv=None) -> int:
    import torch

    from ktlib.model import SETTINGS

    parser = argparse.ArgumentParser(prog="python -m ktlib.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(STEPS), choices=list(STEPS), help="training steps to time")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per measurement, median reported (default 5; 3 with --table)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--compare", type=Path, default=None, metavar="PATH",
                        help="another checkout of this project: time its steps against this tree's, paired")
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds per case with --compare or --kernels")
    parser.add_argument("--table", action="store_true", help="every setting x attention path, train and eval")
    parser.add_argument("--kernels", action="store_true",
                        help="attention and dropout calls, fwd + bwd: compiled kernels against PyTorch's paths")
    parser.add_argument("--alignments", nargs="+", default=["aligned", "unaligned"], choices=["aligned", "unaligned"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=24, help="batch size of --table")
    args = parser.parse_args(argv)

    if args.table:
        args.steps = args.steps or 3
        print(f"ktlib benchmark: MOSI shapes, paper config (d=40, 4 layers, 10 heads), batch {args.batch_size}, "
              f"dropouts on; device: {_device_name(args.device)}; torch {torch.__version__}", flush=True)
        _table(args)
        return 0
    if args.kernels:
        from ktlib import kernels

        if not kernels.available():
            parser.error(f"--kernels: the compiled kernels are {kernels.status()}")
        print(f"ktlib benchmark: one call, forward + backward, on the CPU ({torch.get_num_threads()} threads), "
              f"compiled kernels {kernels.status()}; ratio = PyTorch / compiled, median [min, max] over "
              f"{args.rounds} paired rounds", flush=True)
        for r in kernel_table(args.rounds, args.steps or 5):
            print(f"  {r['what']:100s} PyTorch {r['pytorch_ms']:8.2f} ms   compiled {r['compiled_ms']:8.2f} ms   "
                  f"ratio {r['ratio']:.2f} [{r['ratio_min']:.2f}, {r['ratio_max']:.2f}]", flush=True)
        return 0
    args.steps = args.steps or 5
    print(f"ktlib benchmark: kt training step (forward, losses, backward, clipping, optimiser), median of "
          f"{args.steps} steps after {args.warmup}; device: {_device_name(args.device)}; torch {torch.__version__}",
          flush=True)
    if args.compare is not None:
        other = args.compare.resolve()
        if not (other / "ktlib" / "model.py").is_file():
            parser.error(f"--compare {other}: no ktlib/model.py there (give the root of a checkout)")
        rows = compare(other, args.cases, args.rounds, args.steps, args.warmup, args.device)
        print(f"paired, {args.rounds} rounds; ratio = {other.name} / this tree (median [min, max] over rounds):")
        for r in rows:
            print(f"  {r['case']:16s} {other.name} {r['other_ms']:9.1f} ms/step   this {r['this_ms']:9.1f} ms/step   "
                  f"ratio {r['ratio']:.2f} [{r['ratio_min']:.2f}, {r['ratio_max']:.2f}]   "
                  f"peak {r['other_peak_mb']:.0f} vs {r['this_peak_mb']:.0f} MB")
        return 0
    for case in args.cases:
        r = run_isolated(measure_step, case, args.steps, args.warmup, args.device)
        profile, alignment, batch_size = STEPS[case]
        print(f"  {case:16s} ({profile} profile, {alignment}, batch {batch_size})  {r['ms']:9.1f} ms/step  "
              f"(min {min(r['ms_all']):.1f}, max {max(r['ms_all']):.1f})  peak {r['peak_mb']:8.1f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
