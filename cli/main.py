"""``landmarks``: one console script for data tools, the demo and the LightningCLI subcommands."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# name -> (help, module, add-arguments function, run function). Modules are imported only when
# their command runs, so `landmarks --help` stays fast and one tool's imports never slow another.
TOOL_COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "synth": ("generate the synthetic landmark world (JPEG files + CSV manifests)",
              "cli.synth", "add_synth_arguments", "run_synth_command"),
    "demo": ("the main job: synthetic world → untrained evaluation → fit → evaluation → summary",
             "cli.demo", "add_demo_arguments", "run_demo_command"),
    "sweep": ("run a wandb sweep file locally and offline: one process per run, resumable, --parallel N",
              "sweeps.runner", "add_sweep_arguments", "run_sweep_command"),
    "compare": ("compare runs or a sweep: mean ± 95% CI over seeds per configuration (summary.md/.csv/.png)",
                "sweeps.compare", "add_compare_arguments", "run_compare_command"),
    "index": ("build a landmark index (shooting-angle centroids + calibrated threshold) from a model and a DB",
              "recognition.commands", "add_index_arguments", "run_index_command"),
    "recognize": ("recognise landmarks in photos, folders or list files with an index (table or --json lines)",
                  "recognition.commands", "add_recognize_arguments", "run_recognize_command"),
    "albums": ("group a photo folder into albums per recognised landmark and city (JSON + HTML)",
               "recognition.commands", "add_albums_arguments", "run_albums_command"),
    "export": ("export the embedding network as TorchScript / ONNX, checked against the eager model",
               "recognition.commands", "add_export_arguments", "run_export_command"),
    "prepare": ("public datasets → manifests: prepare gldv2 | places365 | revisited --root DIR --out DIR",
                "cli.prepare", "add_prepare_arguments", "run_prepare_command"),
    "evaluate": ("benchmarks: evaluate revisited (ROxford/RParis mAP) | gldv2 (recognition GAP)",
                 "cli.evaluate", "add_evaluate_arguments", "run_evaluate_command"),
    "clean": ("clean a landmark DB: per-landmark clusters, duplicates, strays → clean.csv + summary + HTML report",
              "cleaning.command", "add_clean_arguments", "run_clean_command"),
}
# Tools that pass unknown arguments on (to LightningCLI) instead of rejecting them.
PASS_THROUGH = {"demo"}

USAGE = """usage: landmarks COMMAND [options]

Training and evaluation (LightningCLI; `landmarks fit --help` for every option):
  fit        train:     landmarks fit --config experiments/demo.yaml [--config experiments/center.yaml]
  validate   evaluate:  landmarks validate --config CONFIG --ckpt_path CKPT
  test       the same evaluation as validate (the evaluation sets of the data module), logged as test/
  predict    embed the evaluation sets (returned to Python; no writer is configured yet)

Tools:
{tools}
"""


def _usage() -> str:
    return USAGE.format(tools="\n".join(f"  {name:<10} {spec[0]}" for name, spec in TOOL_COMMANDS.items()))


def _run_tool(argv: list[str]) -> int:
    name = argv[0]
    help_text, module_name, add_name, run_name = TOOL_COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"landmarks {name}", description=help_text)
    getattr(module, add_name)(parser)
    args, unknown = parser.parse_known_args(argv[1:])
    if unknown and name not in PASS_THROUGH:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.command = name
    args.overrides = unknown  # demo passes them on to LightningCLI
    return int(getattr(module, run_name)(args) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in TOOL_COMMANDS:
        return _run_tool(argv)
    if argv[0] in LIGHTNING_COMMANDS or argv[0].startswith("-"):
        from cli.lightning_cli import LandmarkCLI

        LandmarkCLI(args=argv)
        return 0
    print(f"landmarks: unknown command {argv[0]!r}\n", file=sys.stderr)
    print(_usage(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
