"""``landmarks``: one console script for data tools, the demo and the LightningCLI subcommands.

Every argument parser of the project lives in :mod:`cli`; the feature packages expose plain
functions. This module is the one place that

* dispatches ``landmarks COMMAND ...`` to a tool (:data:`TOOL_COMMANDS`, parsed with argparse)
  or to LightningCLI (``fit``/``validate``/``test``/``predict``, parsed by jsonargparse);
* turns a user error into one line on stderr, ``landmarks <command>: error: <message>``, exit
  status 2. A user error is a :class:`~core.errors.UserError` (the project's error classes —
  ``ManifestError``, ``IndexFormatError``, ``SweepError`` … — are subclasses), a bad command-line
  option, a LightningCLI parse error, or a missing / unreadable / clashing user path
  (``FileNotFoundError``, ``PermissionError`` …). Anything else is a bug and keeps its traceback.
  ``--debug`` anywhere on the line (or ``LANDMARKS_DEBUG=1``) shows the traceback of user
  errors too;
* keeps the console quiet: the project's own loggers print at INFO, libraries (FAISS's loader,
  Lightning's "GPU available" lines and tips, timm …) only at WARNING and above, and library
  warnings (deprecations, Lightning's hints) are not shown. ``-v`` / ``--verbose`` anywhere on
  the line brings all of it back (``-vv``: DEBUG for everything);
* keeps freed memory in the process (:mod:`core.allocator`): glibc no longer unmaps the large
  blocks a training or embedding step frees, only to fault them in again at the next step.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import re
import sys
import warnings
from typing import Iterator

from cli import logs
from core.allocator import keep_freed_memory
from core.errors import UserError
from core.launched_ranks import stop_launched_ranks

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# name -> (help, module, add-arguments function, run function). Modules are imported only when
# their command runs, so `landmarks --help` stays fast and one tool's imports never slow another.
TOOL_COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "synth": ("generate the synthetic landmark world (JPEG files + CSV manifests)",
              "cli.synth", "add_synth_arguments", "run_synth_command"),
    "demo": ("the main job: noisy synthetic world → clean → fit → centroid index → recognize → albums",
             "cli.demo", "add_demo_arguments", "run_demo_command"),
    "sweep": ("run a wandb sweep file locally and offline: one process per run, resumable, --parallel N",
              "cli.sweep", "add_sweep_arguments", "run_sweep_command"),
    "compare": ("compare runs or a sweep: mean ± 95% CI over seeds per configuration (summary.md/.csv/.png)",
                "cli.sweep", "add_compare_arguments", "run_compare_command"),
    "index": ("build a landmark index (shooting-angle centroids + calibrated threshold) from a model and a DB",
              "cli.recognition", "add_index_arguments", "run_index_command"),
    "recognize": ("recognise landmarks in photos, folders or list files with an index (table or --json lines)",
                  "cli.recognition", "add_recognize_arguments", "run_recognize_command"),
    "albums": ("group a photo folder into albums per recognised landmark and city (JSON + HTML)",
               "cli.recognition", "add_albums_arguments", "run_albums_command"),
    "export": ("export the embedding network as TorchScript / ONNX, checked against the eager model",
               "cli.recognition", "add_export_arguments", "run_export_command"),
    "prepare": ("public datasets → manifests (prepare gldv2 | places365 | revisited --root DIR --out DIR); "
                "a manifest → tar shards (prepare shards --manifest CSV --out DIR)",
                "cli.prepare", "add_prepare_arguments", "run_prepare_command"),
    "evaluate": ("benchmarks: evaluate revisited (ROxford/RParis mAP) | gldv2 (recognition GAP)",
                 "cli.evaluate", "add_evaluate_arguments", "run_evaluate_command"),
    "clean": ("clean a landmark DB: per-landmark clusters, duplicates, strays → clean.csv + summary + HTML report",
              "cli.clean", "add_clean_arguments", "run_clean_command"),
    "clean-tune": ("tune the cleaning parameters against a DB's known noise, scored on held-out landmarks",
                   "cli.clean", "add_clean_tune_arguments", "run_clean_tune_command"),
    "clean-separability": ("how separable is the noise in an embedding: precision-recall ceiling per model",
                           "cli.clean", "add_clean_separability_arguments", "run_clean_separability_command"),
    "realphotos": ("real photos (../shared/realphotos): ImageNet baseline + class-disjoint fine-tune, per seed",
                   "cli.realphotos", "add_realphotos_arguments", "run_realphotos_command"),
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

Anywhere on the line, for every command:
  -v, --verbose   show library logging (FAISS, Lightning, ...) and warnings; -vv for DEBUG
  --debug         show the traceback of an error (also LANDMARKS_DEBUG=1)
"""

