"""The keypoint policy kind: a backbone and a keypoint head (text or regression) trained on KeypointSample
batches (`KeypointPolicyModule`), and loaded for inference as a `KeypointPolicy` (`load`, which
policies.loading.load_policy calls for exports of kind "keypoints")."""

from affordvla.policies.keypoints.inference import KeypointPolicy, KeypointSession
from affordvla.policies.keypoints.loading import (
           KeypointSettings,
           build,
           load,
           read_settings,
)
from affordvla.policies.keypoints.modeling import KEYPOINT_HEADS, KeypointPolicyModule
from affordvla.policies.keypoints.processing import KeypointBatchCollator

__all__ = ["KEYPOINT_HEADS", "KeypointBatchCollator", "KeypointPolicy", "KeypointPolicyModule", "KeypointSession",
           "KeypointSettings", "build", "load", "read_settings"]
