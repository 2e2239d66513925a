"""Command line: ``python -m ktlib <command> --help``.

Commands
  data        load a dataset (real MulT file if present, else the simulator) and print what it holds
  simulate    generate simulator presets into the cache and print how long each took
  params      parameter counts of every setting at the paper's configuration
  train       train one run (or load it if this configuration already ran) and print its metrics
  grid        settings x seeds, mean +- std, beside the paper's numbers
  table       every finished run in the store, one row per configuration (its seeds averaged)
  reproduce   the workbook's main job on the built-in data
"""

from __future__ import annotations

import argparse
import sys
import time

from .simulate import REGIMES
from .specs import ALIGNMENTS, DATASETS


def _add_sim_knobs(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("simulator knobs (used when the data is simulated)")
    g.add_argument("--scale", type=float, default=1.0, help="fraction of the published split sizes (0, 1]")
    g.add_argument("--seed", type=int, default=0, help="simulator seed: same seed, same bytes")
    g.add_argument("--audio-shared", type=float, default=None,
                   help="share of audio's label-relevant signal that vision and language also see, in [0, 1]")
    g.add_argument("--regime", default="default", choices=sorted(REGIMES),
                   help="named knob settings of the simulator (labels_bottleneck: noisy labels, fewer of them)")


def _sim_knobs(args) -> dict:
    knobs = {"scale": args.scale, "seed": args.seed, **REGIMES[args.regime]}
    if args.audio_shared is not None:
        knobs["audio_shared"] = args.audio_shared
    return knobs


def _print_data(data) -> None:
    import pandas as pd

    print(data.describe())
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.precision", 3):
        print(data.summary().to_string(index=False))
    print(data.label_summary())


def cmd_data(args) -> int:
    from .data import get_data, load_mult_file

    if args.file:
        data = load_mult_file(args.file)
    else:
        data = get_data(args.dataset, args.alignment, source=args.source, data_dir=args.data_dir, **_sim_knobs(args))
    _print_data(data)
    return 0


def cmd_simulate(args) -> int:
    from .data import save_simulation
    from .simulate import SimConfig, simulate

    datasets = DATASETS if args.dataset == "all" else (args.dataset,)
    alignments = ALIGNMENTS if args.alignment == "all" else (args.alignment,)
    print(f"{'preset':20s} {'scale':>6s} {'utterances':>10s} {'MB':>8s} {'generate s':>10s} {'write s':>8s}")
    for dataset in datasets:
        for alignment in alignments:
            config = SimConfig(dataset=dataset, alignment=alignment, **_sim_knobs(args))
            sim = simulate(config)
            start = time.perf_counter()
            if args.write:
                save_simulation(sim)
            written = time.perf_counter() - start
            n = sum(len(s["labels"]) for s in sim.raw.values())
            mb = sum(a.nbytes for s in sim.raw.values() for a in s.values()) / 1e6
            print(f"{dataset + '_' + alignment:20s} {config.scale:6.3g} {n:10d} {mb:8.0f} {sim.seconds:10.2f} "
                  f"{written:8.2f}", flush=True)
            del sim
    return 0


def cmd_params(args) -> int:
    from .config import model_config
    from .model import SETTINGS, KTModel, count_parameters

    print(f"parameters at the paper's {args.dataset} configuration ({args.alignment}; d, layers, heads of Table 5)")
    print(f"{'setting':16s} {'total':>10s} {'projections':>12s} {'knowledge transfer':>19s} {'backbone':>10s}")
    for setting in SETTINGS:
        model = KTModel(model_config(args.dataset, args.alignment, setting=setting))
        kt = count_parameters(model.kt) if model.kt is not None else 0
        print(f"{setting:16s} {count_parameters(model):10,d} {count_parameters(model.proj):12,d} {kt:19,d} "
              f"{count_parameters(model.backbone):10,d}")
    return 0


def _load(args):
    from .config import profile
    from .data import get_data

    scale = args.scale if args.scale is not None else profile(args.profile).scale
    return get_data(args.dataset, args.alignment, source=args.source, data_dir=args.data_path, scale=scale,
                    seed=args.data_seed)


def _print_table(frame) -> None:
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 40, "display.precision", 3):
        print(frame.to_string(index=False))