#: The project's top-level packages: their loggers print at INFO by default.
PROJECT_PACKAGES = ("core", "datamodules", "losses", "lightning_modules", "retrieval", "recognition", "cleaning",
                    "callbacks", "sweeps", "cli", "landmarks", "__main__")
#: Library loggers held at WARNING unless -v (their INFO lines are chatter, not results).
LIBRARY_LOGGERS = ("faiss", "faiss.loader", "lightning", "lightning.pytorch", "pytorch_lightning", "lightning_fabric",
                   "timm", "torch", "PIL", "matplotlib", "jsonargparse", "fsspec", "urllib3", "numexpr", "h5py")
#: Errors that are the user's (a bad file, option or value), shown as one line.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError, argparse.ArgumentError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
    PermissionError,
)
_GLOBAL_FLAGS = ("--debug", "-v", "-vv", "--verbose")


class CommandLineError(UserError):
    """A bad command-line option (argparse's message)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line: :meth:`error` raises instead of printing the usage."""

    def error(self, message: str):
        raise CommandLineError(f"{message} (see `{self.prog} --help`)")


# ---- error messages ------------------------------------------------------------------------------

_JSONARGPARSE_KEY = re.compile(r'^Parser key "(?P<key>[^"]+)":\s*(?P<rest>.*)$', re.DOTALL)


def one_line(message: str) -> str:
    """``message`` on one line: a worker's wrapped traceback is cut to its last line, other line
    breaks become spaces."""
    text = message.strip()
    if "Original Traceback" in text:  # torch's DataLoader re-raises a worker error with its traceback
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        text = re.sub(r"^[A-Za-z_][\w.]*(Error|Exception|Image)\w*: ", "", last)
    parts = (re.sub(r"^- ", "", line.strip()) for line in text.splitlines())  # "- " bullets of a list
    return " ".join(part for part in parts if part) or message


def _jsonargparse_message(text: str) -> str:
    """jsonargparse's multi-line message for a bad value, as ``key: what is wrong``."""
    match = _JSONARGPARSE_KEY.match(text.strip())
    if not match:
        return one_line(text)
    key, rest = match.group("key"), match.group("rest")
    # A union type lists one error per alternative; "Expected a <class ...>" ones only say what
    # the value is not, another one says what went wrong (e.g. an unknown class_path).
    reasons = [re.sub(r"\. Got value: .*$", "", line.strip()[2:]) for line in rest.splitlines()
               if line.strip().startswith("- ") and not line.strip().startswith("- Expected a <class")]
    if reasons:
        return f"{key}: {reasons[0]}"
    given = re.search(r"^\s*Given value: (.*)$", rest, re.MULTILINE)
    expected = re.findall(r"Expected a <class '([^']+)'>", rest)
    if given and expected:
        names = [{"NoneType": "null"}.get(name, name) for name in dict.fromkeys(expected)]
        return f"{key}: invalid value {given.group(1).strip()!r} (expected {' or '.join(names)})"
    return f"{key}: {one_line(rest)}"


def error_line(command: str | None, err: BaseException) -> str:
    """``landmarks <command>: error: <message>`` for a user error."""
    if isinstance(err, OSError) and not isinstance(err, UserError) and err.filename and err.strerror:
        message = f"{err.filename}: {err.strerror}"
    elif isinstance(err, argparse.ArgumentError):
        message = _jsonargparse_message(str(err))
    else:
        message = one_line(str(err)) or type(err).__name__
    return f"landmarks{' ' + command if command else ''}: error: {message}"


# ---- console output ------------------------------------------------------------------------------


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest's capture replaces it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _is_project_logger(name: str) -> bool:
    return name.split(".", 1)[0] in PROJECT_PACKAGES


