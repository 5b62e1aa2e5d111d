"""KALIE's offline keypoint scores, in two forms side by side.

`compat` (figures comparable with KALIE's): the rules of KALIE's `calculate_errors(pred, label, formatstyle)`,
reproduced one by one:
- `formatstyle` "str" finds `Name Point: (x, y)` pairs with KALIE's regex (one word before "Point",
  non-negative ints; anything else is dropped); "array" reads items 0-9 of a flat sequence as the five points in
  canonical order; any other style ("json", what KALIE's evaluation passes) is `json.loads` of the whole text,
  where anything that does not load counts as no points (no search for an object inside prose);
- a prediction without points gets the sentinel: MSE 1,000,000 for each of the five canonical keys, average
  1,000,000, abs errors 500; the label is parsed but not looked up;
- otherwise the prediction's keys are scored in their order, each looked up in the label; every coordinate goes
  through `int(float(v))` (truncation toward zero); per point MSE = (dx^2 + dy^2) / 2 with integer abs errors; the
  average is over the prediction's keys (label keys the prediction lacks are not scored);
- where KALIE's function raises (a key missing from the label, a label that does not load, JSON that is not an
  object, a point that is not a pair, a coordinate that is not a number, ...), the answer is a counted scoring
  failure of that exception kind and is left out of the means: KALIE's run would have stopped there.
Aggregation follows KALIE's evaluation: `avg_mse` is the mean over answers, a per-point figure (`grasp_mse`, ...)
the mean over the answers that scored that point, `acc` the exact string match of answer and label.

`corrected` (this project's own figure): the answer read by the tolerant `KalieJsonCodec` (prose, code fences,
case, both text formats), all five points required, an unreadable answer scored as KALIE's sentinel, and
normalised coordinates put on the 0-999 grid by rounding to nearest. A label it cannot read (not five named
pairs of numbers) is counted in `kalie_corrected/unreadable_labels`, its id listed, and left out of its means;
the compat side scores that answer as KALIE does.

`affordvla-eval kalie` scores a predictions file with both. Its inputs:
- predictions: a JSON list, or JSON lines, of `{"id": <entry key>, "answer": <the model's answer>}`; the answer is
  the text as generated (for `--formatstyle array`, a list of ten numbers);
- labels: a file (a JSON object `{id: label}` or a JSON list / JSON lines of `{"id", "label"}`, compared as they
  are), or a KALIE dataset root, whose labels are built the way KALIE's evaluation builds them: each entry's
  0-1000 points of `data_jsonformat.json` de-scaled to pixels of its image (`round(v * W / 1000)`), moved into
  the 450x450 centre crop (box [125, 125, 575, 575] of KALIE's 700x700 images; other sizes get the same
  450/700 fraction, as the project's `--centre-crop` view), re-scaled with `round(p * 1000 / 450)` and clamped
  to 0-999. "json" labels are then KALIE's target text (`json.dumps` with indent 4 of zero-padded 3-digit
  strings), "str" labels `Grasp Point: (397, 093), ...` with the same strings, "array" labels the ten ints.
  The images are read for their size only.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from affordvla.data.kalie import read_kalie_index
from affordvla.data.kalie_augment import KALIE_CROP_FRACTION, centre_crop_box
from affordvla.formats.codecs import KalieJsonCodec
from affordvla.formats.sample import KALIE_POINT_NAMES

FORMATSTYLES = ("json", "str", "array")
SENTINEL_MSE = 1_000_000
SENTINEL_ABS = 500
# KALIE's evaluation names its per-point figures by these prefixes of the canonical keys.
POINT_PREFIXES = dict(zip(KALIE_POINT_NAMES, ("grasp", "func", "targ", "prec", "postc")))
# What KALIE's function can raise on malformed answers or labels; anything else is a bug here and propagates.
FAILURE_KINDS = (KeyError, IndexError, TypeError, ValueError, OverflowError)
_STR_POINT = re.compile(r"([A-Za-z-]+ Point): \((\d+),\s*(\d+)\)")


# ---------------------------------------------------------------------------------------------- compat


def _json_points(text: Any) -> Any:
    try:
        return json.loads(text)
    except Exception:  # noqa: BLE001 - KALIE catches everything here: whatever does not load is "no points"
        return {}


def _str_points(text: Any) -> dict[str, tuple[int, int]]:
    return {m.group(1): (int(m.group(2)), int(m.group(3))) for m in _STR_POINT.finditer(text)}


def _array_points(values: Any) -> dict[str, tuple[Any, Any]]:
    return {name: (values[2 * i], values[2 * i + 1]) for i, name in enumerate(KALIE_POINT_NAMES)}


@dataclass(frozen=True)
class CompatErrors:
    """One answer's result of KALIE's `calculate_errors`: per-key MSE, their average, per-key abs errors."""

    mse: dict
    average_mse: float
    abs_x: dict
    abs_y: dict


def _sentinel() -> CompatErrors:
    return CompatErrors({n: SENTINEL_MSE for n in KALIE_POINT_NAMES}, SENTINEL_MSE,
                        {n: SENTINEL_ABS for n in KALIE_POINT_NAMES}, {n: SENTINEL_ABS for n in KALIE_POINT_NAMES})


def calculate_errors(pred: Any, label: Any, formatstyle: str = "str") -> CompatErrors:
    """KALIE's `calculate_errors` rule for rule, raising where it raises (see the module docstring)."""
    parse = {"str": _str_points, "array": _array_points}.get(formatstyle, _json_points)
    pred_points, label_points = parse(pred), parse(label)  # both parsed first: a bad "str"/"array" label raises
    if len(pred_points) == 0:
        return _sentinel()
    mse, abs_x, abs_y, total = {}, {}, {}, 0
    for key in pred_points:  # the prediction's keys, in its order
        pred_x, pred_y = pred_points[key]
        label_x, label_y = label_points[key]
        px, py = int(float(pred_x)), int(float(pred_y))
        lx, ly = int(float(label_x)), int(float(label_y))
        mse[key] = ((px - lx) ** 2 + (py - ly) ** 2) / 2  # exact ints, then a true division, as KALIE
        abs_x[key], abs_y[key] = abs(px - lx), abs(py - ly)
        total += mse[key]
    return CompatErrors(mse, total / len(pred_points), abs_x, abs_y)


