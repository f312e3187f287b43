"""``landmarks sweep`` and ``landmarks compare``: the command line of :mod:`sweeps`.

The work is :class:`sweeps.runner.SweepRunner` (one process per run, resumable) and
:func:`sweeps.compare.compare` (mean ± 95 % CI over seeds; with ``--control``, differences paired
by seed). A bad sweep file or run folder is a ``SweepError`` / ``CompareError``, reported by
:mod:`cli.main` in one line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.argtypes import positive_int


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_file", help="a wandb sweep file (method grid|random, parameters, command)")
    parser.add_argument("--out", required=True, help="sweep folder: one subfolder per run; rerunning resumes")
    parser.add_argument("--parallel", type=positive_int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads per run (OMP_NUM_THREADS etc.); default cores // parallel")
    parser.add_argument("--count", type=positive_int, default=None,
                        help="random: runs to draw (overrides 'count' in the file); grid: cap on the runs")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the random search's draws (default 0)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their commands; run nothing")


def run_sweep_command(args: argparse.Namespace) -> int:
    from sweeps.runner import SweepRunner
    from sweeps.spec import load_sweep

    runner = SweepRunner(load_sweep(args.sweep_file), args.out, parallel=args.parallel,
                         sample_seed=args.sample_seed, count=args.count, threads=args.threads)
    if args.dry_run:
        runner.preflight()  # the plan is shown only if it could be launched
        print(runner.describe())
        return 0
    outcomes = runner.run()
    failed = [o for o in outcomes if o.status not in ("ok", "skipped")]
    ran = [o for o in outcomes if o.status != "skipped"]
    print(f"sweep done: {len(ran) - len(failed)} ok, {len(failed)} failed, "
          f"{len(outcomes) - len(ran)} skipped (already done); compare with "
          f"`landmarks compare --sweep {args.out}`")
    for o in failed:
        print(f"  failed: {o.run.name} (exit {o.exit_code}): {Path(args.out) / o.run.name / 'output.log'}")
    return 1 if failed else 0


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    from sweeps.compare import DEFAULT_METRICS

    parser.add_argument("run_dirs", nargs="*", help="run folders (a sweep's run folders or LightningCLI log folders)")
    parser.add_argument("--sweep", default=None, help="a `landmarks sweep` output folder: compare all its runs")
    parser.add_argument("--out", default=None, help="where summary.md/.csv/.png go (default: the sweep folder)")
    parser.add_argument("--metric", action="append", default=None,
                        help=f"metric to tabulate, repeatable (default: those of {', '.join(DEFAULT_METRICS)} logged)")
    parser.add_argument("--plot-metric", default=None, help="metric of the plot (default: the first metric)")
    parser.add_argument("--stage", default="val", choices=("val", "test"), help="which evaluation (default val)")
    parser.add_argument("--control", default=None, metavar="LABEL",
                        help="a configuration (its label in the table, or a unique part of it): every other one "
                             "gets its mean difference to it, paired by seed, with a 95 %% CI")
    parser.add_argument("--group-by", action="append", default=[], metavar="KEY",
                        help="a dotted config.yaml key or section (e.g. data.data_dir) that splits runs into "
                             "configurations, repeatable")


def run_compare_command(args: argparse.Namespace) -> int:
    from sweeps.compare import compare

    comparison = compare(args.run_dirs, sweep=args.sweep, out=args.out, metrics=args.metric, stage=args.stage,
                         plot_metric=args.plot_metric, control=args.control, group_by=args.group_by)
    out = Path(args.out or args.sweep)
    print((out / "summary.md").read_text())
    written = ["summary.md", "summary.csv", "runs.csv"] + (["paired.csv"] if comparison.control else []) + ["summary.png"]
    print("written: " + ", ".join(str(out / name) for name in written))
    return 0
