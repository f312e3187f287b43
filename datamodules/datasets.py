"""Map-style datasets over manifests that never crash a run on one bad photo."""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.images import UnreadableImage, load_rgb

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """Images with integer labels; each sample also carries its dataset index.

    The index lets evaluation gather embeddings across DDP ranks and deduplicate the padding
    that ``DistributedSampler`` adds. An image that fails to decode yields a black placeholder
    with ``valid=False``: batches keep their shape, the loss and the metrics drop it, and the
    count is logged (see ``LandmarkDataModule``'s skip policy).

    Args:
        paths: image files.
        labels: one integer per image (class index, or ``NONLANDMARK``).
        transform: an albumentations pipeline ending in ``ToTensorV2``.
        image_size: placeholder size, and the decode size hint (images are decoded at ≤ 2x it).
    """

    def __init__(self, paths: Sequence[str], labels: np.ndarray, transform: Callable, image_size: int):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        try:
            image = load_rgb(self.paths[index], max_side=2 * self.image_size)
            tensor = self.transform(image=image)["image"]
            valid = True
        except UnreadableImage as err:
            log.warning("skipping unreadable image: %s", err)
            tensor = torch.zeros(3, self.image_size, self.image_size)
            valid = False
        return {"image": tensor, "label": int(self.labels[index]), "index": index, "valid": valid}
