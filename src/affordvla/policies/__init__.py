"""Policies: a backbone and a head trained as one, with one contract (base.py) for training, export and
inference. One package per kind: keypoints/ (text and regression heads) and actions/ (continuous heads and
language heads)."""

from affordvla.policies.base import (
    FORMAT_VERSION,
    ActionPrediction,
    KeypointPrediction,
    Observation,
    Policy,
    PolicyFormatError,
    PolicyModule,
    Session,
)
from affordvla.policies.loading import load_policy, read_policy_record

__all__ = ["FORMAT_VERSION", "ActionPrediction", "KeypointPrediction", "Observation", "Policy", "PolicyFormatError",
           "PolicyModule", "Session", "load_policy", "read_policy_record"]
