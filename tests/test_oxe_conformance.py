"""Open X-Embodiment conformance: a bridge_orig folder laid out as OpenVLA's download holds it (TFDS's
dataset_info.json and features.json written by hand here), actions of five datasets checked against numbers
worked out by hand from OpenVLA's standardisation rules, and every standardiser on a two-episode fixture of its
dataset's published keys and shapes."""

import io
import json
import zlib

import numpy as np
import pytest
from PIL import Image

from affordvla.data.oxe import SPECS, OXEFormatError, RLDSDataset, read_features, write_rlds_dataset
from affordvla.data.tfrecord import encode_example, write_records
from affordvla.offline.toy_oxe import synthetic_episode


def _jpeg(value, shape=(16, 16)):
    buffer = io.BytesIO()
    Image.fromarray(np.full((*shape, 3), value, np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _image(h, w):
    return {"pythonClassName": "tensorflow_datasets.core.features.image_feature.Image",
            "image": {"shape": {"dimensions": [str(h), str(w), "3"]}, "dtype": "uint8", "encodingFormat": "jpeg"},
            "description": "Main camera RGB observation."}


def _tensor(dims, dtype="float32"):
    return {"pythonClassName": "tensorflow_datasets.core.features.tensor_feature.Tensor",
            "tensor": {"shape": {"dimensions": [str(d) for d in dims]} if dims else {}, "dtype": dtype,
                       "encoding": "none"}}


def _dict(features):
    return {"pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
            "featuresDict": {"features": features}}


# features.json of Bridge V2 as TFDS writes it (the per-step features this reader cares about, plus metadata)
BRIDGE_FEATURES = _dict({
    "steps": {"pythonClassName": "tensorflow_datasets.core.features.dataset_feature.Dataset",
              "sequence": {"feature": _dict({
                  "observation": _dict({"image_0": _image(256, 256), "image_1": _image(256, 256),
                                        "state": _tensor([7])}),
                  "action": _tensor([7]),
                  "language_instruction": {"pythonClassName": "tensorflow_datasets.core.features.text_feature.Text",
                                           "text": {}},
                  "is_first": _tensor([], "bool"), "is_last": _tensor([], "bool"), "is_terminal": _tensor([], "bool"),
                  "reward": _tensor([]), "discount": _tensor([])}),
                  "length": "-1"}},
    "episode_metadata": _dict({"file_path": {"pythonClassName": "tensorflow_datasets.core.features.text_feature.Text",
                                             "text": {}},
                               "episode_id": _tensor([], "int32")}),
})

# the four bridge steps worked through below: state (x y z roll pitch yaw gripper) and action's gripper column
BRIDGE_STATE = [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
                [0.1, 0.2, 0.3, 0.01, 0.02, 0.03, 1.0],
                [0.15, 0.2, 0.25, 0.01, 0.02, 0.05, 1.0],
                [0.15, 0.3, 0.25, 0.0, 0.02, 0.05, 0.0]]
BRIDGE_GRIPPER = [0.0, 0.97, 0.5, 0.02]


def _bridge_episode(instruction="put the spoon in the pot", offset=0):
    action = np.full((4, 7), 0.9, np.float32)  # the stored arm action is replaced by the state's deltas
    action[:, 6] = BRIDGE_GRIPPER
    state = np.array(BRIDGE_STATE, np.float32) + offset
    return {"steps/observation/image_0": [_jpeg(10 * t) for t in range(4)],
            "steps/observation/image_1": [_jpeg(200) for _ in range(4)],
            "steps/observation/state": state.reshape(-1), "steps/action": action.reshape(-1),
            "steps/language_instruction": [instruction.encode()] * 4,
            "steps/is_first": np.array([1, 0, 0, 0]), "steps/is_last": np.array([0, 0, 0, 1]),
            "steps/is_terminal": np.array([0, 0, 0, 1]), "steps/reward": np.array([0, 0, 0, 1], np.float32),
            "steps/discount": np.ones(4, np.float32),
            "episode_metadata/file_path": [b"/raw/bridge/traj0.pkl"], "episode_metadata/episode_id": np.array([7])}


@pytest.fixture
def bridge_download(tmp_path):
    """bridge_orig/1.0.0/ as OpenVLA's download: shards named after dataset_info.json's `bridge_dataset`."""
    path = tmp_path / "bridge_orig" / "1.0.0"
    path.mkdir(parents=True)
    shard0 = write_records(path / "bridge_dataset-train.tfrecord-00000-of-00002",
                           [encode_example(_bridge_episode()), encode_example(_bridge_episode("wipe", 1.0))])
    shard1 = write_records(path / "bridge_dataset-train.tfrecord-00001-of-00002",
                           [encode_example(_bridge_episode("open the drawer", 2.0))])
    val = write_records(path / "bridge_dataset-val.tfrecord-00000-of-00001", [encode_example(_bridge_episode("x"))])
    info = {
        "citation": "@inproceedings{walke2023bridgedata}", "description": "BridgeData V2",
        "fileFormat": "tfrecord", "moduleName": "bridge_dataset.bridge_dataset_dataset_builder",
        "name": "bridge_dataset", "releaseNotes": {"1.0.0": "Initial release."},
        "splits": [
            {"filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}", "name": "train",
             "numBytes": str(shard0.stat().st_size + shard1.stat().st_size), "shardLengths": ["2", "1"]},
            {"filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}", "name": "val",
             "numBytes": str(val.stat().st_size), "shardLengths": ["1"]},
        ],
        "version": "1.0.0",
    }
    (path / "dataset_info.json").write_text(json.dumps(info, indent=2))
    (path / "features.json").write_text(json.dumps(BRIDGE_FEATURES, indent=2))
    return tmp_path


def test_bridge_download_layout_and_hand_worked_actions(bridge_download):
    data = RLDSDataset.open(bridge_download, "bridge_orig")
    assert data.tfds_name == "bridge_dataset" and data.shard_lengths("train") == [2, 1]
    assert [p.name for p in data.splits["train"]] == ["bridge_dataset-train.tfrecord-00000-of-00002",
                                                       "bridge_dataset-train.tfrecord-00001-of-00002"]
    assert read_features(data.path / "features.json")["steps/observation/image_0"] == ("image", (256, 256, 3))
    episode = next(data.episodes("train"))
    # step 0 dropped; gripper over steps 1-3: 0.97 -> 1, 0.5 -> next decided (0.02 -> 0), 0.02 -> 0;
    # arm = state[t+1] - state[t] over steps 1-3, the last step (no next state) dropped
    np.testing.assert_allclose(episode.actions, [[0.05, 0.0, -0.05, 0.0, 0.0, 0.02, 1.0],
                                                 [0.0, 0.1, 0.0, -0.01, 0.0, 0.0, 0.0]], atol=1e-6)
    assert episode.instruction == "put the spoon in the pot"
    assert [round(float(f.mean())) for f in episode.images] == [10, 20]  # frames of steps 1 and 2
    assert [e.instruction for e in data.episodes("val")] == ["x"]


def _fractal_like(images_key, gripper, instruction="pick coke can"):
    world = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [-0.1, -0.2, -0.3], [0.0, 0.0, 0.1]], np.float32)
    rotation = np.array([[0.01, 0.02, 0.03], [0.0, 0.0, 0.0], [-0.01, 0.0, 0.01], [0.0, 0.5, 0.0]], np.float32)
    return {images_key: [_jpeg(50) for _ in range(len(gripper))],
            "steps/action/world_vector": world[: len(gripper)].reshape(-1),
            "steps/action/rotation_delta": rotation[: len(gripper)].reshape(-1),
            "steps/action/gripper_closedness_action": np.array(gripper, np.float32),
            "steps/observation/natural_language_instruction": [instruction.encode()] * len(gripper)}


