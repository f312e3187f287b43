"""The main job: evaluate the untrained model, fit, evaluate again, print what happened.

``landmarks demo`` is ``landmarks fit --config experiments/demo.yaml`` bracketed by two
evaluations, so a newcomer sees in one run what training buys: recall and precision at fixed
false-positive rates before and after. The synthetic world is generated on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"

# Rows of the printed summary: (metric key, label); FPR rows appear only if resolvable.
SUMMARY_ROWS = [
    ("recall@fpr=1e-02", "recall    @ FPR 1e-2"),
    ("recall@fpr=1e-03", "recall    @ FPR 1e-3"),
    ("recall@fpr=1e-04", "recall    @ FPR 1e-4"),
    ("precision@fpr=1e-02", "precision @ FPR 1e-2 (test mix)"),
    ("precision@fpr=1e-03", "precision @ FPR 1e-3 (test mix)"),
    ("precision@fpr=1e-03,prior=0.01", "precision @ FPR 1e-3 (1 landmark photo in 100)"),
    ("p@1", "P@1 (landmark queries)"),
    ("map@10", "mAP@10"),
    ("gap", "GAP (distractors included)"),
]


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", action="append", default=None,
        help="LightningCLI config file(s); default experiments/demo.yaml. Repeat to compose, e.g. "
        "--config experiments/demo.yaml --config experiments/center.yaml",
    )
    # Any further arguments (e.g. --trainer.max_epochs=2) are passed on to LightningCLI.


def format_summary(before: dict, after: dict, run_dir: str, checkpoint: str | None, elapsed_s: float) -> str:
    lines = ["", "=" * 72, "Landmark recognition demo: summary", "=" * 72]
    lines.append(f"{'metric':<48}{'untrained':>11}{'trained':>11}")
    for key, label in SUMMARY_ROWS:
        if key in after or key in before:
            b, a = before.get(key), after.get(key)
            fmt = lambda v: f"{v:>11.3f}" if v is not None else f"{'n/a':>11}"  # noqa: E731
            lines.append(f"{label:<48}{fmt(b)}{fmt(a)}")
    counts = ", ".join(f"{k.removeprefix('n_')} {int(after[k])}" for k in ("n_gallery", "n_queries", "n_distractors") if k in after)
    lines += [
        f"evaluation sets: {counts}",
        f"run folder:      {run_dir}  (metrics.csv, config.yaml, plots/, summary.json)",
        f"checkpoint:      {checkpoint}",
        f"wall time:       {elapsed_s / 60:.1f} min",
        f"wandb:           mode {os.environ.get('WANDB_MODE', 'offline')}; offline runs are in "
        f"{Path(run_dir).parent.parent / 'wandb'}; upload with `wandb sync <that folder>/offline-run-*` "
        "after `wandb login`",
        "=" * 72,
    ]
    return "\n".join(lines)


def run_demo(config_files: list[str], overrides: list[str] = ()) -> dict:
    from cli.lightning_cli import LandmarkCLI

    start = time.time()
    args = [arg for config in config_files for arg in ("--config", config)] + list(overrides)
    cli = LandmarkCLI(args=args, run=False)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    evaluation = next(cb for cb in trainer.callbacks if type(cb).__name__ == "RetrievalEvaluation")

    trainer.validate(model, datamodule=datamodule, verbose=False)
    before = dict(evaluation.last_metrics)
    trainer.fit(model, datamodule=datamodule)
    trainer.validate(model, datamodule=datamodule, verbose=False)
    after = dict(evaluation.last_metrics)

    run_dir = trainer.log_dir
    checkpoint = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
    summary = {"untrained": before, "trained": after, "run_dir": run_dir, "checkpoint": checkpoint,
               "configs": list(config_files), "overrides": list(overrides), "seconds": time.time() - start}
    if trainer.is_global_zero:
        target = Path(run_dir) / "summary.json"
        tmp = target.with_name(f".summary.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(summary, indent=2, default=float))
        os.replace(tmp, target)
        print(format_summary(before, after, run_dir, checkpoint, summary["seconds"]))
    return summary


def run_demo_command(args: argparse.Namespace) -> int:
    configs = args.config or [str(EXPERIMENTS / "demo.yaml")]
    run_demo(configs, args.overrides)
    return 0
