"""Keypoint metrics over a split: mean L2 error (normalised image units), KALIE's per-point MSE on the 0-999
scale with its parse-failure penalty, the parse-failure rate, and the predict-the-training-mean baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from affordvla.data.sample import KeypointSample
from affordvla.heads.codecs import kalie_point_scores

# An answer that does not parse scores the largest distance inside the image, so failures never look good.
UNPARSED_L2 = math.sqrt(2.0)


@dataclass
class Prediction:
    sample: KeypointSample
    text: str
    keypoints: np.ndarray | None


@dataclass
class KeypointEvaluator:
    mean_keypoints: np.ndarray | None = None
    keep: int = 16  # predictions kept for overlays
    errors: list[float] = field(default_factory=list)
    parsed_errors: list[float] = field(default_factory=list)
    baseline_errors: list[float] = field(default_factory=list)
    kalie_scores: list[dict[str, float]] = field(default_factory=list)
    failures: int = 0
    kept: list[Prediction] = field(default_factory=list)

    def add(self, samples: list[KeypointSample], texts: list[str], predictions: list[np.ndarray | None]) -> None:
        for sample, text, pred in zip(samples, texts, predictions):
            target = sample.keypoints
            if pred is None or pred.shape != target.shape:
                self.failures += 1
                self.errors.append(UNPARSED_L2)
                pred = None
            else:
                self.parsed_errors.append(float(np.linalg.norm(pred - target, axis=-1).mean()))
                self.errors.append(self.parsed_errors[-1])
            if self.mean_keypoints is not None and self.mean_keypoints.shape == target.shape:
                self.baseline_errors.append(float(np.linalg.norm(self.mean_keypoints - target, axis=-1).mean()))
            if len(target) == len(sample.point_names):
                self.kalie_scores.append(kalie_point_scores(pred, target, sample.point_names))
            if len(self.kept) < self.keep:
                self.kept.append(Prediction(sample, text, pred))

    def compute(self) -> dict[str, float]:
        n = len(self.errors)
        if n == 0:
            return {}
        errors = np.asarray(self.errors)
        metrics = {
            "keypoint_error": float(errors.mean()),
            "keypoint_error_parsed": float(np.mean(self.parsed_errors)) if self.parsed_errors else float("nan"),
            "parse_failure_rate": self.failures / n,
            "num_samples": float(n),
        }
        if self.baseline_errors:
            metrics["mean_baseline_error"] = float(np.mean(self.baseline_errors))
        if self.kalie_scores:
            for key in ("avg_mse", "exact_match"):
                metrics[f"kalie_{key}"] = float(np.mean([s[key] for s in self.kalie_scores]))
        return metrics
