"""The main job: evaluate the untrained model, fit, evaluate again, print what happened.

``landmarks demo`` is ``landmarks fit --config experiments/demo.yaml`` bracketed by two
evaluations, so a newcomer sees in one run what training buys: recall and precision at fixed
false-positive rates before and after. The synthetic world is generated on first use.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

from callbacks import RetrievalEvaluation
from core.atomic import write_json_atomic
from core.errors import UserError

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


def format_summary(
    before: dict, after: dict, run_dir: str, checkpoint: str | None, elapsed_s: float, phases: dict[str, float]
) -> str:
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
        f"wall time:       {elapsed_s / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in phases.items())})",
        _wandb_line(run_dir),
        "=" * 72,
    ]
    return "\n".join(lines)


def _wandb_line(run_dir: str) -> str:
    mode = os.environ.get("WANDB_MODE", "offline")
    if mode == "disabled":
        return "wandb:           disabled (WANDB_MODE=disabled)"
    if mode == "offline":
        folder = Path(run_dir).parent.parent / "wandb"
        return (f"wandb:           offline run in {folder}/; to upload: `wandb login`, then "
                f"`wandb sync {folder}/offline-run-*`")
    return "wandb:           online; the run's URL is printed above by wandb"


def run_demo(config_files: list[str], overrides: list[str] = ()) -> dict:
    from cli.lightning_cli import LandmarkCLI

    # sys.argv still holds `landmarks demo ...`; Lightning warns about that next to `args`, but a
    # DDP launcher re-runs sys.argv, so it must stay as it is.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    start = time.time()
    args = [arg for config in config_files for arg in ("--config", config)] + list(overrides)
    cli = LandmarkCLI(args=args, run=False)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    evaluation = next((cb for cb in trainer.callbacks if isinstance(cb, RetrievalEvaluation)), None)
    if evaluation is None:
        raise UserError("the demo needs a callbacks.RetrievalEvaluation callback in the configuration")
    phases = {"setup": time.time() - start}

    mark = time.time()
    trainer.validate(model, datamodule=datamodule, verbose=False)
    before = dict(evaluation.last_metrics)
    phases["untrained evaluation"] = time.time() - mark
    mark = time.time()
    evaluations_before_fit = len(evaluation.history)
    trainer.fit(model, datamodule=datamodule)
    phases["fit"] = time.time() - mark
    last = evaluation.history[-1]
    if len(evaluation.history) == evaluations_before_fit or last["epoch"] != trainer.current_epoch - 1:
        # The fit's last epoch did not evaluate (check_val_every_n_epoch): evaluate now.
        mark = time.time()
        trainer.validate(model, datamodule=datamodule, verbose=False)
        phases["final evaluation"] = time.time() - mark
    after = dict(evaluation.last_metrics)

    run_dir = trainer.log_dir
    checkpoint = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
    summary = {"untrained": before, "trained": after, "run_dir": run_dir, "checkpoint": checkpoint,
               "configs": list(config_files), "overrides": list(overrides), "seconds": time.time() - start,
               "phases_seconds": phases}
    if trainer.is_global_zero:
        target = Path(run_dir) / "summary.json"
        write_json_atomic(target, summary, newline=False, default=float)
        print(format_summary(before, after, run_dir, checkpoint, summary["seconds"], phases))
    return summary


def run_demo_command(args: argparse.Namespace) -> int:
    configs = args.config or [str(EXPERIMENTS / "demo.yaml")]
    run_demo(configs, args.overrides)
    return 0
