"""Action metrics and CALVIN long-horizon metrics, checked against numbers computed by hand."""

import json

import numpy as np
import pytest
from data_formats import KALIE_ANSWER_TEXT

from affordvla.evaluation.calvin import (
    load_results,
    long_horizon_metrics,
    require_simulator,
    results_from_sequences,
)
from affordvla.metrics.actions import action_metrics, mean_baseline_mse


def test_action_metrics_by_hand():
    target = np.array([[0.0, 0.0, 1.0], [1.0, 1.0, -1.0], [5.0, 5.0, 1.0]])
    predicted = np.array([[1.0, 0.0, 0.3], [1.0, 3.0, 0.2], [0.0, 0.0, -1.0]])
    mask = np.array([True, True, False])  # the third step is past the episode end
    m = action_metrics(predicted, target, mask)
    assert m["action_mse"] == pytest.approx((1 + 0 + 0 + 4) / 4)
    assert m["action_l1"] == pytest.approx((1 + 0 + 0 + 2) / 4)
    assert m["action_mse_dim0"] == pytest.approx(0.5) and m["action_mse_dim1"] == pytest.approx(2.0)
    assert m["gripper_accuracy"] == 0.5  # +0.3 vs +1 agrees, +0.2 vs -1 does not
    assert m["count"] == 2
    with pytest.raises(ValueError, match="selects no step"):
        action_metrics(predicted, target, np.zeros(3, bool))


def test_mean_baseline():
    train = np.array([[1.0, 0.0], [3.0, 0.0]])  # mean arm action 2
    assert mean_baseline_mse(train, np.array([[2.0, 1.0], [4.0, 1.0]])) == pytest.approx((0 + 4) / 2)


def test_long_horizon_metrics_match_the_published_table():
    # 1000 sequences whose counts reproduce RoboVLMs' ABCD->D row: .967 .930 .899 .865 .826, Avg. Len. 4.49
    counts = [0] * 33 + [1] * 37 + [2] * 31 + [3] * 34 + [4] * 39 + [5] * 826
    m = long_horizon_metrics(counts)
    assert [m[f"success_{i}"] for i in range(1, 6)] == pytest.approx([0.967, 0.930, 0.899, 0.865, 0.826])
    assert m["avg_len"] == pytest.approx(sum(m[f"success_{i}"] for i in range(1, 6)))
    assert round(m["avg_len"], 2) == 4.49


def test_sequences_stop_at_the_first_failure(tmp_path):
    assert results_from_sequences([[True, True, False, True, True], [False] * 5, [True] * 5]) == [2, 0, 5]
    (tmp_path / "r.json").write_text(json.dumps([[True, False], [True, True, True]]))
    assert load_results(tmp_path / "r.json") == [1, 3]
    (tmp_path / "r.jsonl").write_text('{"result": 4}\n{"result": 1}\n')
    assert load_results(tmp_path / "r.jsonl") == [4, 1]
    (tmp_path / "bad.jsonl").write_text('{"res": 4}\n')
    with pytest.raises(ValueError, match="bad.jsonl: neither a JSON list nor JSON lines"):
        load_results(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="an integer in 0..5"):
        long_horizon_metrics([6])


def test_missing_simulators_are_named():
    with pytest.raises(RuntimeError, match="need the `calvin_env` package, which is not installed"):
        require_simulator("calvin")
    with pytest.raises(ValueError, match="unknown simulator"):
        require_simulator("mujoco")


# ---------------------------------------------------------------------------------------------- KALIE in the evaluator
# KALIE's answer for these five points, as its fine-tuning data writes it (json.dumps indent 4, zero-padded strings)
KALIE_ANSWER = KALIE_ANSWER_TEXT
POINTS = np.array([[397, 93], [500, 250], [640, 410], [600, 400], [700, 420]]) / 1000


def _sample():
    from affordvla.formats.sample import KeypointSample

    return KeypointSample(np.zeros((4, 4, 3), np.uint8), "Sweep the trash off the table with the brush.", POINTS)


def test_evaluator_scores_kalie_answers_as_written():
    from affordvla.metrics.keypoints import KeypointEvaluator

    evaluator = KeypointEvaluator(kalie_answers=True)
    # the tolerant codec reads both answers; KALIE's json.loads reads only the first (prose before the second)
    evaluator.add([_sample(), _sample()], [KALIE_ANSWER, "Sure! " + KALIE_ANSWER], [POINTS, POINTS])
    m = evaluator.compute()
    assert m["kalie_compat/avg_mse"] == pytest.approx((0 + 1_000_000) / 2)
    assert m["kalie_compat/acc"] == 0.5 and m["kalie_compat/scoring_failures"] == 0
    assert m["kalie_corrected/avg_mse"] == 0.0 and m["kalie_corrected/exact_match"] == 1.0
    assert m["kalie_corrected/grasp_mse"] == 0.0


def test_evaluator_renders_other_answer_formats_for_kalie():
    from affordvla.metrics.keypoints import KeypointEvaluator

    evaluator = KeypointEvaluator()  # e.g. location tokens: compat scores the KALIE answer of the decoded points
    shifted = POINTS + np.array([[0.003, 0.004]] + [[0.0, 0.0]] * 4)  # grasp (400, 97): (9 + 16) / 2 = 12.5
    evaluator.add([_sample(), _sample(), _sample()], ["<loc0001>", "<loc0002>", "garbage"], [POINTS, shifted, None])
    m = evaluator.compute()
    # (0 + 12.5 / 5 + 1e6) / 3, the unreadable answer as KALIE's empty answer: the sentinel
    assert m["kalie_compat/avg_mse"] == pytest.approx((0 + 2.5 + 1_000_000) / 3)
    assert m["kalie_corrected/avg_mse"] == pytest.approx((0 + 2.5 + 1_000_000) / 3)
    assert m["kalie_compat/grasp_mse"] == pytest.approx((0 + 12.5 + 1_000_000) / 3)
    assert m["kalie_compat/acc"] == pytest.approx(1 / 3)  # the exact one renders as the label text
