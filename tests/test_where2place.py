"""Where2Place: the compat mode reproduces RoboPoint's scorer rule by rule; the corrected mode fixes its quirks.
Answer files are hand-written as RoboPoint's model_vqa writes them."""

import json

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
    assert len(read_where2place(root)) == 3
    questions = root
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


# ---------------------------------------------------------------------------------------------- answer files
# Questions and answers written the way Where2Place and RoboPoint's `model_vqa` write them: point_questions.jsonl
# lines {"question_id", "image", "text", "category"}; answer lines {"question_id", "prompt", "text", "answer_id",
# "model_id", "category"} (LLaVA's original writes "metadata": {} in place of "category").
QUESTIONS = (
    '{"question_id": 0, "image": "05.jpg", "text": "Point to a free spot on the table.", "category": "seen"}\n'
    '{"question_id": 1, "image": "01.jpg", "text": "Point to a free spot left of the mug.", "category": "seen"}\n'
    '{"question_id": 2, "image": "02.jpg", "text": "Point to a free spot near the plate.", "category": "unseen"}\n'
    '{"question_id": 3, "image": "03.jpg", "text": "Point to a free spot on the shelf.", "category": "unseen"}\n'
    '{"question_id": 4, "image": "04.jpg", "text": "Point to a free spot by the bowl.", "category": "unseen"}\n'
)
ANSWERS = (
    '{"question_id": 0, "prompt": "Point to a free spot on the table.", "text": "[(0.39, 0.31), (0.0, 0.0)]", '
    '"answer_id": "3Lqf5uYxXoWbN8aTk2Dz7c", "model_id": "robopoint-v1-vicuna-v1.5-13b", "category": "seen"}\n'
    '{"question_id": 1, "prompt": "Point to a free spot left of the mug.", "answer_id": "Hn4wq8RZbV2mYc6pLk9sTe", '
    '"model_id": "robopoint-v1-vicuna-v1.5-13b", "category": "seen"}\n'
    '{"question_id": 2, "prompt": "Point to a free spot near the plate.", "text": null, '
    '"answer_id": "Qm7vB2xK9pLr4TzW8nYc3d", "model_id": "robopoint-v1-vicuna-v1.5-13b", "metadata": {}}\n'
    '{"question_id": 3, "prompt": "Point to a free spot on the shelf.", "text": "(224, 144)", '
    '"answer_id": "Zr5cN1wQ8yHb3Lk7Vt2mXp", "model_id": "robopoint-v1-vicuna-v1.5-13b", "category": "unseen"}\n'
)  # no line for question 4


def _answers_root(tmp_path):
    """masks/ and point_questions.jsonl only: scoring needs no images/. masks/00..04.jpg hold the free region
    (rows 100-199, columns 200-299); question 0 names image 05.jpg, whose mask masks/05.jpg is empty."""
    from PIL import Image

    root = tmp_path / "where2place"
    (root / "masks").mkdir(parents=True)
    region = np.zeros((480, 640), np.uint8)
    region[100:200, 200:300] = 255
    for index in range(5):
        Image.fromarray(region, mode="L").save(root / "masks" / f"{index:02d}.jpg", quality=95)
    Image.fromarray(np.zeros_like(region), mode="L").save(root / "masks" / "05.jpg", quality=95)
    (root / "point_questions.jsonl").write_text(QUESTIONS)
    answers = tmp_path / "answers.jsonl"
    answers.write_text(ANSWERS)
    return root, answers


def test_compat_skips_missing_answers_and_texts(tmp_path):
    from affordvla.evaluate import read_answer_lines

    root, answers_file = _answers_root(tmp_path)
    answers = read_answer_lines(answers_file)
    assert len(answers) == 4
    compat = score_where2place(root, answers, mode="compat")
    # line 1 has no "text", line 2 a null one, question 4 no answer line: all three skipped, by 0-based number
    assert compat.skipped == [1, 2, 4]
    assert compat.scored == 2
    # question 0 on mask 00.jpg (by line index, not its image 05.jpg): (249, 148) inside, (0, 0) outside -> 0.5;
    # line 3's answer, (224, 144) inside -> 1.0; mean (0.5 + 1.0) / 2; per_question keyed by 0-based number
    assert compat.per_question == pytest.approx({0: 0.5, 3: 1.0}, abs=0.01)
    assert compat.score == pytest.approx(0.75, abs=0.01)
    assert compat.by_category == pytest.approx({"seen": 0.5, "unseen": 1.0}, abs=0.01)
    assert score_where2place(root, answers, mode="compat", num_questions=1).scored == 1


