"""RoboPoint's data: LLaVA conversation JSON and the Where2Place layout.

Training data is a JSON list of `{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "[(0.461, 0.527), ...]"}, ...]}` with image paths relative to an image folder. Each
human/gpt pair is one turn; a turn whose answer is a list of 2-tuples in [0, 1] is a pointing sample. Other
answers (free-text VQA, 4-tuple boxes) are counted and left out of the pointing samples, never silently mixed in.

Where2Place is `images/NN.jpg`, `masks/NN.jpg` (grayscale) and `point_questions.jsonl` lines
`{"question_id", "image", "text", "category"}`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from affordvla.formats.sample import KeypointSample, numbered_point_names

ROBOPOINT_ANSWER_SUFFIX = (
    "Your answer should be formatted as a list of tuples, i.e. [(x1, y1), (x2, y2), ...], where each tuple "
    "contains the x and y coordinates of a point satisfying the conditions above. The coordinates should be "
    "between 0 and 1, indicating the normalized pixel locations of the points in the image."
)
IMAGE_PLACEHOLDER = "<image>"
_POINT_LIST = re.compile(r"^\s*\[\s*(\(\s*[-+]?[\d.]+\s*,\s*[-+]?[\d.]+\s*\)\s*,?\s*)+\]\s*$")
_TUPLE = re.compile(r"\(\s*([-+]?[\d.]+)\s*,\s*([-+]?[\d.]+)\s*\)")


class RoboPointFormatError(ValueError):
    """A RoboPoint / Where2Place file does not follow the format; the message names the file and the entry."""


def parse_point_answer(text: str) -> np.ndarray | None:
    """`[(x, y), ...]` with every coordinate in [0, 1] -> (N, 2); anything else (text, boxes) -> None."""
    if not _POINT_LIST.match(text):
        return None
    points = np.array([[float(x), float(y)] for x, y in _TUPLE.findall(text)], dtype=np.float32)
    if len(points) == 0 or points.min() < 0 or points.max() > 1:
        return None
    return points


@dataclass
class ConversationTurn:
    """One question/answer turn of a RoboPoint (LLaVA-format) conversation about an image."""

    entry_id: str
    turn: int
    image_path: Path
    question: str  # the human text with the <image> placeholder removed
    answer: str


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RoboPointFormatError(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise RoboPointFormatError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None


def read_conversations(json_path: str | Path, image_dir: str | Path) -> list[ConversationTurn]:
    """Every human -> gpt turn of a LLaVA conversation file, with its image resolved under `image_dir`."""
    json_path, image_dir = Path(json_path), Path(image_dir)
    data = _load_json(json_path)
    if not isinstance(data, list):
        raise RoboPointFormatError(f"{json_path}: top level must be a list of entries, got {type(data).__name__}")
    turns: list[ConversationTurn] = []
    for position, entry in enumerate(data):
        entry_id = str(entry.get("id", position)) if isinstance(entry, dict) else str(position)
        where = f"{json_path}, entry {entry_id!r} (#{position})"
        if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
            raise RoboPointFormatError(f"{where}: needs a 'conversations' list")
        if not isinstance(entry.get("image"), str):
            raise RoboPointFormatError(f"{where}: needs an 'image' path (text-only entries carry no points)")
        messages = entry["conversations"]
        if len(messages) % 2 or not messages:
            raise RoboPointFormatError(f"{where}: conversations must alternate human/gpt, got {len(messages)} messages")
        for turn in range(0, len(messages), 2):
            human, gpt = messages[turn], messages[turn + 1]
            if not (isinstance(human, dict) and isinstance(gpt, dict)
                    and human.get("from") == "human" and gpt.get("from") == "gpt"
                    and isinstance(human.get("value"), str) and isinstance(gpt.get("value"), str)):
                raise RoboPointFormatError(f"{where}, turn {turn // 2}: expected a human then a gpt message with text")
            question = human["value"].replace(IMAGE_PLACEHOLDER, "").strip()
            turns.append(ConversationTurn(entry_id, turn // 2, image_dir / entry["image"], question, gpt["value"]))
    return turns


def load_image(path: Path, where: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise RoboPointFormatError(f"{where}: cannot read image {path}: {exc}") from None


def pointing_samples(json_path: str | Path, image_dir: str | Path) -> tuple[list[KeypointSample], Counter]:
    """The pointing turns as KeypointSamples (variable point counts) and a count of the turns left out by kind."""
    samples, left_out = [], Counter()
    for turn in read_conversations(json_path, image_dir):
        points = parse_point_answer(turn.answer)
        if points is None:
            left_out["box" if re.search(r"\(\s*[\d.]+(\s*,\s*[\d.]+){3}\s*\)", turn.answer) else "text"] += 1
            continue
        where = f"{json_path}, entry {turn.entry_id!r}"
        samples.append(KeypointSample(
            image=load_image(turn.image_path, where), instruction=turn.question, keypoints=points,
            point_names=numbered_point_names(len(points)), task="robopoint",
            meta={"source": str(json_path), "entry": f"{turn.entry_id}#{turn.turn}",
                  "image_path": str(turn.image_path)},
        ))
    return samples, left_out


def write_conversations(json_path: str | Path, entries: list[dict[str, Any]]) -> Path:
    """Fixture writer: the list of LLaVA conversation entries exactly as RoboPoint ships them (indent 4)."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(entries, indent=4), encoding="utf-8")
    return json_path


