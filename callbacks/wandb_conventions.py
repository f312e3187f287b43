"""wandb conventions: every run is named, grouped and tagged the same way, from its configuration.

Runs are compared in wandb by *what they tested*, so project, group and tags are derived from
the resolved LightningCLI configuration rather than typed by hand in each experiment file:

* ``loss``: ``arcface``, ``center``, ``contrastive`` (the class name without ``Loss``, lower
  case; ``center-plain`` when the center loss gives non-landmarks a center, i.e. without the
  paper's modification);
* ``curriculum`` / ``one-stage`` / ``no-curriculum``: a callback named ``Curriculum`` with more
  than one stage; one with a single all-classes stage (``no_curriculum.yaml``: the schedule's
  baseline, which still imprints the classifier); or no such callback (no imprinting either). The
  last two train differently (EXPERIMENTS.md, "Paper ablation"), so they are different groups.
  A staged callback whose classes come in a random order (``difficulty: random``,
  ``curriculum_random_order.yaml``) is the control of the easy-first order and is
  ``curriculum-random-order``, never merged with the curriculum it controls. Soft stages
  (``waiting_weight`` > 0, ``curriculum_soft.yaml``: classes not yet entered are drawn too, at a
  lower rate) train differently from the paper's and are ``curriculum-soft`` (and
  ``curriculum-soft-random-order``); soft stages with a ``classes: rest`` stage, whose classes
  change places instead of entering (``curriculum_balanced.yaml``), are ``curriculum-soft-balanced``;
* the database: ``oracle-clean`` (``data.oracle_clean``), ``cleaned`` (the DB manifest has a
  ``decision`` column, as written by ``landmarks clean``) or ``raw-db``;
* ``seed-N``: ``seed_everything`` (and ``data-seed-N`` when the sampler seed differs).

``group`` = ``<loss>_<schedule>_<db>`` (what a comparison averages over seeds), the run
``name`` = ``<group>_seed<N>``, tags = the derived ones plus those the YAML file lists. The
project stays as configured (default ``landmark-recognition``).

:class:`WandbConventions` (added by the CLI when a WandbLogger is configured) logs the full
resolved configuration and the git commit into the wandb run config, and writes the evaluation
callback's final numbers into the run summary, so the wandb table shows the last evaluation
rather than whatever was logged last. Plots reach wandb as images from
:class:`callbacks.RetrievalEvaluation` itself.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.trainer.states import TrainerFn

from core.provenance import git_info

DEFAULT_PROJECT = "landmark-recognition"
LOSS_NAMES = {"ArcFaceLoss": "arcface", "CenterSoftmaxLoss": "center", "ContrastiveLoss": "contrastive"}


@dataclass(frozen=True)
class RunIdentity:
    """What a run tested, as wandb project / group / name / tags."""

    loss: str
    curriculum: bool
    database: str
    seed: int | None
    data_seed: int | None = None
    extra_tags: tuple[str, ...] = field(default=())
    one_stage: bool = False  # a Curriculum callback with one stage (imprinting, no schedule)
    random_order: bool = False  # the staged callback's classes come in a random order (its control)
    soft: bool = False  # the staged callback draws classes before they enter (waiting_weight > 0)
    balanced: bool = False  # ... and has a stage that swaps the drawn sets (classes: rest)

    @property
    def schedule(self) -> str:
        """``curriculum[-soft[-balanced]][-random-order]``, ``one-stage`` or ``no-curriculum`` (see the module docstring)."""
        if self.curriculum:
            soft = ("-soft" + ("-balanced" if self.balanced else "")) if self.soft else ""
            return "curriculum" + soft + ("-random-order" if self.random_order else "")
        return "one-stage" if self.one_stage else "no-curriculum"

    @property
    def group(self) -> str:
        return f"{self.loss}_{self.schedule}_{self.database}"

    @property
    def name(self) -> str:
        return f"{self.group}_seed{self.seed if self.seed is not None else 'none'}"

    @property
    def tags(self) -> list[str]:
        derived = [self.loss, self.schedule, self.database]
        derived.append(f"seed-{self.seed}" if self.seed is not None else "seed-none")
        if self.data_seed is not None and self.data_seed != self.seed:
            derived.append(f"data-seed-{self.data_seed}")
        return list(dict.fromkeys([*derived, *self.extra_tags]))  # ordered, no duplicates


def _get(config: Any, dotted: str, default: Any = None) -> Any:
    """``config['a']['b']`` for a nested mapping or a parsed-config Namespace; default if absent."""
    node = config
    for part in dotted.split("."):
        if node is None:
            return default
        if isinstance(node, Mapping):
            node = node.get(part)
        else:
            node = getattr(node, part, None)
    return default if node is None else node


def _class_name(entry: Any) -> str:
    class_path = entry if isinstance(entry, str) else _get(entry, "class_path", "")
    return str(class_path).rsplit(".", 1)[-1]


def _as_list(value: Any) -> list:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def loss_name(config: Any) -> str:
    loss = _get(config, "model.loss")
    if loss is None:
        return "arcface"  # LandmarkModule's default
    cls = _class_name(loss)
    name = LOSS_NAMES.get(cls, cls.removesuffix("Loss").lower() or "unknown")
    # Forward-compatible: an option that gives non-landmarks a center undoes the modification.
    if name == "center" and _get(loss, "init_args.nonlandmark_center", False):
        name = "center-plain"
    return name


def _curriculum_callbacks(config: Any) -> list[Any]:
    return [c for c in _as_list(_get(config, "trainer.callbacks")) if _class_name(c) == "Curriculum"]


def _stage_count(callback: Any) -> int:
    """A ``Curriculum`` callback's number of stages (2 stands for "several" when the stages are
    left to the callback's default schedule)."""
    stages = _get(callback, "init_args.stages")
    return len(stages) if isinstance(stages, (list, tuple)) else 2


