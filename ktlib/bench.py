"""Benchmark: time per batch, samples per second and peak memory of every setting, on the current device.

``python -m ktlib.bench`` (or ``make bench``) measures MOSI-shaped batches (aligned and unaligned) at the paper's
MOSI configuration (d=40, 4 layers, 10 heads, batch 24, dropouts on) with three attention paths:

- ``reference``: explicit ``softmax(QK^T / sqrt(d_k)) V`` with dropout on the attention weights;
- ``fused``: PyTorch's ``scaled_dot_product_attention`` with the same dropout on the weights;
- ``fused+keydrop``: the fused kernel with attention dropout applied to whole keys per sample and head.

Each measurement (setting x path x train/eval) runs in a fresh process, so its peak memory is its own (CUDA:
``max_memory_allocated``; CPU: growth of the process's peak resident set from just before the first step).
Figures are printed, never asserted.  On a 2-core CPU the whole run takes about 12 minutes, most of it in the
reference path on unaligned shapes; ``--alignments aligned`` or ``--variants fused`` make it shorter.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time

VARIANTS = {
    "reference": dict(attn_impl="reference", attn_dropout_on="weights"),
    "fused": dict(attn_impl="fused", attn_dropout_on="weights"),
    "fused+keydrop": dict(attn_impl="fused", attn_dropout_on="keys"),
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def synthetic_batch(cfg, batch_size: int, seed: int = 0):
    """A front-padded batch with the config's shapes (lengths drawn between a third and all of each sequence)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    batch = {}
    for m in ("l", "a", "v"):
        t, d = cfg.seq_lens[m], cfg.feature_dims[m]
        lengths = torch.randint(max(1, t // 3), t + 1, (batch_size,), generator=g)
        pad = torch.arange(t)[None, :] < (t - lengths)[:, None]  # (B, T) front padding
        batch[m] = torch.randn(batch_size, t, d, generator=g).masked_fill(pad[..., None], 0.0)
        batch[f"mask_{m}"] = pad
    batch["present"] = torch.ones(batch_size, 3, dtype=torch.bool)
    batch["y"] = torch.randn(batch_size, 1, generator=g)
    return batch


def measure(alignment: str, setting: str, variant: str, batch_size: int, steps: int, device: str,
            mode: str) -> dict:
    """Seconds per ``mode`` (train | eval) step, median of ``steps`` after one warm-up; samples/s; peak memory.

    Peak memory: CUDA ``max_memory_allocated``; on the CPU the growth of the process's peak resident set from just
    before the warm-up, so call it in a fresh process (:func:`run_isolated`) for one mode at a time.
    """
    import torch

    from .model import KTModel, ModelConfig
    from .train import pick_device, task_loss

    dev = pick_device(device)
    torch.manual_seed(0)
    cfg = ModelConfig.for_layout("mosi", alignment, setting=setting, **VARIANTS[variant])
    model = KTModel(cfg).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = {k: v.to(dev) for k, v in synthetic_batch(cfg, batch_size).items()}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

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

    result = {"alignment": alignment, "setting": setting, "variant": variant, "device": str(dev)}
    step = train_step if mode == "train" else eval_step  # one mode per process: its peak memory is its own
    base = _rss_mb()
    step()  # warm-up
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)
    result.update({f"{mode}_s": sec, f"{mode}_samples_per_s": batch_size / sec, f"{mode}_peak_mb": peak})
    return result


def _child(args, queue):
    queue.put(measure(*args))


def run_isolated(*args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv=None) -> int:
    import pandas as pd
    import torch

    from .model import SETTINGS

    parser = argparse.ArgumentParser(prog="python -m ktlib.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alignments", nargs="+", default=["aligned", "unaligned"], choices=["aligned", "unaligned"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (median reported)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)

    device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else (
        f"CPU, {torch.get_num_threads()} threads")
    print(f"ktlib benchmark: MOSI shapes, paper config (d=40, 4 layers, 10 heads), batch {args.batch_size}, "
          f"dropouts on; device: {device_name}; torch {torch.__version__}", flush=True)
    rows = []
    for alignment in args.alignments:
        for setting in args.settings:
            for variant in args.variants:
                row = {}
                for mode in ("train", "eval"):
                    row.update(run_isolated(alignment, setting, variant, args.batch_size, args.steps, args.device,
                                            mode))
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