def compat_errors(pred: Any, label: Any, formatstyle: str = "json") -> CompatErrors | str:
    """`calculate_errors`, or the name of the exception kind where KALIE's function would raise."""
    try:
        return calculate_errors(pred, label, formatstyle)
    except FAILURE_KINDS as exc:
        return type(exc).__name__


@dataclass
class KalieCompatScorer:
    """KALIE's evaluation loop over (answer, label) pairs: `add` each, `compute` the figures."""

    formatstyle: str = "json"
    answers: int = 0
    exact: int = 0
    exact_ignoring_case: int = 0
    average_mses: list[float] = field(default_factory=list)
    per_point: dict[str, list[float]] = field(default_factory=dict)
    failures: Counter = field(default_factory=Counter)
    failed: list[tuple[Any, str]] = field(default_factory=list)  # (answer id, exception kind)

    def __post_init__(self) -> None:
        if self.formatstyle not in FORMATSTYLES:
            raise ValueError(f"formatstyle must be one of {FORMATSTYLES}, got {self.formatstyle!r}")

    def add(self, pred: Any, label: Any, answer_id: Any = None) -> CompatErrors | str:
        self.answers += 1
        self.exact += pred == label  # KALIE's "acc": checked before scoring, so failures count here too
        if isinstance(pred, str) and isinstance(label, str):
            self.exact_ignoring_case += pred.lower() == label.lower()
        result = compat_errors(pred, label, self.formatstyle)
        if isinstance(result, str):
            self.failures[result] += 1
            self.failed.append((answer_id, result))
            return result
        self.average_mses.append(result.average_mse)
        for suffix, values in (("mse", result.mse), ("abs_x", result.abs_x), ("abs_y", result.abs_y)):
            for key, value in values.items():
                if key in POINT_PREFIXES:  # KALIE's evaluation files only the five canonical keys
                    self.per_point.setdefault(f"{POINT_PREFIXES[key]}_{suffix}", []).append(value)
        return result

    def compute(self, prefix: str = "kalie_compat/") -> dict[str, float]:
        if not self.answers:
            return {}
        out = {f"{prefix}answers": float(self.answers), f"{prefix}scored": float(len(self.average_mses)),
               f"{prefix}scoring_failures": float(sum(self.failures.values())),
               f"{prefix}acc": self.exact / self.answers,
               f"{prefix}acc_ignoring_case": self.exact_ignoring_case / self.answers}
        for kind in FAILURE_KINDS:
            out[f"{prefix}scoring_failures_{kind.__name__}"] = float(self.failures[kind.__name__])
        if self.average_mses:
            out[f"{prefix}avg_mse"] = float(np.mean(self.average_mses))
        for name in sorted(self.per_point):
            out[f"{prefix}{name}"] = float(np.mean(self.per_point[name]))
        return out


