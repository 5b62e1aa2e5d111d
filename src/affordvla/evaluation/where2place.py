"""Where2Place scoring (RoboPoint's spatial-affordance benchmark), in two modes.

`compat` reproduces RoboPoint's `summarize_vqa.py` number for number, quirks included:
- tuples are found by the regex below; a number containing '.' is a float, otherwise an int;
- a 2-tuple with any float is taken as normalised and scaled by a fixed 640 x 480 with truncation, an all-int
  2-tuple is a pixel; a 4-tuple is a box (scaled when its first number is a float) whose every pixel counts as a
  point; tuples of other lengths are ignored;
- the mask is the grayscale JPEG divided by 255 (soft values at its edges);
- a question scores the mean mask value at its points (a point outside the image scores 0, no points score 0);
  the score is the mean over the questions scored, each counted once whatever its question_id (ids may repeat);
- answers are matched to questions by line position, and a question whose scoring raises is left out of the mean:
  that includes a missing answer line, an answer without `text` and a null `text`;
- the mask is `masks/{i:02d}.jpg` for the question on line i (0-based), whatever its `image` names; the images
  themselves are not read.

`corrected` fixes what the compat mode keeps: the image's own size, a thresholded mask (>= 0.5), answers matched
by question_id, the mask named after the question's image, and every failure (a missing answer included) scored 0
instead of dropped. Matching by id needs each question_id once, a string or an int, and one answer per question:
anything else is an error.

Answers are JSON lines as RoboPoint's `model_vqa` writes them (`question_id`, `prompt`, `text`, `answer_id`,
`model_id`, then `category` or `metadata`); only `question_id` and `text` are read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

TUPLE_PATTERN = re.compile(r"\(([-+]?\d+\.?\d*(?:,\s*[-+]?\d+\.?\d*)*?)\)")
COMPAT_SIZE = (640, 480)  # width, height hard-coded by the original scorer


def _numbers(match: str) -> list[int | float]:
    return [float(n) if "." in n else int(n) for n in match.split(",")]


def compat_points(text: str) -> np.ndarray:
    """(N, 2) integer pixel points the original scorer extracts from an answer (may raise, as it does)."""
    width, height = COMPAT_SIZE
    points: list[tuple[int, int]] = []
    for match in TUPLE_PATTERN.findall(text):
        vector = _numbers(match)
        if len(vector) == 2:
            x, y = vector
            if isinstance(x, float) or isinstance(y, float):
                x, y = int(x * width), int(y * height)
            points.append((x, y))
        elif len(vector) == 4:
            x0, y0, x1, y1 = vector
            if isinstance(x0, float):
                x0, y0, x1, y1 = int(x0 * width), int(y0 * height), int(x1 * width), int(y1 * height)
            box = np.zeros((height, width), dtype=bool)
            box[y0:y1, x0:x1] = True  # a float left here raises TypeError, as in the original
            ys, xs = np.nonzero(box)
            points.extend(zip(xs.tolist(), ys.tolist()))
    return np.array(points, dtype=np.int64).reshape(-1, 2)


def corrected_points(text: str, width: int, height: int) -> np.ndarray:
    """Points in pixels of the actual image: normalised tuples scaled by its size, boxes expanded the same way."""
    points: list[tuple[float, float]] = []
    for match in TUPLE_PATTERN.findall(text):
        vector = [float(n) for n in match.split(",")]
        normalised = all(0.0 <= v <= 1.0 for v in vector) and any("." in n for n in match.split(","))
        sx, sy = (width, height) if normalised else (1.0, 1.0)
        if len(vector) == 2:
            points.append((vector[0] * sx, vector[1] * sy))
        elif len(vector) == 4:
            x0, x1 = sorted((vector[0] * sx, vector[2] * sx))
            y0, y1 = sorted((vector[1] * sy, vector[3] * sy))
            ys, xs = np.mgrid[int(np.floor(y0)) : int(np.ceil(y1)), int(np.floor(x0)) : int(np.ceil(x1))]
            points.extend(zip((xs.reshape(-1) + 0.5).tolist(), (ys.reshape(-1) + 0.5).tolist()))
    return np.array(points, dtype=np.float64).reshape(-1, 2)


def _mask_values(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Mask value at each point (column x, row y); 0 for points outside the mask."""
    xs, ys = np.floor(points[:, 0]).astype(np.int64), np.floor(points[:, 1]).astype(np.int64)
    inside = (xs >= 0) & (xs < mask.shape[1]) & (ys >= 0) & (ys < mask.shape[0])
    values = np.zeros(len(points))
    values[inside] = mask[ys[inside], xs[inside]]
    return values


def load_mask(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float64) / 255.0


