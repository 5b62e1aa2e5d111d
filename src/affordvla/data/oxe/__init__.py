"""Open X-Embodiment RLDS datasets, streamed from TFRecord shards without TensorFlow.

- specs: one spec per dataset (published feature layout, camera roles, action and gripper conventions) and
  OpenVLA's named mixtures;
- transforms: the shared standardisation into 7-D end-effector actions (xyz, rpy deltas, gripper 1 = open);
- rlds: dataset folders as TFDS writes them, their shards checked against dataset_info.json;
- stream: windows and the weighted, sharded mixture stream;
- datamodule: a mixture for training through per-dataset HDF5 caches.
"""

from affordvla.data.oxe.rlds import (
    TRAIN_FRACTION_WITHOUT_VAL,
    RLDSDataset,
    features_json,
    read_features,
    write_rlds_dataset,
)
from affordvla.data.oxe.specs import MIXTURES, SPECS, DatasetSpec, Feature, Slice, resolve_mixture
from affordvla.data.oxe.stream import OXEMixtureStream, episode_windows, mixture_weights, stream_mixture
from affordvla.data.oxe.transforms import (
    Episode,
    OXEFormatError,
    apply_gripper_rule,
    binarize_gripper,
    decode_codepoints,
    quaternion_to_euler,
    relative_to_absolute_gripper,
    standardize,
)

__all__ = [
    "MIXTURES", "SPECS", "TRAIN_FRACTION_WITHOUT_VAL", "DatasetSpec", "Episode", "Feature", "OXEFormatError",
    "OXEMixtureStream", "RLDSDataset", "Slice", "apply_gripper_rule", "binarize_gripper", "decode_codepoints",
    "episode_windows", "features_json", "mixture_weights", "quaternion_to_euler", "read_features",
    "relative_to_absolute_gripper", "resolve_mixture", "standardize", "stream_mixture", "write_rlds_dataset",
]