def _read_one(tmp_path, name, episode):
    write_rlds_dataset(tmp_path, name, {"train": [episode]}, shards=1)
    return next(RLDSDataset.open(tmp_path, name).episodes("train"))


def test_fractal_hand_worked_actions(tmp_path):
    # gripper_closedness_action +1 closes, -1 opens: 0 (before the first command: the opposite of closing, open),
    # +1 (closed), 0 (stays closed), -1 (open)
    episode = _read_one(tmp_path, "fractal20220817_data",
                        _fractal_like("steps/observation/image", [0.0, 1.0, 0.0, -1.0]))
    np.testing.assert_allclose(episode.actions, [[0.1, 0.2, 0.3, 0.01, 0.02, 0.03, 1.0],
                                                 [0.4, 0.5, 0.6, 0.0, 0.0, 0.0, 0.0],
                                                 [-0.1, -0.2, -0.3, -0.01, 0.0, 0.01, 0.0],
                                                 [0.0, 0.0, 0.1, 0.0, 0.5, 0.0, 1.0]], atol=1e-7)
    assert episode.instruction == "pick coke can"


def test_kuka_hand_worked_actions(tmp_path):
    # the first command opens (-1), so the gripper was closed before it; 0.05 is under the 0.1 threshold
    episode = _read_one(tmp_path, "kuka", _fractal_like("steps/observation/image", [0.05, 0.0, -1.0]))
    np.testing.assert_allclose(episode.actions, [[0.1, 0.2, 0.3, 0.01, 0.02, 0.03, 0.0],
                                                 [0.4, 0.5, 0.6, 0.0, 0.0, 0.0, 0.0],
                                                 [-0.1, -0.2, -0.3, -0.01, 0.0, 0.01, 1.0]], atol=1e-7)


