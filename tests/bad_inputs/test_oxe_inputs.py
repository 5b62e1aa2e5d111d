"""Bad Open X-Embodiment inputs: each is an ordinary exception whose message names the dataset and the file."""

import json
import re

import numpy as np
import pytest

from affordvla.data.oxe import OXEFormatError, RLDSDataset, stream_mixture, write_rlds_dataset
from affordvla.data.oxe.datamodule import OXEMixtureDataModule


def _fractal_episode():
    return {"steps/observation/image": [b"\xff\xd8 not decoded here"] * 2,
            "steps/action/world_vector": np.zeros(6, np.float32),
            "steps/action/rotation_delta": np.zeros(6, np.float32),
            "steps/action/gripper_closedness_action": np.zeros(2, np.float32),
            "steps/observation/natural_language_instruction": [b"pick coke can"] * 2}


def test_unknown_dataset_in_a_mixture(tmp_path):
    with pytest.raises(ValueError, match=rf"mixture datasets \['robo_net'\] \(dataset.mixture, data root {tmp_path}\) "
                                         "have no standard"):
        OXEMixtureDataModule(str(tmp_path), [["fractal20220817_data", 1.0], ["robo_net", 0.5]],
                             cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=rf"\['robo_net'\] \({tmp_path}\) have no standardisation"):
        next(stream_mixture(tmp_path, [("robo_net", 1.0)], "train", window_size=1, chunk_size=1))
    (tmp_path / "robo_net" / "1.0.0").mkdir(parents=True)
    with pytest.raises(OXEFormatError, match=rf"dataset 'robo_net' \({tmp_path / 'robo_net'}\) has no standard"):
        RLDSDataset.open(tmp_path, "robo_net")


def test_shard_set_with_a_gap(tmp_path):
    path = write_rlds_dataset(tmp_path, "fractal20220817_data", {"train": [_fractal_episode()] * 3}, shards=3)
    gap = path / "fractal20220817_data-train.tfrecord-00001-of-00003"
    gap.unlink()
    with pytest.raises(OXEFormatError, match=rf"dataset fractal20220817_data: shard {gap} is missing \(3 listed"):
        RLDSDataset.open(tmp_path, "fractal20220817_data")


def test_features_json_missing_a_key_the_standardiser_reads(tmp_path):
    path = write_rlds_dataset(tmp_path, "fractal20220817_data", {"train": [_fractal_episode()]}, shards=1)
    features = json.loads((path / "features.json").read_text())
    action = features["featuresDict"]["features"]["steps"]["sequence"]["feature"]["featuresDict"]["features"]["action"]
    del action["featuresDict"]["features"]["rotation_delta"]
    (path / "features.json").write_text(json.dumps(features))
    with pytest.raises(OXEFormatError, match=rf"dataset fractal20220817_data: {path / 'features.json'} lacks "
                                             r"\['steps/action/rotation_delta'\]"):
        RLDSDataset.open(tmp_path, "fractal20220817_data")


def test_features_json_with_another_shape(tmp_path):
    path = write_rlds_dataset(tmp_path, "fractal20220817_data", {"train": [_fractal_episode()]}, shards=1)
    text = (path / "features.json").read_text()
    features = json.loads(text)
    steps = features["featuresDict"]["features"]["steps"]["sequence"]["feature"]["featuresDict"]["features"]
    steps["action"]["featuresDict"]["features"]["world_vector"]["tensor"]["shape"]["dimensions"] = ["2"]
    (path / "features.json").write_text(json.dumps(features))
    with pytest.raises(OXEFormatError, match=r"dataset fractal20220817_data: .*features.json: "
                                             r"steps/action/world_vector has shape \[2\], the standardisation "
                                             r"expects \[3\]"):
        RLDSDataset.open(tmp_path, "fractal20220817_data")


def test_oxe_bridge_with_an_unknown_name_fails_at_construction(tmp_path):
    from affordvla.data.action_datamodule import ActionWindowDataModule

    with pytest.raises(ValueError, match=r"dataset.name 'bridge_v3' \(root .*\) is not an Open X-Embodiment"):
        ActionWindowDataModule("oxe", str(tmp_path), name="bridge_v3", cache_dir=str(tmp_path / "cache"))


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    data = edit(data)
    path.write_text(json.dumps(data))


def _steps(features):
    return features["featuresDict"]["features"]["steps"]


@pytest.mark.parametrize("file, edit, message", [
    ("dataset_info.json", lambda d: [d], r"dataset_info.json is a JSON list, expected an object"),
    ("dataset_info.json", lambda d: {**d, "splits": [{k: v for k, v in d["splits"][0].items() if k != "name"}]},
     r"dataset_info.json: splits\[0\] lacks 'name'"),
    ("dataset_info.json", lambda d: {**d, "splits": [{**d["splits"][0], "shardLengths": ["one"]}]},
     r"dataset_info.json: split 'train' has shardLengths \['one'\], expected episode counts"),
    ("dataset_info.json", lambda d: {**d, "splits": [{**d["splits"][0], "shardLengths": "1"}]},
     r"dataset_info.json: split 'train': 'shardLengths' is '1', expected a list"),
    ("dataset_info.json", lambda d: {**d, "splits": {"train": 1}}, r"dataset_info.json: 'splits' is .*expected a list"),
    ("dataset_info.json", lambda d: {**d, "splits": ["train"]}, r"dataset_info.json: splits\[0\] is a str"),
    ("features.json", lambda d: [d], r"features.json: the top level is a list, expected a JSON object"),
    ("features.json", lambda d: (_steps(d).update(sequence={"length": -1}), d)[1],
     r"features.json: steps/sequence lacks 'feature'"),
    ("features.json", lambda d: (_steps(d)["sequence"]["feature"]["featuresDict"]["features"].update(
        action=["world_vector"]), d)[1], r"features.json: steps/action is a list, expected a JSON object"),
])
def test_malformed_metadata_names_the_dataset_and_file(tmp_path, file, edit, message):
    path = write_rlds_dataset(tmp_path, "fractal20220817_data", {"train": [_fractal_episode()]}, shards=1)
    _edit_json(path / file, edit)
    with pytest.raises(OXEFormatError, match=rf"^dataset fractal20220817_data: {path / file}") as error:
        RLDSDataset.open(tmp_path, "fractal20220817_data")
    assert re.search(message, str(error.value)), str(error.value)
