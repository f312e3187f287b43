"""Albumentations pipelines for training and evaluation.

Images leave these pipelines as float tensors in [0, 1]; mean/std normalisation belongs to the
model (:class:`lightning_modules.EmbeddingNet`), which knows which pretrained weights it carries,
so a data module never has to be told the backbone's statistics and exported models stay
self-contained.
"""

from __future__ import annotations

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

# Scale to [0, 1] without mean/std: see the module docstring.
_TO_UNIT = A.Normalize(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), max_pixel_value=255.0)


def train_transform(image_size: int, strength: float = 1.0) -> A.Compose:
    """Augmentations for metric learning on landmark photos.

    Crops and colour changes imitate what differs between tourists' photos of one place
    (framing, zoom, light, camera); horizontal flips are kept as is common for landmark
    retrieval training (GLDv2 winners use them) although they mirror asymmetric facades.
    """
    return A.Compose(
        [
            A.RandomResizedCrop(
                size=(image_size, image_size), scale=(max(0.2, 1.0 - 0.6 * strength), 1.0), ratio=(0.75, 1.333)
            ),
            A.HorizontalFlip(p=0.5),
            A.ColorJitter(
                brightness=0.3 * strength, contrast=0.3 * strength, saturation=0.3 * strength, hue=0.05 * strength, p=0.8
            ),
            A.ToGray(p=0.05 * strength),
            A.GaussianBlur(blur_limit=(3, 5), p=0.1 * strength),
            _TO_UNIT,
            ToTensorV2(),
        ]
    )


def eval_transform(image_size: int) -> A.Compose:
    """Whole image, longer side = ``image_size``, padded to a square: nothing of the scene is cut."""
    return A.Compose(
        [
            A.LongestMaxSize(max_size=image_size, interpolation=cv2.INTER_AREA),
            A.PadIfNeeded(min_height=image_size, min_width=image_size, border_mode=cv2.BORDER_CONSTANT, fill=0),
            _TO_UNIT,
            ToTensorV2(),
        ]
    )
