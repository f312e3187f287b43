"""Map-style datasets over manifests that never crash a run on one bad photo."""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.images import UnreadableImage, decode_rgb, load_rgb
from datamodules.manifest import Manifest
from datamodules.shards import ShardReader

log = logging.getLogger(__name__)


def seed_augmentations(dataset, seed: int) -> None:
    """Seed the albumentations pipelines of ``dataset`` (one dataset or a ``ConcatDataset``)."""
    for part in getattr(dataset, "datasets", [dataset]):
        transform = getattr(part, "transform", None)
        if hasattr(transform, "set_random_seed"):
            transform.set_random_seed(int(seed))


def seed_worker_transforms(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give each worker's albumentations pipelines their own seed.

    albumentations 2 keeps a private RNG per pipeline, created in the main process from OS
    entropy; forked workers would all copy it and replay the same augmentations, in every epoch.
    The seed comes from the dataset's ``augment_seed`` (set per epoch by
    :class:`datamodules.sampler.ResumableLoader` from the sampler's seed, epoch and rank) mixed
    with the worker id, so the augmentations are a function of the run's settings alone, the same
    in a resumed run as in an uninterrupted one. Without it, from torch's per-worker seed.
    """
    info = torch.utils.data.get_worker_info()
    base = getattr(info.dataset, "augment_seed", None)
    seed = torch.initial_seed() % 2**32 if base is None else np.random.SeedSequence([base, worker_id]).generate_state(1)[0]
    seed_augmentations(info.dataset, seed)


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

    def decode(self, index: int) -> np.ndarray:
        """The RGB array of image ``index``; raises ``UnreadableImage``. Subclasses crop etc. here."""
        return load_rgb(self.paths[index], max_side=2 * self.image_size)

    def __getitem__(self, index: int) -> dict:
        try:
            image = self.decode(index)
            tensor = self.transform(image=image)["image"]
            valid = True
        except UnreadableImage as err:
            log.warning("skipping unreadable image: %s", err)
            tensor = torch.zeros(3, self.image_size, self.image_size)
            valid = False
        return {"image": tensor, "label": int(self.labels[index]), "index": index, "valid": valid}


class ShardImageDataset(ImageDataset):
    """:class:`ImageDataset` over a shard set (``landmarks prepare shards``): same samples, same
    indices, each image read from its tar shard at the recorded offset (:class:`ShardReader`)."""

    def __init__(self, manifest: Manifest, labels: np.ndarray, transform: Callable, image_size: int):
        super().__init__(manifest.paths, labels, transform, image_size)
        self.reader = ShardReader(manifest)

    def decode(self, index: int) -> np.ndarray:
        return decode_rgb(self.reader.read(index), self.reader.name(index), max_side=2 * self.image_size)


def manifest_dataset(manifest: Manifest, labels: np.ndarray, transform: Callable, image_size: int) -> ImageDataset:
    """The dataset of a manifest's images: from their files, or from its shards when it is a shard set."""
    if manifest.shard_dir is not None:
        return ShardImageDataset(manifest, labels, transform, image_size)
    return ImageDataset(manifest.paths, labels, transform, image_size)
