"""LightningCLI for the landmark model: ``landmarks fit|validate|test|predict --config ...``.

The number of classes is linked from the data module into the model (``link_arguments`` at
instantiation), so no YAML file ever hard-codes it. YAML files may use OmegaConf interpolation
(``${data.image_size}``).

Sweeps (``landmarks sweep``, ``wandb agent``) pass every parameter as ``--key=value``, so a
parameter that selects configuration files is passed as ``--config.<slot>=FILE`` (or a list of
files): :func:`expand_config_arguments` turns these into ``--config=FILE`` arguments placed
right after the leading ``--config`` files, in slot-name order, before any other override —
whatever order the sweep agent used. wandb conventions (group, tags, logged config and summary)
come from :mod:`callbacks.wandb_conventions`.
"""

from __future__ import annotations

import logging
import netrc
import os
import re
import sys

import yaml
from jsonargparse import set_parsing_settings
from pytorch_lightning.cli import LightningCLI

from callbacks.launched_ranks import StopLaunchedRanksOnError
from callbacks.wandb_conventions import (
    WandbConventions,
    apply_wandb_conventions,
    is_wandb_logger,
    run_dir_from_env,
    run_identity,
    wandb_available,
)
from cli import logs
from core.errors import UserError
from datamodules import LandmarkDataModule
from lightning_modules import LandmarkModule
from lightning_modules.embedding_net import check_backbone
from lightning_modules.landmark_module import read_checkpoint

log = logging.getLogger(__name__)
SUBCOMMANDS = ("fit", "validate", "test", "predict")
_CONFIG_SLOT = re.compile(r"^--config\.([A-Za-z0-9_-]+)(?:=(.*))?$", re.DOTALL)


