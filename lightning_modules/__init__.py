"""The landmark CNN and the LightningModule that trains it."""

from lightning_modules.embedding_net import EmbeddingNet, GeM
from lightning_modules.landmark_module import LandmarkModule

__all__ = ["EmbeddingNet", "GeM", "LandmarkModule"]
