"""The generated default dataset is KALIE's format exactly, reproducible, and reused once written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from affordvla.data.kalie import load_kalie_sample, read_kalie_index
from affordvla.formats.kalie_tasks import TASKS
from affordvla.formats.sample import KALIE_POINT_NAMES
from affordvla.locking import ForeignContentError
from affordvla.offline.tabletop import make_scene
from affordvla.offline.toy_kalie import ensure_toy_kalie

SPLITS = {"train": 10, "val": 3, "test": 5}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return ensure_toy_kalie(tmp_path_factory.mktemp("toy") / "kalie", seed=3, splits=SPLITS, image_size=64)


def test_points_are_a_json_string_of_the_five_named_points_in_order(dataset):
    data = json.loads((dataset / "data_jsonformat.json").read_text())
    assert list(data) == [f"entry_{i}" for i in range(18)]
    for entry in data.values():
        assert set(entry) == {"img", "points", "other"}
        assert isinstance(entry["points"], str)  # JSON inside JSON, as KALIE writes it
        points = json.loads(entry["points"])
        assert list(points) == list(KALIE_POINT_NAMES)
        for value in points.values():
            assert len(value) == 2 and all(type(v) is int and 0 <= v <= 1000 for v in value)
        assert entry["points"] == json.dumps(points, indent=4)
        assert entry["other"]["task"] in TASKS
        assert entry["other"]["objects"] == list(TASKS[entry["other"]["task"]].objects)
        image = Image.open(dataset / entry["img"])
        assert image.size == (64, 64) and image.mode == "RGB"
        for name, mask_path in entry["other"]["masks"].items():
            assert name in entry["other"]["objects"]
            mask = np.asarray(Image.open(dataset / mask_path))
            assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255} and mask.any()


def test_str_format_matches_json_format(dataset):
    data = json.loads((dataset / "data_jsonformat.json").read_text())
    strings = json.loads((dataset / "data_strformat.json").read_text())
    points = json.loads(data["entry_0"]["points"])
    expected = ", ".join(f"{n}: ({points[n][0]}, {points[n][1]})" for n in KALIE_POINT_NAMES)
    assert strings["entry_0"]["points"] == expected


def test_splits_are_disjoint_and_cover_every_entry(dataset):
    splits = json.loads((dataset / "splits.json").read_text())
    assert {k: len(v) for k, v in splits.items()} == SPLITS
    keys = [k for v in splits.values() for k in v]
    assert len(set(keys)) == len(keys) == 18


def test_reader_loads_what_the_generator_drew(dataset):
    entries, skipped = read_kalie_index(dataset)
    assert skipped == 0 and len(entries) == 18
    sample = load_kalie_sample(entries[0])
    points = json.loads(json.loads((dataset / "data_jsonformat.json").read_text())["entry_0"]["points"])
    np.testing.assert_array_equal(sample.keypoints * 1000, np.array([points[n] for n in KALIE_POINT_NAMES]))
    assert sample.instruction == TASKS[sample.task].instruction


def test_generation_is_seeded_and_reused(dataset, tmp_path):
    again = ensure_toy_kalie(tmp_path / "again", seed=3, splits=SPLITS, image_size=64)
    assert (again / "data_jsonformat.json").read_text() == (dataset / "data_jsonformat.json").read_text()
    assert (again / "imgs/entry_7.png").read_bytes() == (dataset / "imgs/entry_7.png").read_bytes()
    before = (again / "imgs/entry_0.png").stat().st_mtime_ns
    ensure_toy_kalie(tmp_path / "again", seed=3, splits=SPLITS, image_size=64)  # complete: nothing rewritten
    assert (again / "imgs/entry_0.png").stat().st_mtime_ns == before
    with pytest.raises(ForeignContentError, match="other parameters"):
        ensure_toy_kalie(tmp_path / "again", seed=4, splits=SPLITS, image_size=64)


def test_scenes_keep_keypoints_inside_and_vary(dataset):
    rng = np.random.default_rng(0)
    scenes = [make_scene(rng, task, 64) for task in TASKS for _ in range(4)]
    keypoints = np.stack([s.keypoints for s in scenes])
    assert keypoints.min() >= 0.06 and keypoints.max() <= 0.94
    # objects appear anywhere: grasp points spread over most of the table
    assert np.ptp(keypoints[:, 0, 0]) > 0.5 and np.ptp(keypoints[:, 0, 1]) > 0.5
    for scene in scenes:
        assert list(scene.masks) == list(TASKS[scene.task].objects)