def cmd_train(args) -> int:
    from dataclasses import replace

    from .runs import load_or_train, plan

    data = _load(args)
    job = plan(data, [args.setting], [args.seed], args.profile)[0]
    for need in job.needs:  # kt's target run (the full run of the same seed), trained first if missing
        load_or_train(need.model, need.train, data, args.runs_dir, progress=not args.quiet)
    run = load_or_train(job.model, replace(job.train, device=args.device), data, args.runs_dir, force=args.force,
                        progress=not args.quiet)
    print(f"run {run.id} [{data.kind}] in {run.dir}")
    import pandas as pd

    table = pd.DataFrame({split: run.metrics[split] for split in ("valid", "test")})
    _print_table(table.reset_index(names="metric"))
    return 0


def cmd_grid(args) -> int:
    from .runs import compare_with_paper, grid, summarize, table_notes

    data = _load(args)
    tidy = grid(data, args.settings, args.seeds, args.profile, runs_dir=args.runs_dir, force=args.force,
                progress=not args.quiet, workers=args.workers or None, scheduler=args.scheduler)
    print(f"{data.layout.name} [{data.kind}], profile {args.profile}, seeds {args.seeds}: test split, "
          f"mean ± std over seeds (accuracies and F1 in %)")
    table = compare_with_paper(summarize(tidy))
    _print_table(table)
    print("\n".join(table_notes(table)))
    return 0


def cmd_transfer(args) -> int:
    """kt with each consistency target against language+vision and its placebo, in the cells of the simulator's
    story; the verdicts and each prediction beside its outcome (synthetic data)."""
    import os

    import pandas as pd

    from . import experiments as X
    from .stats import fmt_seeds

    if args.runs_dir:
        os.environ["KTLIB_RUNS_DIR"] = args.runs_dir  # worker processes read the store from the environment
    cells = X.transfer_params(max(2, len(args.seeds)), args.targets, args.supervision, args.regimes,
                              args.controls, args.control_regime)[1]
    if len(args.seeds) < 2:
        raise SystemExit("transfer: give at least two --seeds (a paired interval needs two)")
    data = _load(args)
    start = time.perf_counter()
    tidy = X.transfer_runs(data, cells, args.seeds, args.profile, workers=args.workers or None,
                           progress=not args.quiet, scheduler=args.scheduler)
    print(f"{data.layout.name} [{data.kind}], profile {args.profile}, seeds {args.seeds}: "
          f"{tidy['run'].nunique()} runs ready in {time.perf_counter() - start:.0f} s")
    if args.out:
        tidy.to_csv(args.out, index=False)
        print(f"tidy table written to {args.out}")
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 300):
        test = tidy[(tidy["split"] == "test") & tidy["metric"].isin(["mae", "corr"])]
        print("\ntest split, mean ± std over seeds (sample std) [synthetic]")
        print(test.groupby(["cell", "method", "metric"], sort=False)["value"].agg(fmt_seeds)
              .unstack("metric").to_string())
        print("\ntransfer verdicts (paired by seed, 95 % t intervals, sign counts) [synthetic]")
        print(X.transfer_verdicts(tidy).to_string(index=False))
        print("\nthe story's predictions beside their outcomes [synthetic]")
        print(X.story_outcomes(tidy).to_string(index=False))
    return 0


def cmd_table(args) -> int:
    from .runs import collect, compare_with_paper, summarize, table_notes

    tidy = collect(args.runs_dir)
    if tidy.empty:
        print("no finished runs in the store yet; train some with `python -m ktlib train` or `grid`")
        return 0
    table = compare_with_paper(summarize(tidy), split=args.split)
    _print_table(table)
    print("\n".join(table_notes(table)))
    return 0