def _staged_curriculum_callbacks(config: Any) -> list[Any]:
    """The ``Curriculum`` callbacks with more than one stage (a single stage has no order or weights to tell apart)."""
    return [c for c in _curriculum_callbacks(config) if _stage_count(c) > 1]


def has_curriculum(config: Any) -> bool:
    """A ``Curriculum`` callback with more than one stage.

    One stage (``experiments/no_curriculum.yaml``: every class from the first step, kept so that
    both arms imprint and train alike) is the baseline, not a curriculum.
    """
    return bool(_staged_curriculum_callbacks(config))


def has_random_order_curriculum(config: Any) -> bool:
    """A staged ``Curriculum`` callback whose classes come in a random order: the control of the
    easy-first order (``experiments/curriculum_random_order.yaml``)."""
    return any(_get(c, "init_args.difficulty") == "random" for c in _staged_curriculum_callbacks(config))


def has_soft_curriculum(config: Any) -> bool:
    """A staged ``Curriculum`` callback with soft stages (``waiting_weight`` > 0,
    ``experiments/curriculum_soft.yaml``)."""
    return any(float(_get(c, "init_args.waiting_weight", 0.0)) > 0 for c in _staged_curriculum_callbacks(config))


def has_balanced_curriculum(config: Any) -> bool:
    """A staged ``Curriculum`` callback with a stage that swaps the drawn and the waiting classes
    (``classes: rest``, ``experiments/curriculum_balanced.yaml``; only soft stages accept one, and
    :attr:`RunIdentity.schedule` reads it under ``soft`` only)."""
    return any(_get(stage, "classes") == "rest"
               for c in _staged_curriculum_callbacks(config) for stage in _as_list(_get(c, "init_args.stages")))


def has_one_stage_curriculum(config: Any) -> bool:
    """A ``Curriculum`` callback with a single stage and none with more: the schedule's baseline,
    which differs from having no callback by its imprinting of the classifier."""
    return bool(_curriculum_callbacks(config)) and not _staged_curriculum_callbacks(config)


