"""Bad inputs to the offline scorers: `affordvla-eval kalie` and `affordvla-eval where2place --answers`."""

from __future__ import annotations

import json

from .conftest import assert_clear_failure


def test_kalie_prediction_without_a_label(workspace):
    from PIL import Image

    data = workspace.user("kalie")
    points = json.dumps({n: [500, 500] for n in ("Grasp Point", "Function Point", "Target Point",
                                                 "Pre-contact Point", "Post-contact Point")}, indent=4)
    (data / "data_jsonformat.json").write_text(json.dumps({"entry_0": {"img": "imgs/entry_0.png", "points": points,
                                                                       "other": {"task": "t", "objects": []}}}))
    (data / "imgs").mkdir()
    Image.new("RGB", (70, 70)).save(data / "imgs" / "entry_0.png")
    preds = workspace.user("preds") / "preds.jsonl"
    preds.write_text('{"id": "entry_7", "answer": "{}"}\n')
    workspace.watch(data, preds.parent)
    result = workspace.run("affordvla-eval", "kalie", "--predictions", str(preds), "--labels", str(data))
    assert_clear_failure(workspace, result, "entry_7", "has no label")


def test_kalie_labels_folder_without_its_index(workspace):
    data = workspace.user("not_kalie")
    preds = workspace.user("preds") / "preds.jsonl"
    preds.write_text('{"id": "entry_0", "answer": "{}"}\n')
    workspace.watch(data, preds.parent)
    result = workspace.run("affordvla-eval", "kalie", "--predictions", str(preds), "--labels", str(data),
                           "--formatstyle", "str")
    assert_clear_failure(workspace, result, "data_jsonformat.json")  # every style's labels come from it


def test_where2place_answers_that_are_not_json_lines(workspace):
    root = workspace.user("where2place")
    (root / "masks").mkdir()
    (root / "point_questions.jsonl").write_text('{"question_id": 0, "image": "00.jpg", "text": "q"}\n')
    answers = workspace.user("answers") / "answers.jsonl"
    answers.write_text('{"question_id": 0, "text": "(1, 2)"}\n{"question_id": 1, "text": \n')
    workspace.watch(root, answers.parent)
    result = workspace.run("affordvla-eval", "where2place", "--data", str(root), "--answers", str(answers))
    assert_clear_failure(workspace, result, "answers.jsonl, line 2")


def test_where2place_answers_with_a_blank_line(workspace):
    root = workspace.user("where2place")
    (root / "masks").mkdir()
    (root / "point_questions.jsonl").write_text('{"question_id": 0, "image": "00.jpg", "text": "q"}\n')
    answers = workspace.user("answers") / "answers.jsonl"
    answers.write_text('\n{"question_id": 0, "text": "(1, 2)"}\n')
    workspace.watch(root, answers.parent)
    result = workspace.run("affordvla-eval", "where2place", "--data", str(root), "--answers", str(answers))
    assert_clear_failure(workspace, result, "answers.jsonl, line 1: a blank line")