def point_entry(entry_id: str, image: str, question: str, points: np.ndarray) -> dict[str, Any]:
    """One RoboPoint pointing entry: the question with the answer-format suffix, the 3-decimal tuple answer."""
    answer = "[" + ", ".join(f"({x:.3f}, {y:.3f})" for x, y in points) + "]"
    return {"id": entry_id, "image": image, "conversations": [
        {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question} {ROBOPOINT_ANSWER_SUFFIX}"},
        {"from": "gpt", "value": answer},
    ]}


# ------------------------------------------------------------------------------------------------ Where2Place


@dataclass
class Where2PlaceQuestion:
    """One Where2Place question: the image, the mask of correct places, the question text and its category."""

    question_id: int | str
    image_path: Path
    mask_path: Path
    text: str
    category: str  # "seen" | "unseen" (unseen = Where2Place (h))


def read_where2place(root: str | Path) -> list[Where2PlaceQuestion]:
    """`point_questions.jsonl` in file order (the original scorer matches answers to it by line index)."""
    root = Path(root)
    path = root / "point_questions.jsonl"
    if not path.is_file():
        raise RoboPointFormatError(f"{path} does not exist (expected images/, masks/ and point_questions.jsonl)")
    questions = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RoboPointFormatError(f"{where}: invalid JSON ({exc.msg})") from None
        missing = [k for k in ("question_id", "image", "text", "category") if k not in row]
        if missing:
            raise RoboPointFormatError(f"{where}: missing key(s) {missing}")
        image_path = root / "images" / row["image"]
        stem = Path(row["image"]).stem
        mask_path = root / "masks" / f"{stem}.jpg"
        for needed in (image_path, mask_path):
            if not needed.is_file():
                raise RoboPointFormatError(f"{where}: {needed} does not exist")
        questions.append(Where2PlaceQuestion(row["question_id"], image_path, mask_path, row["text"], row["category"]))
    return questions


def write_where2place(root: str | Path, items: list[tuple[np.ndarray, np.ndarray, str, str]]) -> Path:
    """Fixture writer: (image uint8 HxWx3, mask uint8 HxW, question text, category) -> the benchmark layout."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (image, mask, text, category) in enumerate(items):
        name = f"{index:02d}.jpg"
        Image.fromarray(image).save(root / "images" / name, quality=95)
        Image.fromarray(mask, mode="L").save(root / "masks" / name, quality=95)
        lines.append(json.dumps({"question_id": index, "image": name, "text": text, "category": category}))
    (root / "point_questions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root
