"""Keypoint metrics over a split: mean L2 error (normalised image units), KALIE's per-point MSE on the 0-999
scale twice (`kalie_compat/...`: KALIE's own scoring rules, comparable with its figures; `kalie_corrected/...`:
tolerant reading, all five points required, see metrics/kalie_compat.py), the parse-failure rate, and the
predict-the-training-mean baseline.

The compat scorer reads answer text. When the model answers in KALIE's JSON (`kalie_answers=True`), that text is
scored as generated; other answer formats (location tokens, tuples, a regression head) are scored through the
KALIE answer their decoded points would be, an unreadable answer as an empty one (KALIE's sentinel).

Samples marked `meta["point_set"] = True` (RoboPoint answers: any number of unordered points in a target region)
are scored as point sets: the error is the symmetric mean nearest-point distance between the predicted and true
sets, so any number of predicted points is scored, and its two halves are reported as well: predicted -> nearest
true point (how far off the points are, Where2Place's question in distance form) and true -> nearest predicted
(how much of the region the answer covers). KALIE's named-point scores do not apply to them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from affordvla.formats.codecs import KalieJsonCodec
from affordvla.formats.sample import KALIE_POINT_NAMES, POINT_SET, KeypointSample
from affordvla.metrics.kalie_compat import KalieCompatScorer, corrected_metrics, kalie_corrected_scores

# An answer that does not parse scores the largest distance inside the image, so failures never look good.
UNPARSED_L2 = math.sqrt(2.0)


def nearest_distances(points: np.ndarray, others: np.ndarray) -> np.ndarray:
    """For each of `points` (N, 2), the distance to the nearest of `others` (M, 2)."""
    return np.linalg.norm(points[:, None, :] - others[None, :, :], axis=-1).min(axis=1)


def point_set_errors(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """(predicted -> nearest true, true -> nearest predicted) mean distances; their mean is the set error."""
    return float(nearest_distances(pred, target).mean()), float(nearest_distances(target, pred).mean())


@dataclass
class Prediction:
    """One answer kept for overlays: the sample, the text and its decoded points (None when unreadable)."""

    sample: KeypointSample
    text: str
    keypoints: np.ndarray | None


@dataclass
class KeypointEvaluator:
    """Collects a split's predictions batch by batch (`add`) and reduces them to metrics (`compute`)."""

    mean_keypoints: np.ndarray | None = None
    keep: int = 16  # predictions kept for overlays
    kalie_answers: bool = False  # the texts are KALIE JSON answers: compat-score them as written
    errors: list[float] = field(default_factory=list)
    parsed_errors: list[float] = field(default_factory=list)
    baseline_errors: list[float] = field(default_factory=list)
    kalie_scores: list[dict[str, float]] = field(default_factory=list)  # corrected
    kalie_compat: KalieCompatScorer = field(default_factory=KalieCompatScorer)
    _kalie_codec: KalieJsonCodec = field(default_factory=KalieJsonCodec, init=False, repr=False)  # KALIE's text
    failures: int = 0
    set_precision_errors: list[float] = field(default_factory=list)  # point-set samples: predicted -> true
    set_recall_errors: list[float] = field(default_factory=list)  # point-set samples: true -> predicted
    kept: list[Prediction] = field(default_factory=list)

    def add(self, samples: list[KeypointSample], texts: list[str], predictions: list[np.ndarray | None]) -> None:
        for sample, text, pred in zip(samples, texts, predictions):
            target = sample.keypoints
            point_set = bool(sample.meta.get(POINT_SET, False))
            readable = pred is not None and (len(pred) > 0 if point_set else pred.shape == target.shape)
            if not readable:
                self.failures += 1
                self.errors.append(UNPARSED_L2)
                pred = None
            elif point_set:
                precision, recall = point_set_errors(np.asarray(pred, np.float64).reshape(-1, 2), target)
                self.set_precision_errors.append(precision)
                self.set_recall_errors.append(recall)
                self.parsed_errors.append((precision + recall) / 2)
                self.errors.append(self.parsed_errors[-1])
            else:
                self.parsed_errors.append(float(np.linalg.norm(pred - target, axis=-1).mean()))
                self.errors.append(self.parsed_errors[-1])
            if self.mean_keypoints is not None and point_set:  # the mean as a one-point (or K-point) answer
                self.baseline_errors.append(float(np.mean(point_set_errors(self.mean_keypoints.reshape(-1, 2),
                                                                           target))))
            elif self.mean_keypoints is not None and self.mean_keypoints.shape == target.shape:
                self.baseline_errors.append(float(np.linalg.norm(self.mean_keypoints - target, axis=-1).mean()))
            if not point_set and len(target) == len(sample.point_names):
                self.kalie_scores.append(kalie_corrected_scores(pred, target, sample.point_names))
            if not point_set and tuple(sample.point_names) == KALIE_POINT_NAMES:
                self.kalie_compat.add(self._compat_answer(text, pred), self._kalie_codec.encode(target))
            if len(self.kept) < self.keep:
                self.kept.append(Prediction(sample, text, pred))

    def _compat_answer(self, text: str, pred: np.ndarray | None) -> str:
        if self.kalie_answers:
            return text
        if pred is None or not np.isfinite(pred).all():
            return ""  # no points: KALIE's sentinel
        return self._kalie_codec.encode(pred)

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
        if self.set_precision_errors:
            metrics["point_set_precision_error"] = float(np.mean(self.set_precision_errors))
            metrics["point_set_recall_error"] = float(np.mean(self.set_recall_errors))
        metrics.update(corrected_metrics(self.kalie_scores, "kalie_corrected/"))
        metrics.update(self.kalie_compat.compute("kalie_compat/"))
        return metrics