# ---------------------------------------------------------------------------------------------- corrected


def kalie_corrected_scores(pred: np.ndarray | None, target: np.ndarray,
                           point_names: Sequence[str] = KALIE_POINT_NAMES) -> dict[str, float]:
    """KALIE's per-point MSE on the 0-999 grid from normalised (K, 2) points; `pred=None` (unreadable, or not
    finite) gets KALIE's sentinel. Coordinates are rounded to the nearest grid int and clamped to 0..999, as
    KALIE writes its labels (`round(p * 1000 / 450)`, "000"/"999"): truncating instead would move float32
    targets such as 0.29 (stored as 0.28999999...) down a cell. KALIE's own truncation applies to answer text,
    which the codec already read."""
    names = tuple(point_names)
    prefixes = tuple(POINT_PREFIXES.values()) if names == KALIE_POINT_NAMES else tuple(f"p{i}" for i in
                                                                                      range(len(names)))
    target = np.asarray(target, dtype=np.float64).reshape(-1, 2)
    if len(target) != len(names):
        raise ValueError(f"{len(target)} target points but {len(names)} point names")
    if pred is not None:
        pred = np.asarray(pred, dtype=np.float64).reshape(-1, 2)
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {pred.shape} != target shape {target.shape}")
        if not np.isfinite(pred).all():
            pred = None

    out: dict[str, float] = {}
    if pred is None:
        for p in prefixes:
            out.update({f"{p}_mse": float(SENTINEL_MSE), f"{p}_abs_x": float(SENTINEL_ABS),
                        f"{p}_abs_y": float(SENTINEL_ABS)})
        out.update(avg_mse=float(SENTINEL_MSE), exact_match=0.0)
        return out

    def to_grid(a: np.ndarray) -> list[list[int]]:
        return [[min(max(round(v * 1000), 0), 999) for v in row] for row in a]

    pi, ti = to_grid(pred), to_grid(target)
    mses = []
    for p, (px, py), (tx, ty) in zip(prefixes, pi, ti):
        dx, dy = px - tx, py - ty
        mses.append((dx * dx + dy * dy) / 2)
        out.update({f"{p}_mse": mses[-1], f"{p}_abs_x": float(abs(dx)), f"{p}_abs_y": float(abs(dy))})
    out["avg_mse"] = float(np.mean(mses))
    out["exact_match"] = float(pi == ti)
    return out