def test_zlib_encoded_tensors_are_read(tmp_path):
    # TFDS tensors with encoding "zlib" (kuka stores some so) hold one compressed float32 buffer per step
    episode = _fractal_like("steps/observation/image", [0.0, 1.0])
    world = episode["steps/action/world_vector"].reshape(2, 3)
    episode["steps/action/world_vector"] = [zlib.compress(row.astype("<f4").tobytes()) for row in world]
    read = _read_one(tmp_path, "fractal20220817_data", episode)
    np.testing.assert_allclose(read.actions[:, :3], [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], atol=1e-7)


def test_taco_play_hand_worked_actions(tmp_path):
    # rel_actions_world: xyz, rpy, gripper -1 close / +1 open, clipped to [0, 1]
    rel = np.array([[0.01, 0.02, 0.03, 0.1, 0.2, 0.3, -1.0], [-0.01, 0.0, 0.02, 0.0, -0.1, 0.0, 1.0]], np.float32)
    episode = _read_one(tmp_path, "taco_play", {
        "steps/observation/rgb_static": [_jpeg(30, (150, 200)), _jpeg(40, (150, 200))],
        "steps/observation/rgb_gripper": [_jpeg(90, (84, 84))] * 2,
        "steps/observation/robot_obs": np.zeros(2 * 15, np.float32),
        "steps/action/rel_actions_world": rel.reshape(-1),
        "steps/observation/natural_language_instruction": [b"open the drawer"] * 2})
    np.testing.assert_allclose(episode.actions, [[0.01, 0.02, 0.03, 0.1, 0.2, 0.3, 0.0],
                                                 [-0.01, 0.0, 0.02, 0.0, -0.1, 0.0, 1.0]], atol=1e-7)
    assert episode.images.shape == (2, 150, 200, 3) and episode.instruction == "open the drawer"


def test_language_table_hand_worked_actions(tmp_path):
    # a 2-D planar action, the rest zero, the gripper always open; the instruction is code points padded with 0
    text = "push the red star to the left"
    codepoints = np.zeros((2, 512), np.int64)
    codepoints[:, : len(text)] = [ord(c) for c in text]
    episode = _read_one(tmp_path, "language_table", {
        "steps/observation/rgb": [_jpeg(60, (360, 640))] * 2,
        "steps/action": np.array([0.01, -0.02, 0.03, 0.04], np.float32),
        "steps/observation/instruction": codepoints.reshape(-1),
        "steps/observation/effector_translation": np.zeros(4, np.float32)})
    np.testing.assert_allclose(episode.actions, [[0.01, -0.02, 0, 0, 0, 0, 1], [0.03, 0.04, 0, 0, 0, 0, 1]], atol=1e-7)
    assert episode.instruction == text


