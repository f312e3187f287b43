"""Swappable metric losses; YAML selects one with ``class_path: losses.<Name>``."""

from losses.arcface import ArcFaceLoss
from losses.base import MetricLoss
from losses.center import CenterSoftmaxLoss
from losses.contrastive import ContrastiveLoss

__all__ = ["MetricLoss", "ArcFaceLoss", "ContrastiveLoss", "CenterSoftmaxLoss"]
