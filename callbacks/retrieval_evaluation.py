"""Evaluation callback: FAISS index over the gallery, recognition at fixed false-positive rates.

Whenever Lightning validates or tests (``trainer.check_val_every_n_epoch`` sets how often during
fit), the model embeds the three evaluation sets of the data module — gallery, landmark queries,
distractor queries — in its ``validation_step``/``test_step``. This callback collects those
embeddings with their dataset indices, gathers them across DDP ranks and removes the padding
duplicates (:class:`core.accumulator.EmbeddingAccumulator`, which fails loudly if any
sample is missing), then computes the metrics of :mod:`retrieval.metrics` once, on rank 0, and
logs the same numbers from every rank.

Logged names are ``<stage>/<metric>`` with ``<stage>`` = ``val`` or ``test`` and ``<metric>`` as
documented in :mod:`retrieval.metrics` (e.g. ``val/recall@fpr=1e-03``), plus
``<stage>/unreadable`` (evaluation images skipped because they could not be decoded, over every
evaluation set, the non-landmark pool included when it is one). When an FPR's threshold lies among
near-duplicate scores (:func:`retrieval.metrics.saturation_warning`, e.g. a collapse of dark photos
onto one point) it also logs a warning; ``<stage>/saturated_distractors`` tracks that share.

Those figures decide over every gallery image (kNN). With ``centroid_index=True`` the callback
also scores the decision that ships: the centroid index ``landmarks index`` would build from the
same gallery embeddings, its threshold calibrated as ``landmarks index`` does on the data
module's calibration set when it has one (else on the distractors),
every query decided as :class:`recognition.Recognizer` decides
(:func:`recognition.evaluation.evaluate_centroid_index`). Those figures are logged under
``<stage>/centroid/<metric>`` (e.g. ``val/centroid/recall@fpr=1e-03``, ``val/centroid/gap``,
``val/centroid/n_vectors``). With ``nonlandmark_penalty`` that index carries the non-landmark
penalty of ``landmarks index --nonlandmark-pool``, its pool the data module's training
non-landmarks (``data.evaluate_nonlandmark_pool: true``), and the same index without it, the
control, is logged under ``<stage>/centroid/no_penalty/<metric>``. Both paths make their decisions with :func:`retrieval.decision.decide`.
Plots — the precision–FPR curve and the top-1 score histograms — go to wandb as images when a
WandbLogger is configured, and always to ``<run dir>/plots/`` as PNG files, with the curve's
points in ``<tag>_epoch<NNN>_precision_fpr.csv`` (threshold, fpr, precision, recall). The
distractors with the highest top-1 scores, the few that set the thresholds at low FPR, are listed in
``<tag>_epoch<NNN>_hardest_distractors.csv`` (rank, score, distractor path, the gallery photo it
matched and that photo's landmark) and drawn above their matches in ``..._hardest_distractors.jpg``.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.trainer.states import TrainerFn

from core.accumulator import EmbeddingAccumulator
from core.atomic import atomic_path
from core.errors import UserError
from datamodules.images import UnreadableImage
from recognition.artifact import PenaltyParams
from recognition.calibration import check_calibration_rule
from recognition.centroids import CentroidParams
from recognition.evaluation import evaluate_centroid_index
from retrieval.metrics import evaluate_recognition, format_alpha, hardest_distractors, saturation_warning
from retrieval.plots import plot_hardest_distractors, plot_precision_fpr, plot_score_histograms

log = logging.getLogger(__name__)


# The sets an evaluation cannot do without, and the data module's setting that lists each.
_REQUIRED_SETS = {"gallery": "db_manifest", "queries": "query_manifest"}


def _required_sets(datamodule) -> list[str]:
    """The data module's evaluation sets; UserError unless the gallery and the queries are non-empty.

    Empty sets are the data's fault (a header-only ``queries.csv``, every query photo missing,
    ``data.query_manifest: null``), so one line names them, not a traceback.
    """
    names = datamodule.eval_set_names
    missing = [name for name in _REQUIRED_SETS if name not in names]
    if missing:
        raise UserError(f"RetrievalEvaluation needs non-empty evaluation sets, and {', '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} empty: check "
                        f"{', '.join('data.' + _REQUIRED_SETS[m] for m in missing)} (no rows, or every photo missing)")
    return names


def _check_readable(gathered: dict[str, tuple[np.ndarray, np.ndarray, int]], datamodule=None) -> None:
    """UserError when the gallery or the queries have no photo that could be decoded.

    Unreadable photos are skipped and counted (``<stage>/unreadable``); a set with none left would
    fail deep in the index ("empty gallery") or score nothing, so one line names the manifest.
    """
    for name, key in _REQUIRED_SETS.items():
        embeddings, _, unreadable = gathered[name]
        if len(embeddings) == 0:
            where = f"data.{key}" + (f": {datamodule.hparams.get(key)}" if datamodule is not None else "")
            raise UserError(f"RetrievalEvaluation: none of the {unreadable} {name} photos ({where}) could be decoded; "
                            "check the image files")


class RetrievalEvaluation(Callback):
    """Recall and precision at fixed FPRs, GAP, P@1 and mAP@k, from a FAISS index.

    Args:
        alphas: target false-positive rates; only those the distractor count can resolve are reported.
        top_k: neighbours retrieved per query (for mAP@k).
        user_prior: share of landmark photos in a user's collection, for precision at that prior.
        index: ``flat`` (exact), ``ivf`` or ``hnsw`` (approximate, for large galleries).
        memory_budget_mb: bound on FAISS search buffers; queries are searched in chunks.
        plots: write the precision–FPR curve and score histograms.
        centroid_index: also score the shipped decision (the centroid index of ``landmarks index``
            with its defaults, calibrated on the distractors) under ``<stage>/centroid/``; see the
            module docstring. Costs a clustering of the gallery per evaluation (BENCHMARKS.md).
        centroid_params: the clustering of that index, as ``landmarks index`` is given it
            (fields of :class:`recognition.centroids.CentroidParams`, e.g. ``{distance_threshold:
            0.4}``); default: its defaults.
        nonlandmark_penalty: give the shipped index the non-landmark penalty (fields of
            :class:`recognition.artifact.PenaltyParams`, e.g. ``{}`` for its defaults or
            ``{weight: 0.5}``), with the data module's ``nonlandmark_pool`` evaluation set as its
            pool; null: no penalty. Needs ``centroid_index``.
        calibration_rule: how that index's threshold reads the target FPR, as ``landmarks index
            --calibration-rule``: ``empirical`` (of the calibration photos) or ``conformal`` (of new
            photos, in expectation; :mod:`recognition.calibration`).
        hardest_distractors: with ``plots``, list and draw this many distractors with the highest
            top-1 scores, each with the gallery photo it matched (0: none). At FPR 1e-3 of 5,000
            distractors the threshold lies just above the 6th highest of their scores, so these
            photos are what a change at that operating point has to move.
        recall_interval_resamples: bootstrap resamples for ``recall_low@fpr`` / ``recall_high@fpr``,
            the 95 % interval of each recall over the evaluation set's own sampling (0: none). At
            1e-3 a few distractors set the threshold, so one run's figure carries this much noise
            before any seed changes. 1,000 resamples of the demo's 5,485 scores take about 0.5 s, and
            the cost grows with the set (about 5 s with 50,000 distractors): lower it for large sets.
    """

    def __init__(
        self,
        alphas: Sequence[float] = (1e-2, 1e-3, 1e-4),
        top_k: int = 10,
        user_prior: float | None = 0.01,
        index: Literal["flat", "ivf", "hnsw"] = "flat",
        memory_budget_mb: float = 256.0,
        plots: bool = True,
        centroid_index: bool = False,
        centroid_params: dict | None = None,
        nonlandmark_penalty: dict | None = None,
        calibration_rule: Literal["empirical", "conformal"] = "empirical",
        hardest_distractors: int = 8,
        recall_interval_resamples: int = 1000,
    ):
        super().__init__()
        self.alphas = tuple(alphas)
        self.top_k = top_k
        self.user_prior = user_prior
        self.index = index
        self.memory_budget_mb = memory_budget_mb
        self.plots = plots
        self.centroid_index = centroid_index
        self.centroid_params = CentroidParams(**(centroid_params or {}))  # bad keys fail at construction
        self.nonlandmark_penalty = None if nonlandmark_penalty is None else PenaltyParams(**nonlandmark_penalty)
        self.calibration_rule = check_calibration_rule(calibration_rule)
        if hardest_distractors < 0:
            raise UserError(f"RetrievalEvaluation: hardest_distractors must be >= 0, got {hardest_distractors}")
        self.hardest_distractors = hardest_distractors
        if recall_interval_resamples < 0:
            raise UserError("RetrievalEvaluation: recall_interval_resamples must be >= 0, "
                            f"got {recall_interval_resamples}")
        self.recall_interval_resamples = recall_interval_resamples
        if self.nonlandmark_penalty is not None and not centroid_index:
            raise UserError("RetrievalEvaluation: nonlandmark_penalty applies to the shipped index; "
                            "set centroid_index: true")
        self._accumulators: dict[int, EmbeddingAccumulator] = {}
        self._names: tuple[str, ...] = ()
        # Every evaluation's metrics, for summaries: {"stage", "epoch", "step", **metrics}.
        self.history: list[dict] = []
        self.last_embeddings: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        """Fail now, not after an epoch, if an evaluation set is empty or a callback monitors an FPR
        the distractors cannot resolve."""
        # The fit will evaluate unless told not to: the sets it needs must be there.
        names = _required_sets(trainer.datamodule) if trainer.limit_val_batches != 0 else trainer.datamodule.eval_set_names
        if trainer.fast_dev_run:  # a smoke run: nothing is checkpointed or stopped on metrics
            return
        n_distractors = len(trainer.datamodule.eval_dataset("distractors")) if "distractors" in names else 0
        for callback in trainer.callbacks:
            monitor = getattr(callback, "monitor", None) or ""
            if "@fpr=" not in monitor:
                continue
            alpha = float(monitor.split("@fpr=")[1].split(",")[0])
            if n_distractors * alpha < 1 - 1e-9:
                raise UserError(
                    f"{type(callback).__name__} monitors {monitor!r}, but {n_distractors} distractors cannot "
                    f"resolve FPR {alpha:g} (needs ≥ {int(round(1 / alpha))}); monitor a coarser FPR or val/gap"
                )

    # ---- collecting ------------------------------------------------------------------------

    def _start(self, trainer: pl.Trainer, stage: str) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "eval_set_names"):
            raise RuntimeError("RetrievalEvaluation needs a data module with eval_set_names (LandmarkDataModule)")
        # Checked here, on every rank: failing later on rank 0 alone would leave the others
        # waiting in a collective.
        self._names = _required_sets(datamodule)
        if self.nonlandmark_penalty is not None and "nonlandmark_pool" not in self._names:
            raise UserError("RetrievalEvaluation: nonlandmark_penalty needs the training non-landmark pool as an "
                            "evaluation set: set data.evaluate_nonlandmark_pool: true")
        limit = trainer.limit_val_batches if stage == "val" else trainer.limit_test_batches
        # fast_dev_run / limit_*_batches look at part of each set on purpose (an int is a batch
        # count, a float < 1 a share): then "every sample exactly once" cannot hold, and the
        # metrics are only a smoke test.
        partial = bool(trainer.fast_dev_run) or isinstance(limit, int) or limit < 1.0
        if partial:
            log.warning("RetrievalEvaluation: %s sees only part of the evaluation sets; metrics are partial", stage)
        # Padding duplicates are recomputed in other batches; under reduced precision they agree
        # only to ~1e-2 per component, which is still far from an indexing bug's mismatch.
        atol = 1e-3 if str(trainer.precision).startswith(("32", "64")) else 5e-2
        self._accumulators = {
            i: EmbeddingAccumulator(
                expected_size=None if partial else len(datamodule.eval_dataset(name)), duplicate_atol=atol
            )
            for i, name in enumerate(self._names)
        }

    def _collect(self, outputs: dict, dataloader_idx: int) -> None:
        self._accumulators[dataloader_idx].update(
            outputs["embeddings"].detach(),
            outputs["index"],
            label=outputs["label"],
            valid=outputs["valid"].to(torch.int64),
        )

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start(trainer, "val")

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start(trainer, "test")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs, dataloader_idx)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        # The sanity check sees only a few batches: a partial gallery would fail the count check.
        if not trainer.sanity_checking:
            self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "test")

    # ---- computing -------------------------------------------------------------------------

    def _gather(self) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
        """Per set: (embeddings, labels) of readable samples in dataset order, and the unreadable count."""
        gathered = {}
        self.last_embeddings = {}
        for i, name in enumerate(self._names):
            embeddings, extras = self._accumulators[i].compute()  # collective: every rank calls it
            valid = extras["valid"].bool()
            # Every row in dataset order (unreadable ones all-zero), for reuse without embedding
            # the same photos again (the demo seeds `landmarks index`'s cache with them).
            self.last_embeddings[name] = (torch.where(valid[:, None], embeddings, 0.0).float().numpy(),
                                          valid.numpy())
            gathered[name] = (
                embeddings[valid].float().numpy(),
                extras["label"][valid].numpy(),
                int((~valid).sum()),
            )
        return gathered

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        gathered = self._gather()
        self._accumulators = {}
        # Every rank holds the gathered sets, so every rank refuses together (no rank left waiting).
        _check_readable(gathered, getattr(trainer, "datamodule", None))
        # trainer.log_dir is a collective under DDP (Lightning broadcasts it): every rank asks.
        plot_dir = Path(trainer.log_dir or trainer.default_root_dir) / "plots"
        # Standalone `validate` (e.g. the demo's untrained evaluation) must not overwrite the plots
        # of the fit's epoch 0.
        tag = stage if trainer.state.fn == TrainerFn.FITTING else trainer.state.fn.value
        outcome: dict = {}
        if trainer.is_global_zero:
            try:
                outcome["metrics"] = self._compute(trainer, gathered, stage, plot_dir, tag)
            except Exception as err:  # noqa: BLE001 - re-raised on every rank below
                outcome["error"] = f"{type(err).__name__}: {err}"
                log.exception("RetrievalEvaluation failed on rank 0")
        outcome = trainer.strategy.broadcast(outcome, src=0)
        if "error" in outcome:
            raise RuntimeError(f"RetrievalEvaluation failed on rank 0: {outcome['error']}")
        metrics = outcome["metrics"]
        logged = {f"{stage}/{k}": float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
        pl_module.log_dict(logged, sync_dist=False, add_dataloader_idx=False)
        self.history.append({"stage": stage, "epoch": trainer.current_epoch, "step": trainer.global_step, **metrics})

    def _compute(self, trainer, gathered, stage: str, plot_dir: Path, tag: str) -> dict:
        empty = np.zeros((0, gathered["gallery"][0].shape[1]), np.float32)
        distractors = gathered.get("distractors", (empty, None, 0))[0]
        sets = dict(
            gallery_emb=gathered["gallery"][0], gallery_labels=gathered["gallery"][1],
            query_emb=gathered["queries"][0], query_labels=gathered["queries"][1], distractor_emb=distractors,
            alphas=self.alphas, user_prior=self.user_prior, memory_budget_mb=self.memory_budget_mb,
        )
        result = evaluate_recognition(**sets, k=self.top_k, index_kind=self.index,
                                      interval_resamples=self.recall_interval_resamples)
        warning = saturation_warning(result.metrics)
        if warning:
            log.warning("%s, epoch %d: %s", stage, trainer.current_epoch, warning)
        result.metrics["unreadable"] = float(sum(g[2] for g in gathered.values()))
        if self.centroid_index:
            # The same sets through the decision that ships (centroid index + calibrated threshold).
            # With a calibration set (LandmarkDataModule.calibration_manifest) the threshold is
            # calibrated there, as `landmarks index --nonlandmarks` does, and the distractors measure
            # the false-positive rate it achieves on photos it never saw.
            calibration = gathered["calibration"][0] if "calibration" in gathered else None
            penalty = {} if self.nonlandmark_penalty is None else dict(
                penalty_pool_emb=gathered["nonlandmark_pool"][0], penalty=self.nonlandmark_penalty)
            shipped = evaluate_centroid_index(**sets, calibration_emb=calibration, params=self.centroid_params,
                                              calibration_rule=self.calibration_rule, **penalty)
            result.metrics.update({f"centroid/{name}": value for name, value in shipped.items()})
        if self.plots:
            self._plot(trainer, result, stage, plot_dir, tag)
        return result.metrics

    def _plot(self, trainer: pl.Trainer, result, stage: str, plot_dir: Path, tag: str) -> None:
        plot_dir.mkdir(parents=True, exist_ok=True)
        stem = plot_dir / f"{tag}_epoch{trainer.current_epoch:03d}"
        figures = {"precision_fpr.png": plot_precision_fpr(result), "score_histograms.png": plot_score_histograms(result)}
        if self.hardest_distractors and len(result.distractor_scores):
            # A sheet of photos: JPEG, a quarter of the size (about 95 KB against 430 KB as PNG).
            figures["hardest_distractors.jpg"] = self._hardest_distractors(
                trainer, result, Path(f"{stem}_hardest_distractors.csv"))
        for filename, figure in figures.items():
            target = Path(f"{stem}_{filename}")
            with atomic_path(target) as tmp:
                figure.savefig(tmp, dpi=100, **({"pil_kwargs": {"quality": 85}} if target.suffix == ".jpg" else {}))
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=f"{stage}/{Path(filename).stem}", images=[str(target)], step=trainer.global_step)
        # The curve as numbers too, so `landmarks compare` can overlay runs without wandb.
        curve = result.curve()
        with atomic_path(Path(f"{stem}_precision_fpr.csv")) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["threshold", "fpr", "precision", "recall"])
            writer.writerows(zip(*(np.asarray(a).tolist() for a in (curve.thresholds, curve.fpr, curve.precision, curve.recall))))

    def _hardest_distractors(self, trainer: pl.Trainer, result, table: Path):
        """Write the top-scoring distractors and their matches to ``table`` (CSV); return their figure."""
        datamodule = trainer.datamodule
        distractors, gallery = datamodule.eval_dataset("distractors"), datamodule.eval_dataset("gallery")
        # The metrics saw readable rows only; map them back to dataset rows, hence to files.
        distractor_rows = np.flatnonzero(self.last_embeddings["distractors"][1])
        gallery_rows = np.flatnonzero(self.last_embeddings["gallery"][1])
        if len(distractor_rows) != len(result.distractor_scores):
            raise RuntimeError(f"{len(result.distractor_scores)} distractor scores for {len(distractor_rows)} readable distractors")
        class_map = getattr(datamodule, "class_map", None)
        thresholds = {format_alpha(a): result.metrics.get(f"threshold@fpr={format_alpha(a)}")
                      for a in result.alphas if a not in result.unresolved_alphas}
        rows, pairs = [], []
        for rank, d in enumerate(hardest_distractors(result.distractor_scores, self.hardest_distractors), 1):
            d_row, g_row = int(distractor_rows[d]), int(gallery_rows[result.distractor_matches[d]])
            label = int(gallery.labels[g_row])
            landmark = class_map.landmark_ids[label] if class_map is not None else str(label)
            score = float(result.distractor_scores[d])
            rows.append([rank, f"{score:.6f}", distractors.paths[d_row], gallery.paths[g_row], landmark])
            pairs.append((_thumbnail(distractors, d_row), _thumbnail(gallery, g_row), score, landmark))
        with atomic_path(table) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["rank", "score", "distractor", "matched_gallery_photo", "matched_landmark"])
            writer.writerows(rows)
        return plot_hardest_distractors(pairs, thresholds)

    @property
    def last_metrics(self) -> dict | None:
        return self.history[-1] if self.history else None


def _thumbnail(dataset, row: int) -> np.ndarray | None:
    """The photo as the dataset decodes it, or ``None`` if it cannot be read (a blank tile)."""
    try:
        return dataset.decode(row)
    except UnreadableImage:
        return None
