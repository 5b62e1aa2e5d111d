"""Bad inputs to the offline scorers: `affordvla-eval kalie` and `affordvla-eval where2place --answers`."""

from __future__ import annotations

import json

from .conftest import assert_clear_failure


def test_kalie_prediction_without_a_label(workspace):
    data = workspace.user("kalie")
    (data / "data_jsonformat.json").write_text(json.dumps({"entry_0": {"img": "imgs/entry_0.png", "points": "{}",
                                                                       "other": {"task": "t", "objects": []}}}))
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
    assert_clear_failure(workspace, result, "data_strformat.json")


def test_where2place_answers_that_are_not_json_lines(workspace):
    root = workspace.user("where2place")
    (root / "masks").mkdir()
    (root / "point_questions.jsonl").write_text('{"question_id": 0, "image": "00.jpg", "text": "q"}\n')
    answers = workspace.user("answers") / "answers.jsonl"
    answers.write_text('{"question_id": 0, "text": "(1, 2)"}\n{"question_id": 1, "text": \n')
    workspace.watch(root, answers.parent)
    result = workspace.run("affordvla-eval", "where2place", "--data", str(root), "--answers", str(answers))
    assert_clear_failure(workspace, result, "answers.jsonl, line 2")
