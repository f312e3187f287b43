"""Inference: a landmark index of shooting-angle centroids with a calibrated threshold, and its users.

``landmarks index`` builds a :class:`LandmarkIndex` (:mod:`recognition.artifact`) from a model and
a landmark database; :class:`Recognizer` answers "which landmark, if any, is in this photo";
``landmarks albums`` groups a photo folder by landmark; :mod:`recognition.export` writes the
embedding network as TorchScript / ONNX.
"""

from recognition.artifact import FORMAT_VERSION, IndexFormatError, LandmarkIndex, ModelMismatchError
from recognition.calibration import Calibration, CalibrationError, calibrate_threshold
from recognition.centroids import CentroidParams, CentroidSet, build_representation, landmark_centroids
from recognition.recognizer import Recognition, Recognizer

__all__ = [
    "FORMAT_VERSION",
    "Calibration",
    "CalibrationError",
    "CentroidParams",
    "CentroidSet",
    "IndexFormatError",
    "LandmarkIndex",
    "ModelMismatchError",
    "Recognition",
    "Recognizer",
    "build_representation",
    "calibrate_threshold",
    "landmark_centroids",
]
