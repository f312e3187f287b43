"""Curriculum learning: landmark classes enter training easy → hard, non-landmarks later.

The paper trains its landmark CNN on a growing set of classes. This callback holds a list of
:class:`Stage` s; at each stage start (always an epoch boundary, decided from the epoch and step
counters every rank shares) it

1. ranks the classes by difficulty (class size, the current model's per-class accuracy, an
   explicit file, or a seeded random order: the control of easy-first) and activates the easiest
   ones not yet active — the active set only grows (under soft stages a ``rest`` stage swaps it
   with the waiting set instead);
2. initialises the classifier/proxy weights and center-loss centers of the newly activated classes
   from the mean embedding of their images (weight imprinting, via ``MetricLoss.imprint``) instead
   of leaving them at their random initialisation. The images are embedded with BatchNorm
   statistics estimated on the class sample (``Curriculum._training_batchnorm_statistics``), so
   the means are those of the embeddings training sees, even before the first step;
3. tells the data module which classes and what share of non-landmark images the batches hold,
   and the loss which classes take part in its softmax (inactive ones are neither targets nor
   negatives). With ``waiting_weight`` > 0 the stages are soft: every class is in the softmax
   (and imprinted) from the first step, and the classes not active yet are drawn into batches
   at that rate relative to an active one, so the stages reweight the classes instead of
   withholding them;
4. applies the stage's learning-rate rule (keep, or re-warm to a factor of the base rate).

The optimizer is never rebuilt, so it keeps its state (momentum, Adam moments) for every parameter.
The stage, the difficulty order and the active classes are saved in checkpoints; together with the
resumable train loader (:class:`datamodules.sampler.ResumableLoader`) a run killed mid-stage and
resumed with ``--ckpt_path`` continues the same stage with the same classes and batches.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from core.embedding import embed_dataset
from core.errors import UserError
from core.tables import read_text_csv

log = logging.getLogger(__name__)

Difficulty = Literal["size", "accuracy", "file", "random"]


@dataclass
class Stage:
    """One curriculum stage.

    Args:
        epochs: length in epochs; or
        steps: length in optimisation steps — the stage then ends at the first epoch boundary
            at or after that many steps (stages switch on epoch boundaries only).
            The last stage runs to the end of training; its length may be left out.
        class_share: share of all classes active in this stage (easiest first), in (0, 1].
        class_count: number of active classes; overrides ``class_share``.
        classes: ``easiest`` (the stage's share, easiest first, added to the classes already
            active), or ``rest``: soft stages only, not the first stage. The classes that were
            waiting in the previous stage become the active ones and the others wait, so the
            classes drawn less so far are drawn more now. After a stage with half the classes
            active, a ``rest`` stage of the same length gives every class the same expected
            number of draws over the two: the order of the classes changes, not their exposure
            (``class_share``/``class_count`` do not apply).
        nonlandmark_share: share of non-landmark images in each batch; ``None`` keeps the data
            module's ``nonlandmark_share``.
        lr: ``"keep"`` the current learning rate, or a factor: re-warm every parameter group to
            ``lr × base_lr`` at the stage start (chainable schedulers such as cosine or step
            continue from there).
        warmup_steps: with a factor, ramp linearly from ``lr × base_lr / warmup_steps`` to it over
            the stage's first steps (0: jump).
    """

    epochs: int | None = None
    steps: int | None = None
    class_share: float = 1.0
    class_count: int | None = None
    classes: Literal["easiest", "rest"] = "easiest"
    nonlandmark_share: float | None = None
    lr: Literal["keep"] | float = "keep"
    warmup_steps: int = 0


def class_accuracy_scores(embeddings: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out 1-NN accuracy and centroid compactness of each class.

    Returns ``(accuracy, compactness)``, each ``[num_classes]``: the share of a class's images whose
    nearest other image (cosine) has the same class, and the mean cosine of its images to their
    class centroid. Classes without images get NaN. Pure function; the callback ranks by it.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    accuracy = np.full(num_classes, np.nan)
    compactness = np.full(num_classes, np.nan)
    if len(x) < 2:
        return accuracy, compactness
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, neighbours = index.search(x, 2)
    # The first hit is the image itself unless an exact duplicate ties with it; either way the
    # nearest *other* image is the first hit that is not the query row.
    rows = np.arange(len(x))
    nearest = np.where(neighbours[:, 0] == rows, neighbours[:, 1], neighbours[:, 0])
    correct = (y[nearest] == y).astype(np.float64)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    sums = np.zeros((num_classes, x.shape[1]))
    np.add.at(sums, y, x)
    centroids = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    present = counts > 0
    accuracy[present] = (np.bincount(y, weights=correct, minlength=num_classes) / np.maximum(counts, 1))[present]
    compactness[present] = (
        np.bincount(y, weights=(x * centroids[y]).sum(axis=1), minlength=num_classes) / np.maximum(counts, 1)
    )[present]
    return accuracy, compactness


def order_by_scores(primary: np.ndarray, secondary: np.ndarray | None = None) -> list[int]:
    """Class indices easiest first: higher ``primary``, then higher ``secondary``, then lower index.

    NaN scores (no evidence) rank last.
    """
    primary = np.nan_to_num(np.asarray(primary, dtype=np.float64), nan=-np.inf)
    secondary = np.zeros_like(primary) if secondary is None else np.nan_to_num(np.asarray(secondary, dtype=np.float64), nan=-np.inf)
    index = np.arange(len(primary))
    return np.lexsort((index, -secondary, -primary)).tolist()


def read_difficulty_file(path: str | Path, landmark_ids: list[str]) -> np.ndarray:
    """Difficulty per class from a CSV ``landmark_id,difficulty`` (lower = easier), in class order.

    Every class must be listed exactly once (a geography grouping, say, gives a group number per
    landmark); rows of landmarks not in the training data are an error, because a mistyped id
    would otherwise silently leave its class unranked.
    """
    path = Path(path)
    table = read_text_csv(path, "curriculum difficulty file")
    missing_cols = {"landmark_id", "difficulty"} - set(table.columns)
    if missing_cols:
        raise UserError(f"{path}: needs columns landmark_id,difficulty; missing {sorted(missing_cols)}")
    position = {lid: i for i, lid in enumerate(landmark_ids)}
    scores = np.full(len(landmark_ids), np.nan)
    for row, (lid, value) in enumerate(zip(table["landmark_id"].str.strip(), table["difficulty"]), start=2):
        if lid not in position:
            raise UserError(f"{path}, line {row}: landmark_id {lid!r} is not a class of the training data")
        try:
            score = float(value)
        except ValueError:
            raise UserError(f"{path}, line {row}: difficulty {value!r} is not a number") from None
        if not math.isfinite(score):
            raise UserError(f"{path}, line {row}: difficulty {value!r} is not finite")
        if not np.isnan(scores[position[lid]]):
            raise UserError(f"{path}, line {row}: landmark_id {lid!r} is listed twice")
        scores[position[lid]] = score
    unlisted = [landmark_ids[i] for i in np.flatnonzero(np.isnan(scores))]
    if unlisted:
        raise UserError(f"{path}: {len(unlisted)} classes have no difficulty, e.g. {unlisted[:5]}")
    return scores


class Curriculum(Callback):
    """Stage-wise class curriculum with weight imprinting; resumable. See the module docstring.

    Args:
        stages: the stages, in order.
        difficulty: how classes are ranked: ``size`` (more images = easier), ``accuracy``
            (leave-one-out 1-NN accuracy of the current model on a sample of each class,
            re-ranked at every stage start, so the model at the end of a stage picks the next
            classes), ``file`` (``difficulty_file``), or ``random``: a seeded shuffle of the
            classes, drawn once (from ``seed`` and the data module's ``seed``, so each seed of a
            sweep gets its own order). ``random`` is the control of an easy-first order: the same
            stages, the same imprinting, only the order switched off.
        difficulty_file: CSV ``landmark_id,difficulty``, lower = easier.
        imprint: initialise newly activated classes' weights/centers at their mean embedding.
        images_per_class: images per class embedded for accuracy ranking and imprinting
            (a fixed, seeded sample; bounds the cost on classes with thousands of images).
        batch_size: batch size of those embedding passes.
        seed: seed of that sample, and of the ``random`` order.
        waiting_weight: how often a class that is not active yet is drawn, relative to an active
            one. 0 (the paper's stages): never, and it takes no part in the loss until it enters.
            In (0, 1]: a soft curriculum; every class is in the loss and imprinted from the start,
            and the stages only change how often each class is drawn.
    """

    # Most images the BatchNorm statistics of an untrained model are estimated from (all classes).
    _BATCHNORM_IMAGES = 2048

    def __init__(
        self,
        stages: list[Stage],
        difficulty: Difficulty = "size",
        difficulty_file: str | None = None,
        imprint: bool = True,
        images_per_class: int = 8,
        batch_size: int = 128,
        seed: int = 0,
        waiting_weight: float = 0.0,
    ):
        if not stages:
            raise UserError("a curriculum needs at least one stage")
        self.stages = [s if isinstance(s, Stage) else Stage(**s) for s in stages]
        for i, stage in enumerate(self.stages):
            last = i == len(self.stages) - 1
            if stage.epochs is not None and stage.steps is not None:
                raise UserError(f"Curriculum stage {i}: give epochs or steps, not both")
            if not last and stage.epochs is None and stage.steps is None:
                raise UserError(f"Curriculum stage {i}: only the last stage may leave its length open")
            if (stage.epochs is not None and stage.epochs < 1) or (stage.steps is not None and stage.steps < 1):
                raise UserError(f"Curriculum stage {i}: length must be ≥ 1")
            if stage.class_count is None and not 0.0 < stage.class_share <= 1.0:
                raise UserError(f"Curriculum stage {i}: class_share must be in (0, 1], got {stage.class_share}")
            if stage.class_count is not None and stage.class_count < 1:
                raise UserError(f"Curriculum stage {i}: class_count must be ≥ 1")
            if stage.nonlandmark_share is not None and not 0.0 <= stage.nonlandmark_share < 1.0:
                raise UserError(f"Curriculum stage {i}: nonlandmark_share must be in [0, 1)")
            if stage.lr != "keep" and not (isinstance(stage.lr, (int, float)) and stage.lr > 0):
                raise UserError(f"Curriculum stage {i}: lr must be 'keep' or a positive factor, got {stage.lr!r}")
            if stage.classes not in ("easiest", "rest"):
                raise UserError(f"Curriculum stage {i}: classes must be easiest or rest, got {stage.classes!r}")
            if stage.classes == "rest" and (i == 0 or waiting_weight == 0):
                raise UserError(f"Curriculum stage {i}: classes: rest needs soft stages (waiting_weight > 0) and a stage "
                                 "before it, whose waiting classes it activates")
        if difficulty not in ("size", "accuracy", "file", "random"):
            raise UserError(f"difficulty must be size, accuracy, file or random, got {difficulty!r}")
        if (difficulty == "file") != (difficulty_file is not None):
            raise UserError("difficulty_file is needed with difficulty: file, and only then")
        if not 0.0 <= waiting_weight <= 1.0:
            raise UserError(f"waiting_weight must lie in [0, 1], got {waiting_weight}")
        self.waiting_weight = float(waiting_weight)
        self.difficulty = difficulty
        self.difficulty_file = difficulty_file
        self.imprint = imprint
        self.images_per_class = images_per_class
        self.batch_size = batch_size
        self.seed = seed
        # State saved in checkpoints.
        self.stage_index = -1
        self.stage_start_epoch = 0
        self.stage_start_step = 0
        self.order: list[int] = []
        self.active: list[int] = []
        self.base_lrs: list[float] | None = None
        self.history: list[dict] = []
        self._restored = False

    # ---- checkpointing ---------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return "Curriculum"

    def state_dict(self) -> dict:
        # Plain lists and numbers only: checkpoints load with weights_only=True.
        return {
            "stage_index": self.stage_index,
            "stage_start_epoch": self.stage_start_epoch,
            "stage_start_step": self.stage_start_step,
            "order": list(self.order),
            "active": list(self.active),
            "base_lrs": None if self.base_lrs is None else list(self.base_lrs),
            "history": list(self.history),
            "stages": [asdict(s) for s in self.stages],
            "waiting_weight": self.waiting_weight,
        }

    def load_state_dict(self, state: dict) -> None:
        saved = [Stage(**s) for s in state["stages"]]
        if saved != self.stages:
            raise UserError(
                "the checkpoint was trained with other curriculum stages; resume with the same curriculum "
                f"(saved: {state['stages']})"
            )
        if float(state.get("waiting_weight", 0.0)) != self.waiting_weight:
            raise UserError(
                f"the checkpoint was trained with waiting_weight {state.get('waiting_weight', 0.0)}, this curriculum "
                f"has {self.waiting_weight}; resume with the same curriculum"
            )
        self.stage_index = int(state["stage_index"])
        self.stage_start_epoch = int(state["stage_start_epoch"])
        self.stage_start_step = int(state["stage_start_step"])
        self.order = [int(c) for c in state["order"]]
        self.active = [int(c) for c in state["active"]]
        self.base_lrs = state["base_lrs"]
        self.history = list(state["history"])
        self._restored = self.stage_index >= 0

    # ---- hooks -----------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "set_training_classes"):
            raise TypeError("Curriculum needs a data module with set_training_classes (LandmarkDataModule)")
        self._warn_of_stages_after_the_fit(trainer)
        needed = datamodule.hparams.classes_per_batch * trainer.world_size
        for i, s in enumerate(self.stages):
            count = self._class_count(s, datamodule.num_classes)
            if count < needed and self.waiting_weight == 0:
                raise UserError(
                    f"curriculum stage {i} activates {count} classes, but a global batch needs {needed} distinct "
                    f"classes (classes_per_batch × devices); raise its class_share/class_count"
                )

    def _warn_of_stages_after_the_fit(self, trainer: pl.Trainer) -> None:
        """A stage that starts at or after ``max_epochs`` never runs: the fit measures another
        curriculum than the file describes. A warning, not an error, since a shortened fit (a quick
        check) is a reason to leave a curriculum file as it is. Stages measured in steps end at an
        epoch boundary only known once the loader is built, so the count stops at the first one."""
        if trainer.fast_dev_run or trainer.max_epochs is None or trainer.max_epochs < 0:
            return
        start = 0
        for i, stage in enumerate(self.stages):
            if start >= trainer.max_epochs:
                log.warning("curriculum: stage %d starts at epoch %d, and trainer.max_epochs is %d: stages %d-%d "
                            "never run (the fit ends in stage %d)", i, start, trainer.max_epochs, i,
                            len(self.stages) - 1, i - 1)
                return
            if stage.epochs is None:
                return
            start += stage.epochs

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored:
            # Weights, centers and optimizer state come from the checkpoint; only the switches
            # that are not saved there (loss mask, data module's class set) are set again.
            self._apply(trainer, pl_module, self.stages[self.stage_index])
            log.info("curriculum resumed in stage %d with %d active classes", self.stage_index, len(self.active))
        else:
            self._enter_stage(0, trainer, pl_module)

    def enter_due_stages(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Enter every stage whose start has come (at an epoch start); idempotent.

        Callbacks whose epoch-start work depends on the stage (hard non-landmark mining mines
        against the active classes, with the stage's non-landmark share) call this first, so they
        see this epoch's stage whatever their order in ``trainer.callbacks``.
        """
        while self.stage_index + 1 < len(self.stages) and self._stage_over(trainer):
            self._enter_stage(self.stage_index + 1, trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.enter_due_stages(trainer, pl_module)
        stage = self.stages[self.stage_index]
        pl_module.log_dict(
            {
                "curriculum/stage": float(self.stage_index),
                "curriculum/active_classes": float(len(self.active)),
                "curriculum/nonlandmark_share": float(self._nonlandmark_share(trainer, stage)),
            },
            on_step=False,
            on_epoch=True,
        )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        stage = self.stages[self.stage_index]
        if stage.lr == "keep" or stage.warmup_steps <= 0 or self.base_lrs is None:
            return
        done = trainer.global_step - self.stage_start_step
        if done < stage.warmup_steps:
            self._set_lr(trainer, float(stage.lr) * (done + 1) / stage.warmup_steps)

    # ---- stage logic -----------------------------------------------------------------------

    def _stage_over(self, trainer: pl.Trainer) -> bool:
        stage = self.stages[self.stage_index]
        if stage.epochs is not None:
            return trainer.current_epoch >= self.stage_start_epoch + stage.epochs
        if stage.steps is not None:
            return trainer.global_step >= self.stage_start_step + stage.steps
        return False

    @staticmethod
    def _class_count(stage: Stage, num_classes: int) -> int:
        if stage.class_count is not None:
            return min(stage.class_count, num_classes)
        return max(1, min(num_classes, math.ceil(stage.class_share * num_classes - 1e-9)))

    @staticmethod
    def _nonlandmark_share(trainer: pl.Trainer, stage: Stage) -> float:
        if stage.nonlandmark_share is not None:
            return stage.nonlandmark_share
        return float(trainer.datamodule.hparams.nonlandmark_share)

    def _enter_stage(self, index: int, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = self.stages[index]
        datamodule = trainer.datamodule
        num_classes = datamodule.num_classes
        if self.base_lrs is None and trainer.optimizers:
            self.base_lrs = [float(g.get("initial_lr", g["lr"])) for g in trainer.optimizers[0].param_groups]

        loss = pl_module.loss
        embeds = self.difficulty == "accuracy" or (self.imprint and loss.class_weight_matrix() is not None)
        # The embedding passes' data loaders draw seeds from the global torch RNG: fork it, so the
        # run's own random stream (worker seeds, hence augmentations) is the same with or without
        # the curriculum.
        with torch.random.fork_rng(devices=[]), self._training_batchnorm_statistics(trainer, pl_module, embeds):
            sample = None
            if self.difficulty == "accuracy":
                # The current model (the one at the end of the previous stage) ranks every class.
                sample = self._embed_sample(trainer, pl_module)
            if self.difficulty == "accuracy" or not self.order:
                self.order = self._rank(trainer, sample, num_classes)

            active = set(self.active)
            if stage.classes == "rest":
                # Soft stages only (checked at construction): "active" is the set drawn at the
                # full rate, so it may change places with the waiting one.
                active = set(range(num_classes)) - active
            else:
                target = self._class_count(stage, num_classes)
                if target < len(active):
                    log.warning("curriculum stage %d asks for %d classes but %d are active already; the set never "
                                "shrinks", index, target, len(active))
                for c in self.order:
                    if len(active) >= target:
                        break
                    active.add(c)
            new = sorted(active - set(self.active))
            self.active = sorted(active)

            # Soft stages put every class in the loss from the first step, so all are imprinted then.
            if self.waiting_weight > 0:
                to_imprint = list(range(num_classes)) if index == 0 else []
            else:
                to_imprint = new
            if self.imprint and to_imprint and loss.class_weight_matrix() is not None:
                if sample is None:
                    sample = self._embed_sample(trainer, pl_module, classes=to_imprint)
                loss.imprint(torch.tensor(to_imprint), self._class_means(trainer, sample, to_imprint, loss.embedding_size))
        if stage.lr != "keep" and self.base_lrs is not None and index > 0:
            start = float(stage.lr) / stage.warmup_steps if stage.warmup_steps > 0 else float(stage.lr)
            self._set_lr(trainer, start)

        self.stage_index = index
        self.stage_start_epoch = trainer.current_epoch
        self.stage_start_step = trainer.global_step
        self._apply(trainer, pl_module, stage)
        record = {
            "stage": index, "epoch": trainer.current_epoch, "step": trainer.global_step,
            "active_classes": len(self.active), "new_classes": len(new),
            "nonlandmark_share": self._nonlandmark_share(trainer, stage),
        }
        self.history.append(record)
        log.info("curriculum: %s", record)

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        soft = self.waiting_weight > 0
        pl_module.loss.set_active_classes(None if soft else torch.tensor(self.active, dtype=torch.long))
        trainer.datamodule.set_training_classes(self.active, self._nonlandmark_share(trainer, stage), self.waiting_weight)

    def _set_lr(self, trainer: pl.Trainer, factor: float) -> None:
        for group, base in zip(trainer.optimizers[0].param_groups, self.base_lrs):
            group["lr"] = factor * base

    @contextmanager
    def _training_batchnorm_statistics(self, trainer: pl.Trainer, pl_module: pl.LightningModule, enabled: bool = True):
        """Within: BatchNorm running statistics are those of the training data; restored on exit.

        The class sample is embedded in eval mode, i.e. with the running statistics. Before the
        first optimisation step those are not statistics of this data: the embedding head's
        BatchNorm still has its initial ones (mean 0, variance 1: no centering at all) and a
        pretrained backbone has ImageNet's, while every training step normalises with batch
        statistics. Eval-mode embeddings of the untrained model share one large uncentered
        component that training-mode ones do not have, so the class means imprinted from them
        all lay in one narrow cone (mean pairwise cosine 0.75) and pointed nowhere near the
        embeddings the loss then saw (cosine 0.04 to their own class's, tiny world, 512-d).
        ArcFace then pulled every embedding into that cone (gallery embeddings' mean pairwise
        cosine 0.72 after 60 steps, 0.04 without the callback): the ablation's one-stage run
        collapsed to P@1 0.08 (0.75 without the callback). The center loss trained, more slowly.

        So the running statistics are re-estimated for the embedding passes, in train mode and
        without gradients, as the plain average over batches of a seeded shuffle of up to
        ``_BATCHNORM_IMAGES`` sample images of every class; the original statistics and momenta
        come back on exit, so the callback leaves no trace in the network, only the imprinted
        weights. Later stage starts do the same: the running statistics then follow the training
        batches, but with momentum 0.1 a stage starting after a dozen steps would still carry a
        quarter of the initial ones. Every rank uses the same images, so the ranks agree.
        """
        norms = [m for m in pl_module.modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not enabled or not norms:
            yield
            return
        saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
        was_training = pl_module.training
        try:
            dataset = trainer.datamodule.eval_dataset("gallery")
            positions = self._sample_indices(dataset.labels)
            positions = np.random.default_rng(self.seed).permutation(positions)[: self._BATCHNORM_IMAGES]
            # Train-mode BatchNorm needs ≥ 2 images a batch: near-equal batches, none of one image.
            batches = np.array_split(positions, max(1, math.ceil(len(positions) / self.batch_size)))
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=[b.tolist() for b in batches if len(b)],
                num_workers=trainer.datamodule.hparams.num_workers,
            )
            pl_module.eval()
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the batches
                m.train()
            with torch.no_grad():
                for batch in loader:
                    images = batch["image"][batch["valid"].bool()].to(pl_module.device)
                    if len(images) >= 2:
                        with trainer.precision_plugin.forward_context():
                            pl_module(images)
            pl_module.eval()
            yield
        finally:
            with torch.no_grad():
                for m, (momentum, mean, var, tracked) in zip(norms, saved):
                    m.momentum = momentum
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                    m.num_batches_tracked.copy_(tracked)
            pl_module.train(was_training)

    def _rank(self, trainer: pl.Trainer, sample, num_classes: int) -> list[int]:
        datamodule = trainer.datamodule
        if self.difficulty == "size":
            sizes = np.bincount(datamodule.db_labels, minlength=num_classes).astype(np.float64)
            order = order_by_scores(sizes)
        elif self.difficulty == "random":
            # Every rank draws the same permutation from the same seeds (and rank 0's is used).
            order = np.random.default_rng([self.seed, int(datamodule.hparams.seed)]).permutation(num_classes).tolist()
        elif self.difficulty == "file":
            scores = read_difficulty_file(self.difficulty_file, datamodule.class_map.to_list())
            order = order_by_scores(-scores, np.bincount(datamodule.db_labels, minlength=num_classes))
        else:
            embeddings, labels = sample
            accuracy, compactness = class_accuracy_scores(embeddings.numpy(), labels.numpy(), num_classes)
            order = order_by_scores(accuracy, compactness)
        # Every rank computed the same order from the same data; rank 0's copy is the one used,
        # so a last-bit difference in a gathered float can never split the ranks.
        return [int(c) for c in trainer.strategy.broadcast(order, src=0)]

    def _sample_indices(self, labels: np.ndarray, classes: list[int] | None = None) -> np.ndarray:
        """A fixed, seeded sample of at most ``images_per_class`` gallery images per class."""
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(labels))
        if classes is not None:
            order = order[np.isin(labels[order], classes)]
        by_class = order[np.argsort(labels[order], kind="stable")]
        starts = np.searchsorted(labels[by_class], np.unique(labels[by_class]))
        ends = np.append(starts[1:], len(by_class))
        picks = [by_class[s : min(e, s + self.images_per_class)] for s, e in zip(starts, ends)]
        return np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)

    def _embed_sample(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, classes: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (eval transform, eval mode) of the class sample, gathered over all ranks."""
        dataset = trainer.datamodule.eval_dataset("gallery")
        embeddings, extras = embed_dataset(
            pl_module, dataset, positions=self._sample_indices(dataset.labels, classes), batch_size=self.batch_size,
            num_workers=trainer.datamodule.hparams.num_workers, device=pl_module.device,
            extras=("label", "valid"), forward_context=trainer.precision_plugin.forward_context,
        )
        valid = extras["valid"].bool()
        return embeddings[valid], extras["label"][valid]

    def _class_means(self, trainer: pl.Trainer, sample, classes: list[int], dim: int) -> torch.Tensor:
        embeddings, labels = sample
        means = torch.zeros(len(classes), dim)
        for row, c in enumerate(classes):
            rows = embeddings[labels == c]
            if len(rows):
                means[row] = torch.nn.functional.normalize(rows.mean(dim=0), dim=0)
        missing = [c for row, c in enumerate(classes) if not means[row].any()]
        if missing:
            raise RuntimeError(f"cannot imprint classes {missing[:5]}: none of their sampled images could be read")
        return trainer.strategy.broadcast(means, src=0)