def score_points_compat(points: np.ndarray, mask: np.ndarray) -> float:
    return float(_mask_values(mask, points).mean()) if len(points) else 0.0


def score_answer_compat(text: str, mask: np.ndarray) -> float:
    return score_points_compat(compat_points(text), mask)


def score_answer_corrected(text: str, mask: np.ndarray) -> float:
    try:
        points = corrected_points(text, mask.shape[1], mask.shape[0])
    except (ValueError, TypeError):
        return 0.0
    return float(_mask_values(mask >= 0.5, points).mean()) if len(points) else 0.0


@dataclass
class ScoringQuestion:
    """A question as the scorers need it: its line index, id, category and the two masks they read."""

    index: int  # 0-based line of point_questions.jsonl
    question_id: int | str
    category: str
    compat_mask: Path  # masks/{index:02d}.jpg, what the original opens
    mask: Path  # masks/<image stem>.jpg, the question's own mask (corrected mode)


def read_scoring_questions(root: str | Path) -> list[ScoringQuestion]:
    """`point_questions.jsonl` of a Where2Place folder, for scoring only (images are not needed)."""
    root = Path(root)
    path = root / "point_questions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected a Where2Place folder: masks/ and "
                                "point_questions.jsonl)")
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {number}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or "question_id" not in row or not isinstance(row.get("image"), str):
            raise ValueError(f"{path}, line {number}: expected an object with \"question_id\" and \"image\"")
        index = len(questions)
        questions.append(ScoringQuestion(index, row["question_id"], str(row.get("category", "")),
                                         root / "masks" / f"{index:02d}.jpg",
                                         root / "masks" / f"{Path(row['image']).stem}.jpg"))
    return questions


@dataclass
class Where2PlaceResult:
    """Scores of one answers file: the mean, per question and per category, and what compat mode skipped."""

    score: float  # mean over scored questions, in [0, 1] (the paper reports x100)
    scored: int
    skipped: list[int] = field(default_factory=list)  # compat only: 0-based question numbers left out
    per_question: dict = field(default_factory=dict)  # compat: 0-based question number -> score; corrected: id
    by_category: dict[str, float] = field(default_factory=dict)  # seen / unseen (= Where2Place (h))


def _mask(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Where2Place mask not found")
    return load_mask(path)


def _answers_by_id(root: Path, questions: list[ScoringQuestion], answers: list) -> dict:
    """Corrected mode's match by question_id, refusing what would make it ambiguous."""
    ids = set()
    for question in questions:
        if not isinstance(question.question_id, (str, int)) or question.question_id in ids:
            raise ValueError(f"{root / 'point_questions.jsonl'}, question {question.index}: question_id "
                             f"{question.question_id!r} is not a string or int, or repeats an earlier one "
                             "(corrected mode matches answers by id; compat mode matches by line)")
        ids.add(question.question_id)
    by_id = {}
    for number, answer in enumerate(answers):
        answer_id = answer.get("question_id") if isinstance(answer, dict) else None
        if isinstance(answer_id, (str, int)) and answer_id in ids:
            if answer_id in by_id:
                raise ValueError(f"answer {number}: a second answer to question_id {answer_id!r}")
            by_id[answer_id] = answer
    return by_id


def score_where2place(root: str | Path, answers: list, mode: str = "compat",
                      num_questions: int | None = None) -> Where2PlaceResult:
    """Score answers (JSON-lines records in file order) against the Where2Place folder `root`; the first
    `num_questions` questions only when given (the original's --num_questions)."""
    if mode not in ("compat", "corrected"):
        raise ValueError(f"mode must be 'compat' or 'corrected', got {mode!r}")
    questions = read_scoring_questions(root)[:num_questions]
    scores, per_question, skipped, categories = [], {}, [], {}
    by_id = _answers_by_id(Path(root), questions, answers) if mode == "corrected" else {}
    for question in questions:
        if mode == "compat":  # by line position, ids never read; a missing line, `text` or null `text` raises
            try:
                points = compat_points(answers[question.index]["text"])
            except Exception:  # noqa: BLE001 - the original skips any question whose answer parsing raises
                skipped.append(question.index)
                continue
            value = score_points_compat(points, _mask(question.compat_mask))  # read after parsing, as there
            per_question[question.index] = value
        else:
            text = by_id.get(question.question_id, {}).get("text")
            value = score_answer_corrected(text if isinstance(text, str) else "", _mask(question.mask))
            per_question[question.question_id] = value
        scores.append(value)
        categories.setdefault(question.category, []).append(value)
    return Where2PlaceResult(score=float(np.mean(scores)) if scores else 0.0, scored=len(scores), skipped=skipped,
                             per_question=per_question,
                             by_category={c: float(np.mean(v)) for c, v in categories.items()})
