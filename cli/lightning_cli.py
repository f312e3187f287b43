"""LightningCLI for the landmark model: ``landmarks fit|validate|test|predict --config ...``.

The number of classes is linked from the data module into the model (``link_arguments`` at
instantiation), so no YAML file ever hard-codes it. YAML files may use OmegaConf interpolation
(``${data.image_size}``).
"""

from __future__ import annotations

import netrc
import os

from jsonargparse import set_parsing_settings
from pytorch_lightning.cli import LightningCLI

from datamodules import LandmarkDataModule
from lightning_modules import LandmarkModule


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


# Under subcommands the config root is `fit.`/`validate.`; this keeps `${trainer.max_epochs}` in
# experiment files meaning what it says, whichever subcommand loads them.
set_parsing_settings(omegaconf_absolute_to_relative_paths=True)


class LandmarkCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("model_class", LandmarkModule)
        kwargs.setdefault("datamodule_class", LandmarkDataModule)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # omegaconf+: interpolations resolve after all --config files and overrides are merged.
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf+"})
        # The data module shards batches per rank itself (P×K plan, DistributedSampler for
        # evaluation); Lightning must not replace its batch sampler.
        kwargs.setdefault("trainer_defaults", {"use_distributed_sampler": False})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        choose_wandb_mode()
