"""Where2Place: the compat mode reproduces RoboPoint's scorer rule by rule; the corrected mode fixes its quirks."""

import numpy as np
import pytest

from affordvla.data.robopoint import read_where2place, write_where2place
from affordvla.evaluation.where2place import (
    compat_points,
    score_answer_compat,
    score_answer_corrected,
    score_where2place,
)


@pytest.fixture(scope="module")
def mask():
    """640 x 480 like Where2Place: a free region at rows 100-199, columns 200-299, and one soft JPEG-edge pixel."""
    m = np.zeros((480, 640))
    m[100:200, 200:300] = 1.0
    m[50, 60] = 0.5
    return m


@pytest.mark.parametrize("answer, expected", [
    ("[(0.35, 0.3)]", 1.0),  # normalised: int(0.35 * 640) = 224, int(0.3 * 480) = 144, inside
    ("(224, 144)", 1.0),  # all ints: a pixel
    ("[(0.35, 144)]", 0.0),  # any float scales both: y = 144 * 480, far outside
    ("(60, 50)", 0.5),  # the soft mask value counts as it is
    ("[(224, 144), (10, 10)]", 0.5),  # mean over points
    ("(-5, 144)", 0.0),  # a signed number outside the image scores 0
    ("(1, 2, 3)", 0.0),  # 3-tuples are ignored: no points
    ("(200, 100, 300, 200)", 1.0),  # an int box: all of its 100 x 100 pixels are inside
    ("(250, 150, 350, 250)", 0.25),  # a box half outside in each direction: 50 x 50 of 100 x 100
    ("(0.3125, 0.2083, 0.46875, 0.41667)", 100 / 101),  # float box: rows int(99.98) = 99 .. 199, one row outside
    ("I do not know", 0.0),  # no tuple: 0, not skipped
    ("(0.3124, 0.3)", 0.0),  # truncation: int(199.936) = 199 is left of the region (rounding would hit it)
    ("The free space is at (0.4, 0.35) and (0.42,0.36)", 1.0),  # text around, no space after the comma
])
def test_compat_rules(mask, answer, expected):
    assert score_answer_compat(answer, mask) == pytest.approx(expected)


def test_compat_raises_where_the_original_does(mask):
    with pytest.raises(TypeError):
        score_answer_compat("(200, 0.2, 300, 0.4)", mask)  # int x0 leaves float y bounds unscaled
    np.testing.assert_array_equal(compat_points("(3, 4) (5.0, 0.5)"), [[3, 4], [3200, 240]])


def test_corrected_mode(mask):
    small = mask[::2, ::2]  # a 320 x 240 image: the compat mode's fixed 640 x 480 would be wrong here
    assert score_answer_corrected("[(0.35, 0.3)]", small) == 1.0  # 112, 72 in this image
    assert score_answer_compat("[(0.35, 0.3)]", small) == 0.0  # 224, 144: outside the smaller image
    assert score_answer_corrected("(60, 50)", mask) == 1.0  # thresholded: 0.5 counts as free space
    assert score_answer_corrected("(200, 0.2, 300, 0.4)", mask) == 0.0  # mixed box: scored, not dropped
    assert score_answer_corrected("(0.3125, 0.2083, 0.46875, 0.41667)", mask) == pytest.approx(100 / 101, abs=0.011)


def test_benchmark_scores_by_position_or_by_id(tmp_path):
    region = np.zeros((480, 640), np.uint8)
    region[100:200, 200:300] = 255
    image = np.zeros((480, 640, 3), np.uint8)
    root = write_where2place(tmp_path, [(image, region, "q0", "seen"), (image, region, "q1", "unseen"),
                                        (image, region, "q2", "unseen")])
    questions = read_where2place(root)
    answers = [{"question_id": 0, "text": "[(0.39, 0.31)]"},  # inside (JPEG interior stays 255)
               {"question_id": 2, "text": "(200, 0.2, 300, 0.4)"},  # raises in compat
               {"question_id": 1, "text": "[(0.39, 0.31), (0.0, 0.0)]"}]  # half inside
    compat = score_where2place(questions, answers, mode="compat")
    assert compat.skipped == [1] and compat.scored == 2  # matched by line: question 1 got the raising answer
    assert compat.score == pytest.approx((1.0 + 0.5) / 2, abs=0.01)
    corrected = score_where2place(questions, answers, mode="corrected")
    assert corrected.skipped == [] and corrected.scored == 3  # matched by id, the failure scores 0
    assert corrected.per_question == pytest.approx({0: 1.0, 1: 0.5, 2: 0.0}, abs=0.01)
    assert corrected.by_category == pytest.approx({"seen": 1.0, "unseen": 0.25}, abs=0.01)
    with pytest.raises(ValueError, match="mode must be"):
        score_where2place(questions, answers, mode="strict")