def database_kind(config: Any) -> str:
    """``oracle-clean``, ``cleaned`` (manifest with a ``decision`` column) or ``raw-db``."""
    if _get(config, "data.oracle_clean", False):
        return "oracle-clean"
    manifest = _get(config, "data.db_manifest", "db.csv")
    path = Path(_get(config, "data.data_dir", ".")) / str(manifest)
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            header = [c.strip().lower() for c in f.readline().split(",")]
        if "decision" in header:
            return "cleaned"
    return "raw-db"


def run_identity(config: Any) -> RunIdentity:
    """The identity of a run from its resolved configuration (a nested dict or Namespace)."""
    seed = _get(config, "seed_everything")
    data_seed = _get(config, "data.seed")
    return RunIdentity(
        loss=loss_name(config),
        curriculum=has_curriculum(config),
        one_stage=has_one_stage_curriculum(config),
        random_order=has_random_order_curriculum(config),
        soft=has_soft_curriculum(config),
        balanced=has_balanced_curriculum(config),
        database=database_kind(config),
        seed=int(seed) if seed is not None and not isinstance(seed, bool) else None,
        data_seed=int(data_seed) if data_seed is not None else None,
    )


def is_wandb_logger(entry: Any) -> bool:
    return _class_name(entry) == "WandbLogger"


def apply_wandb_conventions(logger_config: Any, identity: RunIdentity, sweep: str | None = None) -> None:
    """Set project (if unset), group, name (if unset) and tags on a WandbLogger config entry in place."""
    init = logger_config.init_args
    if not getattr(init, "project", None):
        init.project = DEFAULT_PROJECT
    init.group = identity.group
    if not getattr(init, "name", None):
        init.name = identity.name
    tags = identity.tags + [str(t) for t in (getattr(init, "tags", None) or [])]
    if sweep:
        tags.append(f"sweep-{sweep}")
    init.tags = list(dict.fromkeys(tags))


def wandb_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


class WandbConventions(Callback):
    """Logs the resolved config + git commit to wandb runs and sets their summary to the final metrics.

    Args:
        config: the resolved LightningCLI configuration as a plain nested dict.
        identity: the run's identity (for the config's ``identity`` entry).
    """

    def __init__(self, config: dict | None = None, identity: RunIdentity | None = None):
        super().__init__()
        self.config = config or {}
        self.identity = identity
        self._config_logged = False

    @staticmethod
    def _wandb_loggers(trainer) -> list[WandbLogger]:
        return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self._config_logged or not trainer.is_global_zero:
            return
        self._config_logged = True
        payload = {k: v for k, v in self.config.items() if k != "config"}
        payload["git"] = git_info()
        if self.identity is not None:
            payload["identity"] = {"loss": self.identity.loss, "curriculum": self.identity.curriculum,
                                   "schedule": self.identity.schedule,
                                   "database": self.identity.database, "seed": self.identity.seed,
                                   "group": self.identity.group}
        for logger in self._wandb_loggers(trainer):
            # allow_val_change: Lightning also logs the module's hyperparameters into this config.
            logger.experiment.config.update(payload, allow_val_change=True)

    def _write_summary(self, trainer) -> None:
        if not trainer.is_global_zero:
            return
        from callbacks.retrieval_evaluation import RetrievalEvaluation

        evaluation = next((cb for cb in trainer.callbacks if isinstance(cb, RetrievalEvaluation)), None)
        last = evaluation.last_metrics if evaluation is not None else None
        if not last:
            return
        stage = last["stage"]
        summary = {f"{stage}/{k}": v for k, v in last.items()
                   if k not in ("stage", "epoch", "step") and v is not None and not math.isnan(v)}
        summary.update({"final/stage": stage, "final/epoch": last["epoch"], "final/step": last["step"]})
        for logger in self._wandb_loggers(trainer):
            logger.experiment.summary.update(summary)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write_summary(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.state.fn != TrainerFn.FITTING:  # fit: on_fit_end
            self._write_summary(trainer)

    def on_test_end(self, trainer, pl_module) -> None:
        self._write_summary(trainer)


def run_dir_from_env() -> Path | None:
    """``LANDMARKS_RUN_DIR``: set by ``landmarks sweep`` so that each run logs into its own folder."""
    value = os.environ.get("LANDMARKS_RUN_DIR")
    return Path(value) if value else None