def test_corrected_scores_missing_answers_zero(tmp_path):
    root, answers_file = _answers_root(tmp_path)
    from affordvla.evaluate import read_answer_lines

    corrected = score_where2place(root, read_answer_lines(answers_file), mode="corrected")
    assert corrected.skipped == [] and corrected.scored == 5
    # question 0 reads its own image's mask (05.jpg, empty): 0; questions 1, 2 and 4 have no text: 0
    assert corrected.per_question == pytest.approx({0: 0.0, 1: 0.0, 2: 0.0, 3: 1.0, 4: 0.0}, abs=0.01)


def test_eval_where2place_reports_skipped_questions(tmp_path, capsys):
    from affordvla.evaluate import main

    root, answers_file = _answers_root(tmp_path)
    assert main(["where2place", "--data", str(root), "--answers", str(answers_file)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["skipped"] == 3 and report["skipped_questions"] == [1, 2, 4] and report["scored"] == 2
    assert report["where2place_score"] == pytest.approx(75.0, abs=1.0)
    (root / "masks" / "03.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="03.jpg: Where2Place mask not found"):
        score_where2place(root, [{"text": "(1, 1)"}] * 4, mode="compat")


def test_compat_counts_questions_sharing_an_id(tmp_path):
    """The original iterates lines and never reads question_id: three questions with one id are three scores."""
    root, _ = _answers_root(tmp_path)
    (root / "point_questions.jsonl").write_text(
        '{"question_id": 7, "image": "00.jpg", "text": "Point to a free spot.", "category": "seen"}\n' * 3)
    answers = [{"question_id": 7, "text": "(224, 144)"},  # inside the free region -> 1.0
               {"question_id": 7, "text": "(10, 10)"},  # outside -> 0.0
               {"question_id": 7, "text": "no point"}]  # no tuple -> 0.0
    compat = score_where2place(root, answers, mode="compat")
    assert compat.scored == 3 and compat.skipped == []
    assert compat.score == pytest.approx((1.0 + 0.0 + 0.0) / 3, abs=0.01)
    assert compat.per_question == pytest.approx({0: 1.0, 1: 0.0, 2: 0.0}, abs=0.01)
    with pytest.raises(ValueError, match="question 1: question_id 7 is not a string or int, or repeats"):
        score_where2place(root, answers, mode="corrected")  # matching by id would be ambiguous


def test_unhashable_ids(tmp_path):
    root, _ = _answers_root(tmp_path)
    (root / "point_questions.jsonl").write_text(
        '{"question_id": [0], "image": "00.jpg", "text": "Point to a free spot.", "category": "seen"}\n')
    answers = [{"question_id": [0], "text": "(224, 144)"}]
    compat = score_where2place(root, answers, mode="compat")  # ids are not read: inside -> 1.0
    assert compat.scored == 1 and compat.score == pytest.approx(1.0, abs=0.01)
    with pytest.raises(ValueError, match=r"question 0: question_id \[0\] is not a string or int"):
        score_where2place(root, answers, mode="corrected")


def test_corrected_refuses_two_answers_to_one_question(tmp_path):
    root, _ = _answers_root(tmp_path)
    answers = [{"question_id": 3, "text": "(224, 144)"}, {"question_id": 3, "text": "(1, 1)"}]
    with pytest.raises(ValueError, match="answer 1: a second answer to question_id 3"):
        score_where2place(root, answers, mode="corrected")
    # an answer whose id is no question's (or unhashable) matches nothing: every question scores 0
    corrected = score_where2place(root, [{"question_id": {"a": 1}, "text": "(224, 144)"}], mode="corrected")
    assert corrected.scored == 5 and corrected.score == 0.0


def test_a_blank_answer_line_is_an_error(tmp_path):
    from affordvla.evaluate import read_answer_lines

    _, answers_file = _answers_root(tmp_path)
    lines = ANSWERS.splitlines(keepends=True)
    answers_file.write_text("".join(lines[:2]) + "\n" + "".join(lines[2:]))
    with pytest.raises(ValueError, match=r"answers.jsonl, line 3: a blank line, not a JSON record"):
        read_answer_lines(answers_file)
    answers_file.write_text(ANSWERS + "\n")  # a trailing blank line too: RoboPoint's scorer loads it and fails
    with pytest.raises(ValueError, match=r"answers.jsonl, line 5: a blank line"):
        read_answer_lines(answers_file)