@pytest.mark.parametrize("name", sorted(n for n, spec in SPECS.items() if spec.name == n))  # aliases left out
def test_every_standardiser_on_its_published_layout(tmp_path, name):
    spec = SPECS[name]
    rng = np.random.default_rng(0)
    episodes = [synthetic_episode(spec, 5, rng, f"task {i}") for i in range(2)]  # frames at the published shapes
    write_rlds_dataset(tmp_path, name, {"train": episodes}, shards=2)
    data = RLDSDataset.open(tmp_path, name)
    features = read_features(data.path / "features.json")
    for feature in spec.features:  # the fixture carries the dataset's keys with their published shapes
        assert features[f"steps/{feature.key}"][1] == (feature.shape if feature.kind != "text" else ())
    native = next(data.episodes("train", cameras=tuple(spec.images)))  # frames as stored, not resized
    declared = {role: next(f.shape for f in spec.features if f.key == key) for role, key in spec.images.items()}
    assert {"primary": native.images.shape[1:], **{r: v.shape[1:] for r, v in native.extra_images.items()}} == declared
    read = list(data.episodes("train", cameras=("primary", "wrist"), image_size=16))
    assert [e.instruction for e in read] == ["task 0", "task 1"]
    for episode, raw in zip(read, episodes):
        steps = 3 if spec.relabel_from_state else 5
        assert episode.actions.shape == (steps, 7) and np.isfinite(episode.actions).all()
        assert set(np.unique(episode.actions[:, 6])) <= {0.0, 1.0}
        assert episode.images.shape == (steps, 16, 16, 3) and episode.extra_images["wrist"].shape == (steps, 16, 16, 3)
        if not spec.relabel_from_state:  # the translation is the stored one, where the spec says it sits
            stored = np.asarray(raw[f"steps/{spec.xyz.key}"], np.float32).reshape(5, -1)
            xyz = stored[:, spec.xyz.start:spec.xyz.start + spec.xyz.count]
            np.testing.assert_array_equal(episode.actions[:, : xyz.shape[1]], xyz)
        if "wrist" not in spec.images:
            assert not episode.extra_images["wrist"].any()


def test_quaternion_actions_become_roll_pitch_yaw(tmp_path):
    # furniture_bench: xyz, an xyzw quaternion, gripper (+1 close): a 90 degree turn about z is yaw pi/2
    half = np.sqrt(0.5)
    action = np.array([[0.1, 0.0, 0.0, 0.0, 0.0, half, half, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, -1.0]],
                      np.float32)
    episode = _read_one(tmp_path, "furniture_bench_dataset_converted_externally_to_rlds", {
        "steps/observation/image": [_jpeg(5, (224, 224))] * 2, "steps/observation/wrist_image": [_jpeg(5)] * 2,
        "steps/action": action.reshape(-1), "steps/observation/state": np.zeros(70, np.float32),
        "steps/language_instruction": [b"insert the leg"] * 2})
    np.testing.assert_allclose(episode.actions, [[0.1, 0, 0, 0, 0, np.pi / 2, 0.0], [0, 0, 0, 0, 0, 0, 1.0]], atol=1e-6)


def test_episodes_without_language_are_left_out_and_counted(tmp_path):
    labelled = _fractal_like("steps/observation/image", [0.0, 0.0])
    empty = _fractal_like("steps/observation/image", [0.0, 0.0], instruction="")
    flagged = dict(labelled, **{"episode_metadata/has_language": np.array([0])})
    write_rlds_dataset(tmp_path, "fractal20220817_data", {"train": [empty, labelled, flagged]}, shards=1)
    data = RLDSDataset.open(tmp_path, "fractal20220817_data")
    unlabeled = []
    kept = list(data.episodes("train", unlabeled=unlabeled))
    assert len(kept) == 1 and [w.split(", ")[-1] for w in unlabeled] == ["record 0", "record 2"]
    assert len(list(data.episodes("train", skip_unlabeled=False))) == 3
    assert data.action_statistics(tmp_path / "stats")["episodes"] == 1


def test_shards_are_checked_against_dataset_info_up_front(bridge_download):
    path = bridge_download / "bridge_orig" / "1.0.0"
    shard = path / "bridge_dataset-train.tfrecord-00000-of-00002"
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) - 10])  # a download cut mid-record
    with pytest.raises(OXEFormatError, match=r"dataset bridge_orig: .*00000-of-00002: record 1 at byte \d+: truncated"):
        RLDSDataset.open(bridge_download, "bridge_orig")
    first = raw[: 12 + int.from_bytes(raw[:8], "little") + 4]
    shard.write_bytes(first)  # intact framing, one episode where dataset_info.json says two
    with pytest.raises(OXEFormatError, match=r"shard .*00000-of-00002 holds 1 episodes, dataset_info.json says 2"):
        RLDSDataset.open(bridge_download, "bridge_orig")


