"""Hard non-landmark mining: the non-landmark photos nearest to the landmarks go into batches more often.

The operating point of the system is a threshold at a false-positive rate of 1e-3: what decides
it are the few non-landmark photos that look most like some landmark. A uniform draw from a pool
of thousands shows those few to the loss rarely. Every ``every_n_epochs`` epochs, this callback
embeds (a seeded sample of) the training non-landmark pool, scores each photo by its highest
cosine to any landmark centre -- the loss's class weights (every sub-center), or, for losses
without them, the mean embedding of a few gallery images per class -- and asks the sampler to
draw ``share`` of each batch's non-landmarks from the ``hard_fraction`` highest-scoring ones.

Only which non-landmarks are drawn changes; the loss decides what to do with them (the center
loss's push term, ArcFace's ``nonlandmark_max_cosine``, contrastive negatives). The step count,
the classes and the landmark images of every batch are those of the run without mining.

With a :class:`callbacks.Curriculum`, mining happens after the curriculum has entered the epoch's
stage, whatever the order of the two callbacks in the configuration: the centres are those of the
classes active in this epoch (their weights just imprinted), and a stage that starts drawing
non-landmarks is mined for at once. Before, a configuration listing the mining first mined against
the previous stage's classes, or not at all in an epoch whose previous stage drew no non-landmarks.

Resumable: the epoch of the last mining round is saved; a fit resumed within that epoch keeps the
hard set the sampler saved rather than mining again with mid-epoch weights.
"""

from __future__ import annotations

import logging

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from callbacks.curriculum import Curriculum
from core.embedding import embed_dataset
from losses.base import nearest_cosine

log = logging.getLogger(__name__)


def hardest_nonlandmarks(nonlandmark_embeddings: torch.Tensor, centres: torch.Tensor, count: int) -> np.ndarray:
    """Rows of ``nonlandmark_embeddings`` with the highest cosine to any of ``centres``, hardest first.

    Args:
        nonlandmark_embeddings: ``[n, d]``.
        centres: ``[c, d]`` landmark centres (any norm: cosines are taken).
        count: how many to return (at most ``n``); ties keep the lower row first.
    """
    if nonlandmark_embeddings.ndim != 2 or centres.ndim != 2 or nonlandmark_embeddings.shape[1] != centres.shape[1]:
        raise ValueError(
            f"need [n, d] embeddings and [c, d] centres, got {tuple(nonlandmark_embeddings.shape)} and {tuple(centres.shape)}"
        )
    scores = nearest_cosine(nonlandmark_embeddings.float(), centres.float())
    order = torch.sort(-scores, stable=True).indices
    return order[: max(0, min(count, len(order)))].numpy()


