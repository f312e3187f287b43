"""``landmarks``: one console script for data tools, the demo and the LightningCLI subcommands."""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
TOOL_COMMANDS = {
    "synth": "generate the synthetic landmark world (JPEG files + CSV manifests)",
    "demo": "the main job: synthetic world → untrained evaluation → fit → evaluation → summary",
}

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
    return USAGE.format(tools="\n".join(f"  {name:<10} {text}" for name, text in TOOL_COMMANDS.items()))


def _tool_parser() -> argparse.ArgumentParser:
    from cli import demo
    from datamodules import synth

    parser = argparse.ArgumentParser(prog="landmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    synth.add_synth_arguments(sub.add_parser("synth", help=TOOL_COMMANDS["synth"]))
    demo.add_demo_arguments(sub.add_parser("demo", help=TOOL_COMMANDS["demo"]))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in TOOL_COMMANDS:
        from cli import demo
        from datamodules import synth

        parser = _tool_parser()
        args, unknown = parser.parse_known_args(argv)
        if unknown and args.command != "demo":
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = unknown  # demo passes them on to LightningCLI
        runner = {"synth": synth.run_synth_command, "demo": demo.run_demo_command}[args.command]
        return int(runner(args) or 0)
    if argv[0] in LIGHTNING_COMMANDS or argv[0].startswith("-"):
        from cli.lightning_cli import LandmarkCLI

        LandmarkCLI(args=argv)
        return 0
    print(f"landmarks: unknown command {argv[0]!r}\n", file=sys.stderr)
    print(_usage(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