# Per-step shapes as TFDS's catalog pages (docs/catalog/<name>.md of tensorflow/datasets) list them, written out by
# hand: bridge_orig (the project-site release) from its features.json above; furniture_bench, whose page the catalog
# lacks, from the FurnitureBench docs (224 px cameras) and the slices OpenVLA takes (8-D action, 35-D state).
PUBLISHED_SHAPES = {
    "fractal20220817_data": {"observation/image": (256, 320, 3), "action/world_vector": (3,),
                             "action/rotation_delta": (3,), "action/gripper_closedness_action": (1,),
                             "observation/base_pose_tool_reached": (7,), "observation/gripper_closed": (1,)},
    "kuka": {"observation/image": (512, 640, 3), "action/world_vector": (3,), "action/rotation_delta": (3,),
             "action/gripper_closedness_action": (1,)},
    "bridge_orig": {"observation/image_0": (256, 256, 3), "observation/image_1": (256, 256, 3),
                    "observation/state": (7,), "action": (7,)},
    "taco_play": {"observation/rgb_static": (150, 200, 3), "observation/rgb_gripper": (84, 84, 3),
                  "observation/robot_obs": (15,), "action/rel_actions_world": (7,)},
    "jaco_play": {"observation/image": (224, 224, 3), "observation/image_wrist": (224, 224, 3),
                  "action/world_vector": (3,), "action/gripper_closedness_action": (1,),
                  "observation/end_effector_cartesian_pos": (7,)},
    "berkeley_cable_routing": {"observation/image": (128, 128, 3), "observation/wrist45_image": (128, 128, 3),
                               "action/world_vector": (3,), "action/rotation_delta": (3,),
                               "observation/robot_state": (7,)},
    "roboturk": {"observation/front_rgb": (480, 640, 3), "action/world_vector": (3,), "action/rotation_delta": (3,),
                 "action/gripper_closedness_action": (1,)},
    "viola": {"observation/agentview_rgb": (224, 224, 3), "observation/eye_in_hand_rgb": (224, 224, 3),
              "action/world_vector": (3,), "action/rotation_delta": (3,), "action/gripper_closedness_action": ()},
    "berkeley_autolab_ur5": {"observation/image": (480, 640, 3), "observation/hand_image": (480, 640, 3),
                             "action/world_vector": (3,), "action/rotation_delta": (3,),
                             "action/gripper_closedness_action": (), "observation/robot_state": (15,)},
    "toto": {"observation/image": (480, 640, 3), "action/world_vector": (3,), "action/rotation_delta": (3,),
             "action/open_gripper": (), "observation/state": (7,)},
    "language_table": {"observation/rgb": (360, 640, 3), "action": (2,), "observation/instruction": (512,),
                       "observation/effector_translation": (2,)},
    "stanford_hydra_dataset_converted_externally_to_rlds": {
        "observation/image": (240, 320, 3), "observation/wrist_image": (240, 320, 3), "action": (7,),
        "observation/state": (27,)},
    "austin_buds_dataset_converted_externally_to_rlds": {
        "observation/image": (128, 128, 3), "observation/wrist_image": (128, 128, 3), "action": (7,),
        "observation/state": (24,)},
    "nyu_franka_play_dataset_converted_externally_to_rlds": {
        "observation/image": (128, 128, 3), "action": (15,), "observation/state": (13,)},
    "furniture_bench_dataset_converted_externally_to_rlds": {
        "observation/image": (224, 224, 3), "observation/wrist_image": (224, 224, 3), "action": (8,),
        "observation/state": (35,)},
    "ucsd_kitchen_dataset_converted_externally_to_rlds": {
        "observation/image": (480, 640, 3), "action": (8,), "observation/state": (21,)},
    "austin_sailor_dataset_converted_externally_to_rlds": {
        "observation/image": (128, 128, 3), "observation/wrist_image": (128, 128, 3), "action": (7,),
        "observation/state": (8,)},
    "austin_sirius_dataset_converted_externally_to_rlds": {
        "observation/image": (84, 84, 3), "observation/wrist_image": (84, 84, 3), "action": (7,),
        "observation/state": (8,)},
    "dlr_edan_shared_control_converted_externally_to_rlds": {
        "observation/image": (360, 640, 3), "action": (7,), "observation/state": (7,)},
    "iamlab_cmu_pickup_insert_converted_externally_to_rlds": {
        "observation/image": (360, 640, 3), "observation/wrist_image": (240, 320, 3), "action": (8,),
        "observation/state": (20,)},
    "utaustin_mutex": {"observation/image": (128, 128, 3), "observation/wrist_image": (128, 128, 3), "action": (7,),
                       "observation/state": (24,)},
    "berkeley_fanuc_manipulation": {"observation/image": (224, 224, 3), "observation/wrist_image": (224, 224, 3),
                                    "action": (6,), "observation/state": (13,)},
    "cmu_stretch": {"observation/image": (128, 128, 3), "action": (8,), "observation/state": (4,)},
    "bc_z": {"observation/image": (171, 213, 3), "action/future/xyz_residual": (30,),
             "action/future/axis_angle_residual": (30,), "action/future/target_close": (10,),
             "observation/present/xyz": (3,), "observation/present/axis_angle": (3,),
             "observation/present/sensed_close": (1,)},
    "fmb_dataset": {"observation/image_side_1": (256, 256, 3), "observation/image_side_2": (256, 256, 3),
                    "observation/image_wrist_1": (256, 256, 3), "action": (7,), "observation/eef_pose": (7,),
                    "observation/state_gripper_pose": ()},
    "dobbe": {"observation/wrist_image": (256, 256, 3), "action": (7,), "observation/state": (7,)},
}