class HardNonlandmarkMining(pl.Callback):
    """Re-mine the hardest training non-landmarks every ``every_n_epochs`` epochs. See the module docstring.

    Args:
        hard_fraction: share of the (sampled) pool that counts as hard.
        share: share of each batch's non-landmarks drawn from the hard set.
        start_epoch: first epoch that mines (the untrained network's notion of "near" is ImageNet's).
        every_n_epochs: mining period.
        pool_sample: embed at most this many pool images per round (a fresh seeded sample each
            round); ``None``: the whole pool.
        images_per_class: losses without class weights: gallery images per class averaged into a centre.
        batch_size: embedding batch size.
        seed: seed of the samples.
    """

    def __init__(
        self,
        hard_fraction: float = 0.1,
        share: float = 0.5,
        start_epoch: int = 1,
        every_n_epochs: int = 1,
        pool_sample: int | None = 2048,
        images_per_class: int = 4,
        batch_size: int = 256,
        seed: int = 0,
    ):
        if not 0.0 < hard_fraction <= 1.0 or not 0.0 <= share <= 1.0:
            raise ValueError(f"need 0 < hard_fraction <= 1 and 0 <= share <= 1, got {hard_fraction}, {share}")
        if every_n_epochs < 1 or start_epoch < 0 or (pool_sample is not None and pool_sample < 1):
            raise ValueError("need every_n_epochs >= 1, start_epoch >= 0 and pool_sample >= 1 (or null)")
        self.hard_fraction = hard_fraction
        self.share = share
        self.start_epoch = start_epoch
        self.every_n_epochs = every_n_epochs
        self.pool_sample = pool_sample
        self.images_per_class = images_per_class
        self.batch_size = batch_size
        self.seed = seed
        self.mined_epoch = -1
        self.last_scores: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        return "HardNonlandmarkMining"

    def state_dict(self) -> dict:
        return {"mined_epoch": self.mined_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.mined_epoch = int(state["mined_epoch"])

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not hasattr(trainer.datamodule, "set_hard_nonlandmarks"):
            raise TypeError("HardNonlandmarkMining needs a data module with set_hard_nonlandmarks (LandmarkDataModule)")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        due = epoch >= self.start_epoch and (epoch - self.start_epoch) % self.every_n_epochs == 0
        if not due or epoch == self.mined_epoch:
            return
        for callback in trainer.callbacks:
            if isinstance(callback, Curriculum):
                callback.enter_due_stages(trainer, pl_module)
        datamodule = trainer.datamodule
        pool = datamodule.eval_dataset("nonlandmark_pool")
        if len(pool) == 0 or datamodule.nonlandmarks_per_batch() == 0:
            return
        rng = np.random.default_rng([self.seed, epoch])
        positions = np.arange(len(pool))
        if self.pool_sample is not None and self.pool_sample < len(pool):
            positions = np.sort(rng.choice(len(pool), size=self.pool_sample, replace=False))
        embeddings, extras = self._embed(trainer, pl_module, pool, positions)
        valid = extras["valid"].bool()
        positions, embeddings = positions[valid.numpy()], embeddings[valid]
        centres = self._centres(trainer, pl_module)
        count = max(1, int(round(self.hard_fraction * len(positions))))
        chosen = hardest_nonlandmarks(embeddings, centres, count)
        hard = trainer.strategy.broadcast([int(p) for p in positions[chosen]], src=0)
        datamodule.set_hard_nonlandmarks(hard, self.share)
        self.mined_epoch = epoch
        top = nearest_cosine(embeddings[chosen].float(), centres.float())
        self.last_scores = {"hard_min_cosine": float(top.min()), "hard_max_cosine": float(top.max())}
        pl_module.log_dict({f"mining/{k}": v for k, v in self.last_scores.items()}, on_step=False, on_epoch=True)
        log.info("hard non-landmarks: %d of %d sampled (cosine %.3f-%.3f)", len(hard), len(positions),
                 self.last_scores["hard_min_cosine"], self.last_scores["hard_max_cosine"])

    def _embed(self, trainer, pl_module, dataset, positions):
        return embed_dataset(
            pl_module, dataset, positions=positions, batch_size=self.batch_size,
            num_workers=trainer.datamodule.eval_workers,
            device=pl_module.device, extras=("valid",), forward_context=trainer.precision_plugin.forward_context,
        )

    def _centres(self, trainer, pl_module) -> torch.Tensor:
        """``[m, d]``: every active class's weight vector(s), or per-class mean embeddings."""
        loss = pl_module.loss
        weights = loss.class_weight_matrix()
        active = loss.class_active.cpu()
        if weights is not None:
            return weights.cpu()[active].reshape(-1, loss.embedding_size).float()
        gallery = trainer.datamodule.eval_dataset("gallery")
        labels = np.asarray(gallery.labels)
        rng = np.random.default_rng(self.seed)
        picks = [rng.permutation(np.flatnonzero(labels == c))[: self.images_per_class]
                 for c in np.flatnonzero(active.numpy())]
        positions = np.sort(np.concatenate(picks))
        embeddings, extras = self._embed(trainer, pl_module, gallery, positions)
        valid = extras["valid"].bool().numpy()
        sums = torch.zeros(loss.num_classes, embeddings.shape[1])
        sums.index_add_(0, torch.as_tensor(labels[positions][valid]), embeddings[torch.as_tensor(valid)])
        return F.normalize(sums[active], dim=1)