def cmd_reproduce(args) -> int:
    """Print the built-in data, then execute every notebook in order with papermill."""
    from pathlib import Path

    from .data import get_data, project_root
    from .runs import default_runs_dir
    from .workbook import execute_notebook

    start = time.perf_counter()
    print("ktlib reproduce: the built-in data (simulated MulT-layout MOSI; synthetic, not the real corpus)\n")
    for alignment in ALIGNMENTS:
        data = get_data("mosi", alignment, source="simulated", seed=args.seed)
        _print_data(data)
        print()
    root = project_root()
    notebooks = sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    out_dir = Path(args.out) if args.out else default_runs_dir() / "notebooks"
    figures = root / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    for nb in notebooks:
        t0 = time.perf_counter()
        execute_notebook(nb, out_dir / nb.name, {"profile": args.profile, "figures_dir": str(figures)},
                         args.cell_timeout)
        print(f"executed {nb.name} ({time.perf_counter() - t0:.1f} s) -> {out_dir / nb.name}", flush=True)
    tables = default_runs_dir() / "tables"
    print(f"\ndone in {time.perf_counter() - start:.1f} s ({args.profile} profile)")
    print(f"  executed notebooks: {out_dir}")
    print(f"  figures (PNG + PDF): {figures} ({len(list(figures.glob('*.png')))} figures)")
    print(f"  result tables (CSV): {tables}")
    print(f"  training runs:       {default_runs_dir()}  (read back, not retrained, next time)")
    print("  cached datasets:     data/sim/")
    return 0