@pytest.mark.parametrize("name", sorted(n for n, spec in SPECS.items() if spec.name == n))
def test_spec_shapes_are_the_published_ones(name):
    spec = SPECS[name]
    assert {f.key: f.shape for f in spec.features if f.kind != "text"} == PUBLISHED_SHAPES[name]


# (dataset, stored action rows, gripper-state column where the gripper comes from the state, standardised rows),
# each worked out by hand from OpenVLA's transform for the dataset
FLAT_CASES = [
    # 1 closes: inverted, no clip
    ("stanford_hydra_dataset_converted_externally_to_rlds",
     [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], None,
     [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.0], [0, 0, 0, 0, 0, 0, 1.0]]),
    ("dlr_edan_shared_control_converted_externally_to_rlds",
     [[0.5, -0.1, 0.7, 0.3, 0.2, 0.1, 1.0], [0.5, -0.1, 0.6, 0.3, 0.2, 0.1, 0.0]], None,
     [[0.5, -0.1, 0.7, 0.3, 0.2, 0.1, 0.0], [0.5, -0.1, 0.6, 0.3, 0.2, 0.1, 1.0]]),
    # +1 closes, -1 opens: clipped to [0, 1], then inverted
    ("austin_buds_dataset_converted_externally_to_rlds",
     [[0.1, 0.0, 0.0, 0.0, 0.0, 0.2, 1.0], [0.0, 0.3, 0.0, 0.0, 0.0, 0.0, -1.0]], None,
     [[0.1, 0, 0, 0, 0, 0.2, 0.0], [0, 0.3, 0, 0, 0, 0, 1.0]]),
    ("austin_sailor_dataset_converted_externally_to_rlds",
     [[0.1, 0.0, 0.0, 0.0, 0.0, 0.2, -1.0], [0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 1.0]], None,
     [[0.1, 0, 0, 0, 0, 0.2, 1.0], [0, 0.3, 0, 0, 0, 0, 0.0]]),
    ("austin_sirius_dataset_converted_externally_to_rlds",
     [[0.1, 0.0, 0.0, 0.0, 0.0, 0.2, -1.0], [0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 1.0]], None,
     [[0.1, 0, 0, 0, 0, 0.2, 1.0], [0, 0.3, 0, 0, 0, 0, 0.0]]),
    ("utaustin_mutex",
     [[0.1, 0.0, 0.0, 0.0, 0.0, 0.2, 1.0], [0.0, 0.3, 0.0, 0.0, 0.0, 0.0, -1.0]], None,
     [[0.1, 0, 0, 0, 0, 0.2, 0.0], [0, 0.3, 0, 0, 0, 0, 1.0]]),
    # 8-D (pose, gripper 1 open, terminate): the terminate flag dropped, the gripper kept
    ("ucsd_kitchen_dataset_converted_externally_to_rlds",
     [[0.4, 0.1, 0.2, 10.0, 20.0, 30.0, 1.0, 0.0], [0.4, 0.1, 0.3, 10.0, 20.0, 30.0, 0.0, 1.0]], None,
     [[0.4, 0.1, 0.2, 10.0, 20.0, 30.0, 1.0], [0.4, 0.1, 0.3, 10.0, 20.0, 30.0, 0.0]]),
    ("cmu_stretch",
     [[0.01, 0.0, 0.02, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -0.02, 0.0, 0.0, 0.0, 1.0, 1.0]], None,
     [[0.01, 0, 0.02, 0, 0, 0, 0.0], [0, 0, -0.02, 0, 0, 0, 1.0]]),
    # 15-D: 7 joint velocities first, then xyz, rpy, gripper (-1 closed, clipped), terminate
    ("nyu_franka_play_dataset_converted_externally_to_rlds",
     [[9, 9, 9, 9, 9, 9, 9, 0.1, 0.2, 0.3, 0.01, 0.02, 0.03, -1.0, 0.0],
      [9, 9, 9, 9, 9, 9, 9, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 1.0, 1.0]], None,
     [[0.1, 0.2, 0.3, 0.01, 0.02, 0.03, 0.0], [0, 0, 0.1, 0, 0, 0, 1.0]]),
    # stored as is: xyz, rpy, gripper (1 open)
    ("dobbe", [[0.01, 0.02, 0.0, 0.1, 0.0, 0.0, 1.0], [0.0, 0.0, -0.01, 0.0, 0.2, 0.0, 0.0]], None,
     [[0.01, 0.02, 0, 0.1, 0, 0, 1.0], [0, 0, -0.01, 0, 0.2, 0, 0.0]]),
    # 6-D action; the gripper is state[6] inverted
    ("berkeley_fanuc_manipulation",
     [[0.1, 0.2, 0.3, 0.0, 0.0, 0.1], [0.0, 0.0, 0.0, 0.2, 0.0, 0.0]], [1.0, 0.0],
     [[0.1, 0.2, 0.3, 0, 0, 0.1, 0.0], [0, 0, 0, 0.2, 0, 0, 1.0]]),
]


