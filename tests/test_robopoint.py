"""RoboPoint conversation JSON and the Where2Place layout, written as RoboPoint ships them."""

import json

import numpy as np
import pytest
from PIL import Image

from affordvla.data.robopoint import (
    ROBOPOINT_ANSWER_SUFFIX,
    RoboPointFormatError,
    parse_point_answer,
    point_entry,
    pointing_samples,
    read_conversations,
    read_where2place,
    write_conversations,
    write_where2place,
)


def _save(path, seed, size=(32, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(image).save(path)
    return image


def test_parse_point_answer():
    np.testing.assert_allclose(parse_point_answer("[(0.461, 0.527), (0.498, 0.521)]"),
                               [[0.461, 0.527], [0.498, 0.521]], atol=1e-6)
    np.testing.assert_allclose(parse_point_answer(" [(1, 0)] "), [[1.0, 0.0]])
    assert parse_point_answer("[(0.2, 0.3, 0.1, 0.1)]") is None  # a box
    assert parse_point_answer("The mug is on the left.") is None
    assert parse_point_answer("[(1.2, 0.5)]") is None  # not normalised
    assert parse_point_answer("[]") is None


def test_pointing_samples_round_trip_and_count_other_answers(tmp_path):
    images = {name: _save(tmp_path / "images" / name, i) for i, name in enumerate(["a.png", "b/c.png"])}
    points = np.array([[0.461, 0.527], [0.498, 0.521], [0.1, 0.9]], np.float32)
    entries = [
        point_entry("p0", "a.png", "Point to free space left of the mug.", points),
        {"id": "mixed", "image": "b/c.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the mug?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Find the mug box."}, {"from": "gpt", "value": "[(0.5, 0.5, 0.2, 0.1)]"},
            {"from": "human", "value": "Point at the handle."}, {"from": "gpt", "value": "[(0.250, 0.750)]"},
        ]},
    ]
    path = write_conversations(tmp_path / "train.json", entries)
    assert json.loads(path.read_text())[0]["conversations"][0]["value"].endswith(ROBOPOINT_ANSWER_SUFFIX)
    samples, left_out = pointing_samples(path, tmp_path / "images")
    assert left_out == {"text": 1, "box": 1}
    first, second = samples
    np.testing.assert_array_equal(first.image, images["a.png"])
    np.testing.assert_allclose(first.keypoints, points, atol=1e-6)
    assert first.point_names == ("Point 1", "Point 2", "Point 3")
    assert first.instruction == f"Point to free space left of the mug. {ROBOPOINT_ANSWER_SUFFIX}"
    assert second.instruction == "Point at the handle." and second.meta["entry"] == "mixed#2"
    np.testing.assert_array_equal(second.image, images["b/c.png"])


@pytest.mark.parametrize("content, message", [
    ("{not json", "invalid JSON at line 1"),
    ('{"id": 1}', "top level must be a list"),
    ('[{"id": "x", "image": "a.png"}]', "entry 'x' \\(#0\\): needs a 'conversations' list"),
    ('[{"id": "x", "conversations": []}]', "needs an 'image' path"),
    ('[{"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "q"}]}]', "alternate"),
    (('[{"id": "x", "image": "a.png", "conversations": [{"from": "gpt", "value": "q"}, '
      '{"from": "human", "value": "a"}]}]'), "turn 0: expected a human then a gpt"),
])
def test_malformed_conversations_name_file_and_entry(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(RoboPointFormatError, match=message):
        read_conversations(path, tmp_path)


def test_missing_image_names_the_entry(tmp_path):
    path = write_conversations(tmp_path / "t.json", [point_entry("e7", "gone.png", "q", np.array([[0.5, 0.5]]))])
    with pytest.raises(RoboPointFormatError, match=r"t\.json, entry 'e7': cannot read image .*gone\.png"):
        pointing_samples(path, tmp_path)


def test_where2place_layout_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    mask = np.zeros((48, 64), np.uint8)
    mask[10:20, 30:40] = 255
    items = [(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), mask, f"Place it {i}", "unseen" if i else "seen")
             for i in range(3)]
    root = write_where2place(tmp_path / "where2place", items)
    questions = read_where2place(root)
    assert [q.question_id for q in questions] == [0, 1, 2]
    assert [q.category for q in questions] == ["seen", "unseen", "unseen"]
    assert questions[2].image_path == root / "images" / "02.jpg" and questions[2].mask_path == root / "masks" / "02.jpg"
    stored = np.asarray(Image.open(questions[0].mask_path))
    assert stored.shape == (48, 64) and stored[15, 35] > 200 and stored[0, 0] < 50  # grayscale JPEG, soft edges
    (root / "masks" / "01.jpg").unlink()
    with pytest.raises(RoboPointFormatError, match=r"point_questions\.jsonl, line 2: .*01\.jpg does not exist"):
        read_where2place(root)