def _add_data_commands(sub) -> None:
    """`data`, `simulate`, `params`: look at the data and the model without training."""
    p = sub.add_parser("data", help="load a dataset and print its shapes, statistics and labels")
    p.add_argument("--dataset", choices=DATASETS, default="mosi", help="which corpus (default mosi)")
    p.add_argument("--alignment", choices=ALIGNMENTS, default="aligned", help="word-aligned or unaligned files")
    p.add_argument("--source", choices=("auto", "real", "simulated"), default="auto",
                   help="auto: the real file if present, else the simulator")
    p.add_argument("--data-dir", default=None, help="folder holding the real MulT files (default data/)")
    p.add_argument("--file", default=None, help="read this MulT-layout pickle instead (any name)")
    _add_sim_knobs(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("simulate", help="generate simulator presets and print generation times")
    p.add_argument("--dataset", choices=(*DATASETS, "all"), default="all", help="preset dataset (default all)")
    p.add_argument("--alignment", choices=(*ALIGNMENTS, "all"), default="all", help="alignment (default all)")
    p.add_argument("--write", action="store_true", help="also write each preset to the cache in data/sim/")
    _add_sim_knobs(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("params", help="parameter counts of every setting at the paper's configuration")
    p.add_argument("--dataset", choices=DATASETS, default="mosi", help="whose Table 5 configuration (default mosi)")
    p.add_argument("--alignment", choices=ALIGNMENTS, default="aligned", help="input shapes (default aligned)")
    p.set_defaults(func=cmd_params)


def _add_run_options(p, settings_many: bool) -> None:
    """The options of `train` and `grid`: data, settings and seeds, profile, device, store."""
    from .config import PROFILES
    from .model import SETTINGS


    p.add_argument("--dataset", choices=(*DATASETS, "mosi_utterance"), default="mosi",
                   help="which corpus (default mosi); mosi_utterance: the real utterance-level MOSI file "
                        "(with --source real --data-path FOLDER)")
    p.add_argument("--alignment", choices=ALIGNMENTS, default="aligned", help="word-aligned or unaligned")
    if settings_many:
        p.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS),
                       help="settings to train (default: all five)")
        p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="training seeds (default 1 2 3)")
    else:
        p.add_argument("--setting", choices=SETTINGS, default="kt", help="which model setting (default kt)")
        p.add_argument("--seed", type=int, default=1, help="training seed (default 1)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                   help="smoke (seconds, for tests) | quick (minutes on a CPU) | paper (Table 5, for a GPU)")
    p.add_argument("--source", choices=("auto", "real", "simulated"), default="simulated",
                   help="simulated (default, the built-in data) | real (needs the MulT file) | auto")
    p.add_argument("--data-path", default=None, help="folder holding the real MulT files (default data/)")
    p.add_argument("--scale", type=float, default=None, help="simulator scale (default: the profile's)")
    p.add_argument("--data-seed", type=int, default=0, help="simulator seed (default 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: CUDA if present")
    p.add_argument("--runs-dir", default=None, help="run store (default runs/, or $KTLIB_RUNS_DIR)")
    p.add_argument("--force", action="store_true", help="retrain even if this configuration already ran")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_where_options(p) -> None:
    """Where the runs train: local processes or a Dask cluster."""

    p.add_argument("--workers", type=int, default=0, help="training processes (0: automatic)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="train on the Dask cluster at this address (tcp://host:8786) instead; needs "
                        "pip install -e '.[cluster]', and the runs folder and data at the same paths there")


def _add_training_commands(sub) -> None:
    """`train` (one run) and `grid` (settings x seeds)."""
    p = sub.add_parser("train", help="train one run, or load it if it already ran, and print its metrics")
    _add_run_options(p, settings_many=False)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("grid", help="settings x seeds: mean +- std beside the paper's numbers")
    _add_run_options(p, settings_many=True)
    _add_where_options(p)
    p.set_defaults(func=cmd_grid)


def _add_transfer_command(sub) -> None:
    """`transfer`: kt's consistency targets against language+vision and a placebo (notebook 4, part 4)."""
    from .config import PROFILES

    p = sub.add_parser("transfer", help="when reconstruction helps: kt's targets vs language+vision and a placebo "
                                        "in the simulator's cells (notebook 4, part 4)")
    p.add_argument("--alignment", choices=ALIGNMENTS, default="aligned", help="word-aligned or unaligned")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5], help="training seeds (default 1-5)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick", help="profile (default quick)")
    p.add_argument("--scale", type=float, default=None, help="simulator scale (default: the profile's)")
    p.add_argument("--data-seed", type=int, default=0, help="simulator seed (default 0)")
    p.add_argument("--targets", default="random,placebo,full,audio_only,audio_memory,placebo_memory",
                   help="kt's consistency targets, comma-separated (default all six)")
    p.add_argument("--supervision", choices=("without", "with", "both"), default="both",
                   help="each target without, with, or both without and with f'_A supervised (default both)")
    p.add_argument("--regimes", default="default,labels_bottleneck", help="main cells (simulator regimes)")
    p.add_argument("--controls", default="lambda=0,matched,audio_shared=0,train_scale=0.5",
                   help="controls, with the main kt variant (empty for none)")
    p.add_argument("--control-regime", default="default", help="the regime the controls vary (default: default)")
    _add_where_options(p)
    p.add_argument("--runs-dir", default=None, help="run store (default runs/, or $KTLIB_RUNS_DIR)")
    p.add_argument("--out", default=None, help="also write the tidy table of every run to this CSV file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_transfer, dataset="mosi", source="simulated", data_path=None)


def _add_store_commands(sub) -> None:
    """`table` (what the store holds) and `reproduce` (every notebook, in order)."""
    from .config import PROFILES

    p = sub.add_parser("table", help="summarise every finished run in the store, one row per configuration")
    p.add_argument("--runs-dir", default=None, help="run store (default runs/, or $KTLIB_RUNS_DIR)")
    p.add_argument("--split", choices=("valid", "test"), default="test", help="which split (default test)")
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("reproduce", help="the workbook's main job: every notebook, in order, on the built-in data")
    p.add_argument("--seed", type=int, default=0, help="simulator seed of the printed data summary")
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick", help="profile passed to the notebooks")
    p.add_argument("--out", default=None, help="folder for the executed notebooks (default runs/notebooks)")
    p.add_argument("--cell-timeout", type=int, default=3600,
                   help="seconds one notebook cell may run before the run stops with an error (default 3600)")
    p.set_defaults(func=cmd_reproduce)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ktlib", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_data_commands, _add_training_commands, _add_transfer_command, _add_store_commands):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .pool import JobsFailed

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # our errors say what is wrong and what to do
        print(f"error: {err}", file=sys.stderr)
        return 2
    except JobsFailed as err:  # each failed run by id and configuration, with its error; the others finished
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
