"""`make bench` keypoint figures name which KALIE scorer they come from."""

from __future__ import annotations

from affordvla.bench.__main__ import _keypoint_figures

# the test metrics a keypoint run logs (the keypoint policy's test/ prefix over KeypointEvaluator.compute)
METRICS = {"test/keypoint_error": 0.1, "test/mean_baseline_error": 0.2, "test/parse_failure_rate": 0.0,
           "test/kalie_corrected/avg_mse": 250.0, "test/kalie_compat/avg_mse": 240.5,
           "test/kalie_compat/scoring_failures": 1.0, "train_seconds": 3.0}


def test_both_kalie_figures_are_named():
    figures = _keypoint_figures("default", METRICS, 4.0)
    assert figures["default.kalie_corrected_avg_mse"] == 250.0
    assert figures["default.kalie_compat_avg_mse"] == 240.5
    assert figures["default.kalie_compat_scoring_failures"] == 1.0
    assert figures["default.error_ratio_to_baseline"] == 0.5 and "default.kalie_avg_mse" not in figures
    # every answer failed KALIE's scorer: it has no mean, and none is made up
    without = {k: v for k, v in METRICS.items() if k != "test/kalie_compat/avg_mse"}
    assert "default.kalie_compat_avg_mse" not in _keypoint_figures("default", without, 4.0)