@pytest.mark.parametrize("name, action, gripper_state, expected", FLAT_CASES, ids=[c[0] for c in FLAT_CASES])
def test_flat_layout_hand_worked_actions(tmp_path, name, action, gripper_state, expected):
    spec = SPECS[name]
    state = np.zeros((2, spec.feature_shapes["observation/state"][0]), np.float32)
    if gripper_state is not None:
        state[:, 6] = gripper_state
    episode = {f"steps/{key}": [_jpeg(5)] * 2 for key in spec.images.values()}
    episode.update({"steps/action": np.array(action, np.float32).reshape(-1),
                    "steps/observation/state": state.reshape(-1), "steps/language_instruction": [b"do it"] * 2})
    np.testing.assert_allclose(_read_one(tmp_path, name, episode).actions, expected, atol=1e-6)


def test_quaternions_convert_as_tensorflow_graphics_does(tmp_path):
    # iamlab: xyz, an xyzw quaternion, gripper (1 open, as is). Step 0: the all-zero quaternion -> zeros (no
    # normalisation). Step 1: yaw 30 then pitch 90 degrees, q = qz(30) * qy(90) = (-s sin15, s cos15, s sin15,
    # s cos15) with s = sqrt(1/2); at gimbal lock yaw is set to 0 and the turn goes to roll: r20 = -1, r01 = -1/2,
    # r02 = sqrt(3)/2, roll = atan2(-1/2, sqrt(3)/2) = -pi/6, pitch = pi/2.
    s, s15, c15 = np.sqrt(0.5), np.sin(np.pi / 12), np.cos(np.pi / 12)
    action = np.array([[0.5, 0.0, 0.2, 0.0, 0.0, 0.0, 0.0, 1.0],
                       [0.5, 0.1, 0.2, -s * s15, s * c15, s * s15, s * c15, 0.0]], np.float32)
    episode = _read_one(tmp_path, "iamlab_cmu_pickup_insert_converted_externally_to_rlds", {
        "steps/observation/image": [_jpeg(5)] * 2, "steps/observation/wrist_image": [_jpeg(5)] * 2,
        "steps/action": action.reshape(-1), "steps/observation/state": np.zeros(40, np.float32),
        "steps/language_instruction": [b"insert the peg"] * 2})
    np.testing.assert_allclose(episode.actions, [[0.5, 0, 0.2, 0, 0, 0, 1.0],
                                                 [0.5, 0.1, 0.2, -np.pi / 6, np.pi / 2, 0, 0.0]], atol=1e-5)