def corrected_metrics(scores: list[dict[str, float]], prefix: str = "kalie_corrected/") -> dict[str, float]:
    """Means of `kalie_corrected_scores` results: average MSE, exact match and the per-point MSE."""
    keys = ["avg_mse", "exact_match"] + [f"{p}_mse" for p in POINT_PREFIXES.values()]
    found = {k: [s[k] for s in scores if k in s] for k in keys}  # samples with other point names lack grasp_mse...
    return {f"{prefix}{k}": float(np.mean(v)) for k, v in found.items() if v}


# ---------------------------------------------------------------------------------------------- predictions file


def _records(path: Path, what: str) -> list:
    """A JSON document, or JSON lines when the whole file is not one document."""
    text = path.read_text(encoding="utf-8")
    try:
        return [json.loads(text)]
    except json.JSONDecodeError:
        pass
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {number}: neither one JSON document nor JSON lines of {what} "
                                 f"({exc.msg})") from None
    return rows


def _id_rows(path: Path, value_key: str, mapping: bool = False) -> list[tuple[Any, Any]]:
    """(id, value) from a JSON list or JSON lines of {"id", value_key}, or (`mapping`) one object {id: value}."""
    rows = _records(path, f'{{"id", "{value_key}"}}')
    if mapping and len(rows) == 1 and isinstance(rows[0], dict) and "id" not in rows[0]:
        return list(rows[0].items())
    if len(rows) == 1 and isinstance(rows[0], list):
        rows = rows[0]
    out = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or "id" not in row or value_key not in row:
            raise ValueError(f"{path}, record {number}: expected an object with \"id\" and \"{value_key}\", "
                             f"got {str(row)[:80]}")
        out.append((row["id"], row[value_key]))
    return out


def read_predictions(path: str | Path) -> list[tuple[Any, Any]]:
    """(id, answer) pairs in file order (format in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: predictions file not found")
    rows = _id_rows(path, "answer")
    if not rows:
        raise ValueError(f"{path}: no predictions")
    seen = set()
    for answer_id, _ in rows:
        if not isinstance(answer_id, (str, int)) or answer_id in seen:
            raise ValueError(f"{path}: prediction id {answer_id!r} is not a string or int, or appears twice")
        seen.add(answer_id)
    return rows


def crop_label_points(points: dict[str, Sequence[int]], width: int, height: int) -> dict[str, tuple[int, int]]:
    """KALIE's evaluation label of one entry: its 0-1000 image-scale points in 0-999 units of the centre crop."""
    left, top, right, bottom = centre_crop_box(width, height, KALIE_CROP_FRACTION)

    def to_crop(v: int, size: int, offset: int, crop: int) -> int:
        return min(max(round((round(v * size / 1000) - offset) * 1000 / crop), 0), 999)

    return {n: (to_crop(x, width, left, right - left), to_crop(y, height, top, bottom - top))
            for n, (x, y) in points.items()}


def crop_label_text(points: dict[str, tuple[int, int]], formatstyle: str = "json") -> Any:
    """A crop-scale label as KALIE's evaluation compares it, in the given `formatstyle`."""
    if formatstyle == "array":
        return [c for n in KALIE_POINT_NAMES for c in points[n]]
    if formatstyle == "str":
        return ", ".join(f"{n}: ({points[n][0]:03d}, {points[n][1]:03d})" for n in KALIE_POINT_NAMES)
    return json.dumps({n: [f"{points[n][0]:03d}", f"{points[n][1]:03d}"] for n in KALIE_POINT_NAMES}, indent=4)


def read_labels(source: str | Path, formatstyle: str = "json") -> dict[str, Any]:
    """{id: label as KALIE's evaluation compares it}: from a KALIE dataset root (converted to the centre crop, see
    the module docstring) or a labels file (as it is)."""
    source = Path(source)
    if source.is_dir():
        entries, _ = read_kalie_index(source)
        labels = {}
        for entry in entries:
            try:
                with Image.open(entry.image_path) as im:
                    width, height = im.size
            except (OSError, Image.DecompressionBombError) as exc:
                raise ValueError(f"{entry.source}, entry {entry.key!r}: cannot read the size of image "
                                 f"{entry.image_path}: {exc}") from None
            labels[entry.key] = crop_label_text(crop_label_points(entry.points, width, height), formatstyle)
        return labels
    if not source.is_file():
        raise FileNotFoundError(f"{source}: labels must be a KALIE dataset root or a labels file")
    return {str(k) if isinstance(k, int) else k: v for k, v in _id_rows(source, "label", mapping=True)}