def wandb_is_configured() -> bool:
    """True when the user has set wandb up (API key or ``wandb login``), so runs may go online."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def choose_wandb_mode() -> str:
    """Offline unless the user chose a mode or logged in: a run never waits for the network."""
    if "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "online" if wandb_is_configured() else "offline"
    return os.environ["WANDB_MODE"]


def _config_files(value: str, where: str) -> list[str]:
    """One path, a YAML/Python list of paths (how wandb prints a list), or none (``None``/``null``/empty)."""
    text = value.strip()
    if text in ("", "None", "null", "~"):
        return []
    if text.startswith("["):
        try:
            files = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise UserError(f"{where}: cannot read the list of config files {value!r}: {err}") from None
        if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
            raise UserError(f"{where}: expected a list of config file paths, got {value!r}")
        return files
    return [text]


def expand_config_arguments(args: list[str]) -> list[str]:
    """Turn sweep-style config arguments into LightningCLI ``--config`` arguments.

    * ``--config.<slot>=FILE`` or ``--config.<slot>=[A, B]`` → ``--config=FILE`` / ``--config=A
      --config=B``, moved to just after the subcommand and the leading ``--config`` arguments,
      sorted by slot name (a sweep agent may pass parameters in any order; files must load
      before overrides such as ``--trainer.max_epochs=2``, which they would otherwise reset).
    * ``--config=[A, B]`` (a list-valued ``config`` parameter) → ``--config=A --config=B`` in place.
    """
    rest: list[str] = []
    slots: dict[str, list[str]] = {}
    i = 0
    while i < len(args):
        token = args[i]
        match = _CONFIG_SLOT.match(token) if isinstance(token, str) else None
        if match:
            slot, value = match.group(1), match.group(2)
            if value is None:
                if i + 1 >= len(args):
                    raise UserError(f"{token} needs a value (a config file or a list of them)")
                i += 1
                value = args[i]
            if slot in slots:
                raise UserError(f"--config.{slot} is given twice")
            slots[slot] = _config_files(value, f"--config.{slot}")
        elif isinstance(token, str) and token.startswith("--config=") and token[len("--config="):].lstrip().startswith("["):
            rest += [f"--config={f}" for f in _config_files(token[len("--config="):], "--config")]
        else:
            rest.append(token)
        i += 1
    if not slots:
        return rest
    at = 1 if rest and rest[0] in SUBCOMMANDS else 0
    while at < len(rest):
        if rest[at] in ("--config", "-c"):
            at += 2
        elif rest[at].startswith("--config="):
            at += 1
        else:
            break
    files = [f"--config={f}" for slot in sorted(slots) for f in slots[slot]]
    return rest[:at] + files + rest[at:]


def _logger_entries(logger_config) -> list:
    if logger_config is None or isinstance(logger_config, bool):
        return []
    return list(logger_config) if isinstance(logger_config, (list, tuple)) else [logger_config]


# Under subcommands the config root is `fit.`/`validate.`; this keeps `${trainer.max_epochs}` in
# experiment files meaning what it says, whichever subcommand loads them.
set_parsing_settings(omegaconf_absolute_to_relative_paths=True)


def _user_error_in(err: BaseException) -> UserError | None:
    """The first UserError in ``err``'s chain of causes and contexts, or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class LandmarkCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("model_class", LandmarkModule)
        kwargs.setdefault("datamodule_class", LandmarkDataModule)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # omegaconf+: interpolations resolve after all --config files and overrides are merged.
        # exit_on_error=False: a parse error is raised (jsonargparse's ArgumentError) rather than
        # printed with the whole usage, so `landmarks` reports it in one line (cli.main).
        parser_kwargs = {"parser_mode": "omegaconf+", "exit_on_error": False}
        kwargs.setdefault("parser_kwargs", {**parser_kwargs, **{name: dict(parser_kwargs) for name in SUBCOMMANDS}})
        # The data module shards batches per rank itself (P×K plan, DistributedSampler for
        # evaluation); Lightning must not replace its batch sampler.
        kwargs.setdefault("trainer_defaults", {"use_distributed_sampler": False})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        if args is None:
            expanded = expand_config_arguments(sys.argv[1:])
            args = expanded if expanded != sys.argv[1:] else None
        elif isinstance(args, (list, tuple)):
            args = expand_config_arguments(list(args))
        self._given_args = args
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """With ``--ckpt_path``, the checkpoint's hyperparameters fill in only what the user did not set.

        Lightning's version writes the checkpoint's model arguments over the parsed configuration,
        so a value given on the command line or in a ``--config`` file was silently replaced:
        ``landmarks validate --ckpt_path CKPT --model.eval_scales=[1.414]`` evaluated at the
        checkpoint's scale and reported its numbers as 1.414's (upstream: Lightning PR 21455).
        Here every value the user gave is put back over the merged configuration.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        # Lightning's own names ("last", "best", ...) and a missing file are Lightning's to resolve or name.
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry") or not os.path.exists(ckpt_path):
            return
        # Lightning reads the file unguarded here: a truncated or foreign file would end in a
        # traceback (an unpickling error, a KeyError), so it is checked first.
        read_checkpoint(ckpt_path)
        given = self.parser.parse_args(self._given_args, defaults=False)
        super()._parse_ckpt_path()
        for key, value in given.items(branches=False):
            self.config[key] = value

    def before_instantiate_classes(self) -> None:
        if choose_wandb_mode() != "online" and not logs.VERBOSE:
            # An offline run's wandb lines (paths, sync hints, its deprecation warnings) are
            # chatter; online, wandb prints the run's URL, which the user wants.
            os.environ.setdefault("WANDB_SILENT", "true")
        config = self.config.get(str(self.subcommand), self.config)
        # timm's own error for a misspelt backbone is a bare RuntimeError, raised after the data
        # module is set up; check the key first, so the message names it.
        backbone = config.get("model", {}).get("backbone") if hasattr(config.get("model", {}), "get") else None
        if backbone is not None:
            try:
                check_backbone(backbone)
            except UserError as err:
                raise UserError(f"model.backbone: {err}") from None
        trainer = config.trainer
        # Lightning's own messages for these are tracebacks (a ZeroDivisionError for
        # check_val_every_n_epoch 0), or nothing at all: max_epochs 0 trains nothing, exit 0.
        max_epochs, every = getattr(trainer, "max_epochs", None), getattr(trainer, "check_val_every_n_epoch", None)
        if max_epochs is not None and max_epochs != -1 and max_epochs < 1:
            raise UserError(f"trainer.max_epochs must be >= 1 (or -1: no limit), got {max_epochs}; "
                            "`landmarks validate --ckpt_path CKPT` evaluates without training")
        if every is not None and every < 1:
            raise UserError(f"trainer.check_val_every_n_epoch must be >= 1 (or null), got {every}")
        run_dir = run_dir_from_env()
        if run_dir is not None:
            # One folder per sweep run: every logger and the default root go there.
            trainer.default_root_dir = str(run_dir)
            for entry in _logger_entries(trainer.logger):
                if hasattr(entry.init_args, "save_dir"):
                    entry.init_args.save_dir = str(run_dir)
        entries = _logger_entries(trainer.logger)
        wandb_entries = [e for e in entries if is_wandb_logger(e)]
        if wandb_entries and not wandb_available():
            log.warning("wandb is not installed: the WandbLogger is left out (the other loggers still log)")
            kept = [e for e in entries if not is_wandb_logger(e)]
            trainer.logger = kept if kept else False
            wandb_entries = []
        self._wandb_identity = None
        if wandb_entries:
            self._wandb_identity = run_identity(config)
            for entry in wandb_entries:
                apply_wandb_conventions(entry, self._wandb_identity, sweep=os.environ.get("LANDMARKS_SWEEP"))

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            # jsonargparse reports a class whose __init__ refused its arguments (a UserError, e.g. a
            # curriculum stage's class_share of 0) inside a union error listing every subtype it
            # tried, printed as a traceback; the user's mistake is the refusal, so it is what is said.
            cause = _user_error_in(err)
            if cause is None or cause is err:
                raise
            raise UserError(str(cause)) from err

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(StopLaunchedRanksOnError())
        for logger in trainer.loggers:
            # Lightning's WandbLogger always passes anonymous=None, which wandb >= 0.19 answers
            # with a deprecation line on every run; leaving the key out means the same.
            init = getattr(logger, "_wandb_init", None)
            if type(logger).__name__ == "WandbLogger" and isinstance(init, dict) and init.get("anonymous") is None:
                init.pop("anonymous", None)
        if getattr(self, "_wandb_identity", None) is not None:
            config = self.config.get(str(self.subcommand), self.config)
            resolved = yaml.safe_load(self._parser(self.subcommand).dump(config, skip_none=False))
            trainer.callbacks.append(WandbConventions(resolved, self._wandb_identity))
        return trainer
