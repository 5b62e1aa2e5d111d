"""KALIE's collection HDF5 files and their conversion to the JSON layout."""

import json

import numpy as np
import pytest

from affordvla.data.kalie import KalieFormatError, load_kalie_sample, read_kalie_index
from affordvla.data.kalie_hdf5 import (
    click_to_kalie,
    crop_and_turn,
    hdf5_to_json,
    read_collection_hdf5,
    write_collection_hdf5,
)
from affordvla.formats.sample import KALIE_POINT_NAMES


def _points(seed):
    rng = np.random.default_rng(seed)
    return {name: tuple(int(v) for v in rng.integers(0, 1001, 2)) for name in KALIE_POINT_NAMES}


def _image(seed, size=24):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_camera_frame_is_cropped_then_turned():
    frame = np.arange(720 * 1280 * 3, dtype=np.int64).reshape(720, 1280, 3) % 251
    image = crop_and_turn(frame.astype(np.uint8))
    assert image.shape == (700, 700, 3)
    np.testing.assert_array_equal(image[0, 0], frame[699, 949])  # top-left of the result = bottom-right of crop
    np.testing.assert_array_equal(image[699, 699], frame[0, 250])
    assert click_to_kalie(350, 70, 700) == (500, 100)
    assert click_to_kalie(699, 0.7, 700) == (999, 1)
    with pytest.raises(ValueError, match="smaller than the crop"):
        crop_and_turn(np.zeros((480, 640, 3), np.uint8))


def test_collection_file_round_trip(tmp_path):
    samples = [(_image(i), _points(i)) for i in range(3)]
    path = write_collection_hdf5(tmp_path / "pouring" / "demo_3.hdf5", samples)
    read, skipped = read_collection_hdf5(path)
    assert skipped == 0 and [s.key for s in read] == ["entry_0", "entry_1", "entry_2"]
    for (image, points), sample in zip(samples, read):
        np.testing.assert_array_equal(sample.image, image)
        assert sample.points == points and list(sample.points) == list(KALIE_POINT_NAMES)


def test_entries_are_read_in_numeric_order(tmp_path):
    path = write_collection_hdf5(tmp_path / "f.hdf5", [(_image(i), _points(i)) for i in range(12)])
    keys = [s.key for s in read_collection_hdf5(path)[0]]
    assert keys == [f"entry_{i}" for i in range(12)]  # entry_10 after entry_9, not after entry_1


def test_hdf5_to_json_writes_the_kalie_layout(tmp_path):
    data = tmp_path / "collected"
    write_collection_hdf5(data / "pouring" / "a_2.hdf5", [(_image(0), _points(0)), (_image(1), _points(1))])
    write_collection_hdf5(data / "unplugging" / "b_1.hdf5", [(_image(2), _points(2))])
    out = tmp_path / "json"
    assert hdf5_to_json(data, out) == {"entries": 3, "skipped": 0}
    raw = json.loads((out / "data_jsonformat.json").read_text())
    assert list(raw) == ["entry_0", "entry_1", "entry_2"]
    assert raw["entry_2"]["other"] == {"task": "Unplug the usb stick from the computer",
                                       "objects": ["usb stick", "computer"]}
    assert json.loads(raw["entry_0"]["points"]) == {k: list(v) for k, v in _points(0).items()}
    entries, skipped = read_kalie_index(out)
    assert skipped == 0
    sample = load_kalie_sample(entries[2])
    np.testing.assert_array_equal(sample.image, _image(2))
    np.testing.assert_allclose(sample.keypoints, np.array(list(_points(2).values())) / 1000)
    assert sample.task == "unplugging"


def test_corrupt_file_is_named(tmp_path):
    bad = tmp_path / "drawer_closing" / "x_1.hdf5"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(KalieFormatError, match="x_1.hdf5.*not a readable HDF5"):
        read_collection_hdf5(bad)
    assert read_collection_hdf5(bad, on_error="skip") == ([], 1)


def test_bad_entries_name_file_and_entry_or_are_counted(tmp_path):
    import h5py

    path = write_collection_hdf5(tmp_path / "t" / "f.hdf5", [(_image(i), _points(i)) for i in range(3)])
    with h5py.File(path, "a") as f:
        del f["entry_1/target_point"]
        del f["entry_2/grasp_point"]
        f["entry_2"].create_dataset("grasp_point", data=np.array([1200, 5]))
    with pytest.raises(KalieFormatError, match=r"f\.hdf5, entry 'entry_1': missing dataset\(s\) \['target_point'\]"):
        read_collection_hdf5(path)
    samples, skipped = read_collection_hdf5(path, on_error="skip")
    assert [s.key for s in samples] == ["entry_0"] and skipped == 2
    with h5py.File(path, "a") as f:
        del f["entry_1"], f["entry_2"]
        f["entry_1"] = _image(0)  # a dataset where a group belongs
    with pytest.raises(KalieFormatError, match="entry 'entry_1': expected a group"):
        read_collection_hdf5(path)


def test_unknown_task_folder_lists_the_valid_ones(tmp_path):
    write_collection_hdf5(tmp_path / "folding" / "f_1.hdf5", [(_image(0), _points(0))])
    with pytest.raises(KalieFormatError, match="'folding' is not a KALIE task; valid: .*pouring"):
        hdf5_to_json(tmp_path, tmp_path / "out")


def test_cli_converts_and_reports_errors(tmp_path, capsys):
    from affordvla.data.cli import main

    write_collection_hdf5(tmp_path / "in" / "towel_hanging" / "t_2.hdf5", [(_image(0), _points(0))] * 2)
    assert main(["kalie-from-hdf5", str(tmp_path / "in"), str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out) == {"entries": 2, "skipped": 0}
    assert (tmp_path / "out" / "data_strformat.json").is_file()
    assert main(["kalie-from-hdf5", str(tmp_path / "nowhere"), str(tmp_path / "out2")]) == 1
    assert "nowhere does not exist" in capsys.readouterr().err