def label_points(label: Any, formatstyle: str, where: str) -> dict[str, tuple[float, float]]:
    """The five named points of a label, strictly; ValueError naming `where` otherwise (the corrected figure then
    counts the label as unreadable, apart from the model's failures)."""
    if formatstyle == "str":
        found = {m.group(1): (int(m.group(2)), int(m.group(3))) for m in _STR_POINT.finditer(str(label))}
    elif formatstyle == "array":
        values = list(label) if isinstance(label, (list, tuple)) and len(label) >= 10 else []
        found = {n: (values[2 * i], values[2 * i + 1]) for i, n in enumerate(KALIE_POINT_NAMES)} if values else {}
    else:
        found = _json_points(label)
        found = found if isinstance(found, dict) else {}
    points = {}
    for name in KALIE_POINT_NAMES:
        pair = found.get(name)
        try:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise TypeError
            x, y = (float(v) for v in pair)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: label {str(label)[:60]!r} has no two numbers for {name!r}") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"{where}: label point {name!r} is not finite")
        points[name] = (x, y)
    return points


def _corrected_prediction(answer: Any, codec: KalieJsonCodec, formatstyle: str) -> np.ndarray | None:
    if formatstyle == "array":
        if not isinstance(answer, (list, tuple)) or len(answer) != 10:
            return None
        try:
            values = np.array([float(v) for v in answer])
        except (TypeError, ValueError):
            return None
        ok = np.isfinite(values).all() and ((values >= 0) & (values < 1000)).all()
        return np.floor(values).reshape(5, 2) / 1000 if ok else None
    return codec.try_decode(answer) if isinstance(answer, str) else None


def score_predictions(predictions: list[tuple[Any, Any]], labels: dict[Any, Any],
                      formatstyle: str = "json", source: str = "labels") -> dict[str, Any]:
    """Compat and corrected figures of (id, answer) pairs against `labels`, as one report."""
    compat = KalieCompatScorer(formatstyle)
    codec = KalieJsonCodec()
    corrected, unreadable, bad_labels = [], 0, []
    for answer_id, answer in predictions:
        key = str(answer_id) if isinstance(answer_id, int) else answer_id
        if key not in labels:
            raise ValueError(f"prediction {answer_id!r} has no label in {source}")
        label = labels[key]
        compat.add(answer, label, answer_id)  # first: KALIE counts (or fails on) every answer, whatever its label
        try:
            target = label_points(label, formatstyle, f"{source}, {answer_id!r}")
        except ValueError:
            bad_labels.append(answer_id)  # the corrected figure cannot score it; counted and listed, not averaged
            continue
        pred = _corrected_prediction(answer, codec, formatstyle)
        unreadable += pred is None
        corrected.append(kalie_corrected_scores(pred, np.array([target[n] for n in KALIE_POINT_NAMES]) / 1000))
    report: dict[str, Any] = {"formatstyle": formatstyle, "answers": len(predictions),
                              "labels_unanswered": len(labels) - len(predictions)}
    report.update(compat.compute("kalie_compat/"))
    report["kalie_compat/failed"] = [{"id": i, "kind": k} for i, k in compat.failed]
    report.update(corrected_metrics(corrected, "kalie_corrected/"))
    report["kalie_corrected/parse_failures"] = float(unreadable)
    report["kalie_corrected/unreadable_labels"] = float(len(bad_labels))
    report["kalie_corrected/unreadable_label_ids"] = bad_labels
    return report