class _QuietLibraries(logging.Filter):
    """The project's records from INFO up; other loggers' records from WARNING up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or (record.levelno >= logging.INFO and _is_project_logger(record.name))


_PROJECT_MODULES = r"^(%s)(\.|$)" % "|".join(re.escape(p) for p in PROJECT_PACKAGES)


def _library_levels(verbose: int) -> None:
    level = logging.WARNING if not verbose else logging.INFO if verbose == 1 else logging.DEBUG
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def console(verbose: int = 0) -> Iterator[None]:
    """Logging and warnings for one command; the previous settings are restored afterwards."""
    root = logging.getLogger()
    saved_root = root.level
    saved = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if not verbose:
        handler.addFilter(_QuietLibraries())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)
    _library_levels(verbose)
    saved_verbose, logs.VERBOSE = logs.VERBOSE, verbose
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore")  # libraries' deprecations and hints
                warnings.filterwarnings("default", module=_PROJECT_MODULES)  # the project's own stay
            yield
    finally:
        logs.VERBOSE = saved_verbose
        root.removeHandler(handler)
        root.setLevel(saved_root)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


# ---- dispatch ------------------------------------------------------------------------------------


def _usage() -> str:
    return USAGE.format(tools="\n".join(f"  {name:<19}{spec[0]}" for name, spec in TOOL_COMMANDS.items()))


def _add_global_options(parser: argparse.ArgumentParser) -> None:
    """Shown in ``--help``; main() takes them off the line before parsing."""
    group = parser.add_argument_group("output (anywhere on the line)")
    group.add_argument("-v", "--verbose", action="count", default=0,
                       help="show library logging and warnings (-vv: DEBUG)")
    group.add_argument("--debug", action="store_true", help="show the traceback of an error (or LANDMARKS_DEBUG=1)")


def _run_tool(argv: list[str], verbose: int) -> int:
    name = argv[0]
    help_text, module_name, add_name, run_name = TOOL_COMMANDS[name]
    module = importlib.import_module(module_name)
    _library_levels(verbose)  # an import may have set a library logger's level (Lightning does)
    parser = ArgumentParser(prog=f"landmarks {name}", description=help_text)
    getattr(module, add_name)(parser)
    _add_global_options(parser)
    args, unknown = parser.parse_known_args(argv[1:])
    if unknown and name not in PASS_THROUGH:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.command = name
    args.verbose = verbose  # taken off the line before parsing
    args.overrides = unknown  # demo passes them on to LightningCLI
    return int(getattr(module, run_name)(args) or 0)


def _run_lightning(argv: list[str], verbose: int) -> int:
    from cli.lightning_cli import LandmarkCLI

    _library_levels(verbose)
    # main() passes the line on as `args` (with --debug/-v taken off); Lightning warns whenever
    # `args` and sys.argv are both given.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    LandmarkCLI(args=argv)
    return 0


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("LANDMARKS_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    verbose = sum({"-v": 1, "--verbose": 1, "-vv": 2}.get(arg, 0) for arg in argv)
    argv = [arg for arg in argv if arg not in _GLOBAL_FLAGS]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command = argv[0]
    if command not in TOOL_COMMANDS and command not in LIGHTNING_COMMANDS and not command.startswith("-"):
        print(f"landmarks: error: unknown command {command!r} (`landmarks --help` lists the commands)",
              file=sys.stderr)
        return 2
    name = command if not command.startswith("-") else None
    keep_freed_memory()
    with console(verbose):
        try:
            try:
                if command in TOOL_COMMANDS:
                    return _run_tool(argv, verbose)
                return _run_lightning(argv, verbose)
            except BaseException:
                # In rank 0 of a script-launched DDP run, the other ranks would otherwise wait
                # for torch's 30-minute timeout (core.launched_ranks); elsewhere a no-op.
                stop_launched_ranks()
                raise
        except USER_ERRORS as err:
            if debug:
                raise
            print(error_line(name, err), file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if debug:
                raise
            print(f"landmarks{' ' + name if name else ''}: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:
            # The reader went away (`landmarks recognize ... | head`): not an error to report. Python
            # would print a second traceback when it flushes stdout at exit, so stdout goes to devnull.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1


if __name__ == "__main__":
    sys.exit(main())
