"""Manifests, robust image loading, P×K sampling and the LightningDataModule.

Attributes are imported lazily: ``from datamodules.labels import NONLANDMARK`` (used by the
losses) must not pull in Lightning, albumentations and the synthetic-world generator.
"""

from importlib import import_module

_EXPORTS = {
    "NONLANDMARK": "datamodules.labels",
    "ClassMap": "datamodules.manifest",
    "Manifest": "datamodules.manifest",
    "ManifestError": "datamodules.manifest",
    "load_manifest": "datamodules.manifest",
    "read_image_folder": "datamodules.manifest",
    "read_manifest": "datamodules.manifest",
    "LandmarkDataModule": "datamodules.landmark_datamodule",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