def test_absolute_pose_datasets_are_marked():
    # TFDS describes these actions as end-effector positions/orientations, not deltas
    assert sorted(n for n, s in SPECS.items() if s.absolute_pose) == [
        "dlr_edan_shared_control_converted_externally_to_rlds",
        "iamlab_cmu_pickup_insert_converted_externally_to_rlds", "ucsd_kitchen_dataset_converted_externally_to_rlds"]


def test_bc_z_hand_worked_actions(tmp_path):
    # the first of 10 future steps: xyz and axis-angle residuals [0:3], target_close[0] (1 closed, int64) inverted
    xyz = np.zeros((2, 30), np.float32)
    xyz[:, :3] = [[0.01, 0.02, 0.03], [-0.01, 0.0, 0.05]]
    xyz[:, 3:] = 9.0  # later future steps are not read
    axis_angle = np.zeros((2, 30), np.float32)
    axis_angle[:, :3] = [[0.1, 0.0, -0.1], [0.0, 0.2, 0.0]]
    close = np.zeros((2, 10), np.int64)
    close[:, 0] = [1, 0]
    close[:, 1:] = 1
    write_rlds_dataset(tmp_path, "bc_z", {"train": [{
        "steps/observation/image": [_jpeg(5, (171, 213))] * 2, "steps/action/future/xyz_residual": xyz.reshape(-1),
        "steps/action/future/axis_angle_residual": axis_angle.reshape(-1),
        "steps/action/future/target_close": close.reshape(-1),
        "steps/observation/natural_language_instruction": [b"place the sponge in the tray"] * 2}]}, shards=1)
    data = RLDSDataset.open(tmp_path, "bc_z")
    assert read_features(data.path / "features.json")["steps/action/future/target_close"] == ("int64", (10,))
    episode = next(data.episodes("train"))
    np.testing.assert_allclose(episode.actions, [[0.01, 0.02, 0.03, 0.1, 0.0, -0.1, 0.0],
                                                 [-0.01, 0.0, 0.05, 0.0, 0.2, 0.0, 1.0]], atol=1e-7)
    assert episode.instruction == "place the sponge in the tray"


def test_fmb_reads_under_its_tfds_name_with_wrist_camera(tmp_path):
    # OpenVLA's fmb_dataset folder holding TFDS's fmb shards; the action is taken as stored
    action = np.array([[0.01, 0.0, 0.02, 0.0, 0.1, 0.0, 1.0], [0.0, 0.01, 0.0, 0.0, 0.0, -0.1, 0.0]], np.float32)
    write_rlds_dataset(tmp_path, "fmb_dataset", {"train": [{
        "steps/observation/image_side_1": [_jpeg(40, (256, 256))] * 2,
        "steps/observation/image_side_2": [_jpeg(80, (256, 256))] * 2,
        "steps/observation/image_wrist_1": [_jpeg(120, (256, 256))] * 2, "steps/action": action.reshape(-1),
        "steps/observation/eef_pose": np.zeros(14, np.float32),
        "steps/observation/state_gripper_pose": np.zeros(2, np.float32),
        "steps/language_instruction": [b"insert the peg"] * 2}]}, shards=1)
    data = RLDSDataset.open(tmp_path, "fmb_dataset")
    assert data.tfds_name == "fmb"
    episode = next(data.episodes("train", cameras=("primary", "wrist")))
    np.testing.assert_allclose(episode.actions, action, atol=1e-7)
    assert round(float(episode.images.mean())) == 40 and round(float(episode.extra_images["wrist"].mean())) == 120
