"""Lightning glue for :mod:`core.launched_ranks`: a fit, validate or predict whose rank 0 raises
stops the ranks it launched instead of leaving them in the rendezvous for 30 minutes."""

from __future__ import annotations

import pytorch_lightning as pl

from core.launched_ranks import remember, stop_launched_ranks


class StopLaunchedRanksOnError(pl.Callback):
    """Remembers the launched ranks once they exist (``setup``) and kills them when rank 0 raises
    (``on_exception``, which Lightning calls for a failure anywhere in the run, the rendezvous
    included). ``landmarks fit|validate|test|predict`` add it to every Trainer."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        remember(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        stop_launched_ranks(trainer)
