"""KALIE JSON dataset format: reading files written as hdf5_to_json writes them, writing, splitting, errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from affordvla.data.kalie import (
    KalieFormatError,
    kalie_split,
    load_kalie_sample,
    parse_points_string,
    points_to_json_string,
    points_to_str_format,
    read_kalie_index,
    to_kalie_int,
    write_kalie_dataset,
)
from affordvla.formats.sample import KALIE_POINT_NAMES

JSON_NAME = "data_jsonformat.json"

POINTS = [
    [(397, 93), (410, 120), (500, 500), (450, 480), (620, 530)],
    [(0, 1000), (1000, 0), (1, 999), (250, 750), (333, 667)],
    [(12, 34), (12, 34), (12, 34), (100, 200), (300, 400)],
]
TASKS_TEXT = [
    ("Sweep the trash off the table with the brush.", ["brush", "trash"]),
    ("drawer_closing", ["open drawer"]),  # a task *name*: mapped to its instruction
    ("Wipe the whiteboard", ["eraser"]),  # unknown: kept verbatim
]


def _image(seed: int, h: int = 6, w: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _points(i: int) -> dict[str, list[int]]:
    return {name: list(xy) for name, xy in zip(KALIE_POINT_NAMES, POINTS[i])}


def _good_entry(root: Path, key: str, i: int = 0, **over) -> dict:
    """One entry as hdf5_to_json writes it (image saved, points as an indent=4 JSON string)."""
    (root / "imgs").mkdir(exist_ok=True)
    Image.fromarray(_image(i)).save(root / "imgs" / f"{key}.png")
    task, objects = TASKS_TEXT[i % len(TASKS_TEXT)]
    entry = {"img": f"imgs/{key}.png", "points": json.dumps(_points(i % 3), indent=4),
             "other": {"task": task, "objects": objects}}
    entry.update(over)
    return entry


def _write_index(root: Path, data) -> Path:
    path = root / JSON_NAME
    with open(path, "w") as f:
        json.dump(data, f, indent=4)
    return path


@pytest.fixture
def original_dataset(tmp_path: Path) -> Path:
    _write_index(tmp_path, {f"entry_{i}": _good_entry(tmp_path, f"entry_{i}", i) for i in range(3)})
    return tmp_path


# ---------------------------------------------------------------------------------------------- reading


def test_reads_original_layout_exactly(original_dataset: Path):
    entries, skipped = read_kalie_index(original_dataset)
    assert skipped == 0
    assert [e.key for e in entries] == ["entry_0", "entry_1", "entry_2"]
    for i, entry in enumerate(entries):
        assert entry.points == dict(zip(KALIE_POINT_NAMES, POINTS[i]))
        assert list(entry.points) == list(KALIE_POINT_NAMES)
        assert entry.image_path == original_dataset / "imgs" / f"entry_{i}.png"
        assert (entry.task, entry.objects) == TASKS_TEXT[i]
        sample = load_kalie_sample(entry)
        np.testing.assert_array_equal(sample.image, _image(i))
        assert sample.image.dtype == np.uint8 and sample.image.shape == (6, 8, 3)
        expected = np.array(POINTS[i], dtype=np.float32) / 1000
        np.testing.assert_array_equal(sample.keypoints, expected)
        assert sample.objects == TASKS_TEXT[i][1]
        assert sample.meta == {"source": str(original_dataset / JSON_NAME), "entry": f"entry_{i}",
                               "image_path": str(original_dataset / "imgs" / f"entry_{i}.png")}
    instructions = [load_kalie_sample(e).instruction for e in entries]
    assert instructions == ["Sweep the trash off the table with the brush.", "Close the drawer.",
                            "Wipe the whiteboard"]
    assert [load_kalie_sample(e).task for e in entries] == ["trash_sweeping", "drawer_closing",
                                                            "Wipe the whiteboard"]


def test_absolute_and_cwd_relative_image_paths(tmp_path: Path):
    abs_entry = _good_entry(tmp_path, "entry_0", 0)
    abs_entry["img"] = str((tmp_path / "imgs" / "entry_0.png").resolve())
    cwd_entry = _good_entry(tmp_path, "entry_1", 1)
    cwd_entry["img"] = "./archive_2024-05-02/imgs/entry_1.png"  # what hdf5_to_json literally stores
    _write_index(tmp_path, {"entry_0": abs_entry, "entry_1": cwd_entry})
    entries, _ = read_kalie_index(tmp_path)
    assert entries[0].image_path == tmp_path.resolve() / "imgs" / "entry_0.png"
    assert entries[1].image_path == tmp_path / "imgs" / "entry_1.png"


def test_entries_sorted_numerically(tmp_path: Path):
    keys = ["entry_10", "entry_2", "entry_1", "entry_0"]
    _write_index(tmp_path, {k: _good_entry(tmp_path, k) for k in keys})
    entries, _ = read_kalie_index(tmp_path)
    assert [e.key for e in entries] == ["entry_0", "entry_1", "entry_2", "entry_10"]


def test_other_kept_for_round_trip(tmp_path: Path):
    other = {"task": "pouring", "objects": ["bowl"], "prompts": {"bowl": ["a red bowl"]}, "prompt": ["x"]}
    _write_index(tmp_path, {"entry_0": _good_entry(tmp_path, "entry_0", other=other)})
    (entry,), _ = read_kalie_index(tmp_path)
    assert entry.other == other


# ---------------------------------------------------------------------------------------------- writing


def test_write_read_round_trip(tmp_path: Path):
    items = [(_image(i), dict(zip(KALIE_POINT_NAMES, POINTS[i])),
              {"task": TASKS_TEXT[i][0], "objects": TASKS_TEXT[i][1]}) for i in range(3)]
    keys = write_kalie_dataset(tmp_path, items)
    assert keys == ["entry_0", "entry_1", "entry_2"]

    raw = json.loads((tmp_path / JSON_NAME).read_text())
    assert list(raw) == keys
    assert raw["entry_0"]["img"] == "imgs/entry_0.png"
    for i, key in enumerate(keys):
        expected = json.dumps({n: list(xy) for n, xy in zip(KALIE_POINT_NAMES, POINTS[i])}, indent=4)
        assert raw[key]["points"] == expected  # byte-identical to KALIE's json.dumps(..., indent=4)
    # the outer file is indent=4 JSON too
    assert (tmp_path / JSON_NAME).read_text() == json.dumps(raw, indent=4)

    entries, skipped = read_kalie_index(tmp_path)
    assert skipped == 0
    for i, entry in enumerate(entries):
        assert entry.points == dict(zip(KALIE_POINT_NAMES, POINTS[i]))
        assert entry.other == {"task": TASKS_TEXT[i][0], "objects": TASKS_TEXT[i][1]}
        np.testing.assert_array_equal(load_kalie_sample(entry).image, _image(i))


def test_points_string_is_exact():
    pts = dict(zip(KALIE_POINT_NAMES, POINTS[0]))
    assert points_to_json_string(pts) == (
        '{\n    "Grasp Point": [\n        397,\n        93\n    ],\n'
        '    "Function Point": [\n        410,\n        120\n    ],\n'
        '    "Target Point": [\n        500,\n        500\n    ],\n'
        '    "Pre-contact Point": [\n        450,\n        480\n    ],\n'
        '    "Post-contact Point": [\n        620,\n        530\n    ]\n}'
    )
    # key order of the input does not matter; the output is canonical
    assert points_to_json_string(dict(reversed(list(pts.items())))) == points_to_json_string(pts)
    assert parse_points_string(points_to_json_string(pts), where="x") == pts


def test_str_format_file(tmp_path: Path):
    other = {"task": "Close the drawer.", "objects": ["open drawer"]}
    write_kalie_dataset(tmp_path, [(_image(0), dict(zip(KALIE_POINT_NAMES, POINTS[0])), other)])
    raw = json.loads((tmp_path / "data_strformat.json").read_text())
    assert raw == {"entry_0": {
        "img": "imgs/entry_0.png",
        "points": "Grasp Point: (397, 93), Function Point: (410, 120), Target Point: (500, 500), "
                  "Pre-contact Point: (450, 480), Post-contact Point: (620, 530)",
        "other": {"task": "Close the drawer.", "objects": ["open drawer"]},
    }}
    assert points_to_str_format(dict(zip(KALIE_POINT_NAMES, POINTS[0]))) == raw["entry_0"]["points"]


def test_write_without_str_format_and_append(tmp_path: Path):
    other = {"task": "pouring", "objects": ["bowl"]}
    pts = dict(zip(KALIE_POINT_NAMES, POINTS[1]))
    write_kalie_dataset(tmp_path, [(_image(0), pts, other)] * 2, write_str_format=False)
    assert not (tmp_path / "data_strformat.json").exists()
    keys = write_kalie_dataset(tmp_path, [(_image(1), pts, other)], write_str_format=False, start_index=10)
    assert keys == ["entry_10"]
    entries, _ = read_kalie_index(tmp_path)
    assert [e.key for e in entries] == ["entry_0", "entry_1", "entry_10"]
    assert not list(tmp_path.glob("**/*.tmp"))  # atomic writes leave no temp files behind


def test_write_rejects_bad_input(tmp_path: Path):
    other = {"task": "t", "objects": []}
    pts = dict(zip(KALIE_POINT_NAMES, POINTS[0]))
    with pytest.raises(ValueError, match="uint8"):
        write_kalie_dataset(tmp_path, [(_image(0).astype(np.float32), pts, other)])
    with pytest.raises(KalieFormatError, match="outside"):
        write_kalie_dataset(tmp_path, [(_image(0), {**pts, "Grasp Point": (1001, 0)}, other)])
    assert not (tmp_path / JSON_NAME).exists()


def test_to_kalie_int():
    assert [to_kalie_int(v) for v in (0.0, 0.397, 0.0934, 1.0, -0.2, 1.7)] == [0, 397, 93, 1000, 0, 1000]
    with pytest.raises(ValueError):
        to_kalie_int(float("nan"))


# ---------------------------------------------------------------------------------------------- split


def test_kalie_split():
    keys = [f"entry_{i}" for i in range(10)]
    train, test = kalie_split(keys)
    assert (train, test) == kalie_split(keys)  # deterministic
    assert (len(train), len(test)) == (8, 2)
    assert not set(train) & set(test) and sorted(train + test) == sorted(keys)
    assert keys == [f"entry_{i}" for i in range(10)]  # input not shuffled in place
    assert kalie_split(keys, seed=1) != (train, test)

    train7, test7 = kalie_split(keys[:7])
    assert (len(train7), len(test7)) == (6, 1)  # round(0.8 * 7) = 6
    assert sorted(train7 + test7) == sorted(keys[:7])


# ---------------------------------------------------------------------------------------------- errors


def _bad(root: Path, **over) -> dict:
    e = _good_entry(root, "entry_3")
    e.update(over)
    return e


def _points_str(**changes) -> str:
    pts = _points(0)
    pts.update(changes)
    return json.dumps(pts, indent=4)


BAD_ENTRIES = {
    "missing points": (lambda r: {k: v for k, v in _bad(r).items() if k != "points"}, "'points'"),
    "missing img": (lambda r: {k: v for k, v in _bad(r).items() if k != "img"}, "'img'"),
    "entry not object": (lambda r: ["img", "points"], "object"),
    "missing task": (lambda r: _bad(r, other={"objects": ["a"]}), "task"),
    "objects not list": (lambda r: _bad(r, other={"task": "t", "objects": "brush"}), "objects"),
    "points not JSON": (lambda r: _bad(r, points="Grasp Point: (1, 2)"), "not valid JSON"),
    "points missing key": (lambda r: _bad(r, points=json.dumps({n: [1, 2] for n in KALIE_POINT_NAMES[:4]})),
                           "Post-contact Point"),
    "points extra key": (lambda r: _bad(r, points=_points_str(**{"Other Point": [1, 2]})), "Other Point"),
    "three values": (lambda r: _bad(r, points=_points_str(**{"Grasp Point": [1, 2, 3]})), "Grasp Point"),
    "coordinate 1001": (lambda r: _bad(r, points=_points_str(**{"Target Point": [1001, 5]})), "1001"),
    "coordinate -1": (lambda r: _bad(r, points=_points_str(**{"Target Point": [5, -1]})), "-1"),
    "coordinate string": (lambda r: _bad(r, points=_points_str(**{"Grasp Point": ["12", 5]})), "'12'"),
    "coordinate float": (lambda r: _bad(r, points=_points_str(**{"Grasp Point": [12.0, 5]})), "12.0"),
    "coordinate bool": (lambda r: _bad(r, points=_points_str(**{"Grasp Point": [True, 5]})), "True"),
    "points not a string": (lambda r: _bad(r, points=_points(0)), "JSON string"),
    "missing image": (lambda r: _bad(r, img="imgs/nope.png"), "nope.png"),
}


@pytest.mark.parametrize("case", list(BAD_ENTRIES))
def test_bad_entry_names_file_and_key(tmp_path: Path, case: str):
    make, detail = BAD_ENTRIES[case]
    _write_index(tmp_path, {"entry_0": _good_entry(tmp_path, "entry_0"), "entry_3": make(tmp_path)})
    with pytest.raises(KalieFormatError) as info:
        read_kalie_index(tmp_path)
    msg = str(info.value)
    assert JSON_NAME in msg and "'entry_3'" in msg and detail in msg


def test_invalid_json_file(tmp_path: Path):
    (tmp_path / JSON_NAME).write_text('{\n  "entry_0": {"img": "x",\n}')
    with pytest.raises(KalieFormatError, match=rf"{JSON_NAME}.*line 3, column 1"):
        read_kalie_index(tmp_path)


def test_top_level_list(tmp_path: Path):
    _write_index(tmp_path, [_good_entry(tmp_path, "entry_0")])
    with pytest.raises(KalieFormatError, match=rf"{JSON_NAME}.*top level.*list"):
        read_kalie_index(tmp_path)


def test_missing_index_file(tmp_path: Path):
    with pytest.raises(KalieFormatError, match=rf"{JSON_NAME}.*not found"):
        read_kalie_index(tmp_path)


def test_corrupt_image_at_load(tmp_path: Path):
    _write_index(tmp_path, {"entry_7": _good_entry(tmp_path, "entry_7")})
    (tmp_path / "imgs" / "entry_7.png").write_bytes(b"this is not a png")
    (entry,), _ = read_kalie_index(tmp_path)  # existence is checked at read time, decoding at load time
    with pytest.raises(KalieFormatError) as info:
        load_kalie_sample(entry)
    msg = str(info.value)
    assert JSON_NAME in msg and "'entry_7'" in msg and "entry_7.png" in msg


def test_parse_points_string_where():
    with pytest.raises(KalieFormatError, match="^my place: .*duplicate"):
        parse_points_string('{"Grasp Point": [1, 2], "Grasp Point": [3, 4]}', where="my place")
    with pytest.raises(KalieFormatError, match="^my place: .*object"):
        parse_points_string("[1, 2]", where="my place")


def test_skip_mode(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    data = {
        "entry_0": _good_entry(tmp_path, "entry_0", 0),
        "entry_1": _good_entry(tmp_path, "entry_1", 1, points="{broken"),
        "entry_2": _good_entry(tmp_path, "entry_2", 2, img="imgs/missing.png"),
        "entry_3": _good_entry(tmp_path, "entry_3", 1),
    }
    _write_index(tmp_path, data)
    with caplog.at_level(logging.WARNING, logger="affordvla.data.kalie"):
        entries, skipped = read_kalie_index(tmp_path, on_error="skip")
    assert [e.key for e in entries] == ["entry_0", "entry_3"] and skipped == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "'entry_1'" in warnings[0] and "'entry_2'" in warnings[1]


def test_bogus_on_error(tmp_path: Path):
    with pytest.raises(ValueError, match="raise") as info:
        read_kalie_index(tmp_path, on_error="bogus")
    assert "skip" in str(info.value) and not isinstance(info.value, KalieFormatError)
