"""Manifests, robust image loading, P×K sampling, the LightningDataModule, dataset readers and
the synthetic world (``datamodules.synth``; its renderer is imported only by who generates a world)."""

from datamodules.landmark_datamodule import LandmarkDataModule
from datamodules.manifest import ClassMap, Manifest, ManifestError, load_manifest, read_image_folder, read_manifest

__all__ = ["ClassMap", "LandmarkDataModule", "Manifest", "ManifestError", "load_manifest", "read_image_folder",
           "read_manifest"]
