"""LLARVA's prompt and answer text: one builder and one parser for annotation (data/llarva.py), training and
inference (the text action head), so the templates cannot drift apart (LLARVA's own evaluation prompt did).

The human turn: `You are a Franka robot using the joint control. The task is "<task>", and the previous five
(including current) steps are [[...], ...]. Can you predict action of the next 1 step?` (with the visual trace:
`... next 1 step and the trajectories of the end effector?`). The answer: `The next action step: [...]`,
optionally followed by `. The trajectory: [[x, y], ...]`. Numbers are Python's str() of a list of plain floats.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

HISTORY = 5
JOINTS = 7
ROBOT = "a Franka robot using the joint control"
ANSWER_PREFIX = "The next action step: "
TRACE_PREFIX = ". The trajectory: "
IMAGE_MARKER = "<image>\n"  # LLaVA's image placeholder at the start of the human turn
NUMBER_WORDS = {1: "1", 2: "two", 3: "three", 4: "four", 5: "five"}
_LIST = re.compile(r"\[([^\[\]]*)\]")


def plain(value: Any, decimals: int | None = None) -> Any:
    """Nested sequences of numbers as plain Python floats (ints stay ints), rounded to `decimals` when given."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v, decimals) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if decimals is None else round(float(value), decimals)
    return int(value)


def number_text(values: Any, decimals: int | None = None) -> str:
    """Python's str() of the (nested) list of plain numbers, as LLARVA renders them."""
    return str(plain(values, decimals))


def llarva_prompt(description: str, history: Sequence[Sequence[float]] | np.ndarray | None = None, *,
                  visual_trace: bool = False, robot: str = ROBOT, decimals: int | None = None,
                  image_marker: bool = True) -> str:
    """The human turn. `history` holds the recent states (LLARVA: the five most recent joint positions); none or
    an empty one leaves the history clause out. Without `image_marker` the backbone places the image."""
    clause = ""
    if history is not None and len(history):
        word = NUMBER_WORDS.get(len(history), str(len(history)))
        clause = f", and the previous {word} (including current) steps are {number_text(history, decimals)}"
    question = f"You are {robot}. The task is \"{description}\"{clause}. Can you predict action of the next 1 step"
    question += " and the trajectories of the end effector?" if visual_trace else "?"
    return (IMAGE_MARKER if image_marker else "") + question


def llarva_answer(action: Sequence[float] | np.ndarray, trace: Sequence[Sequence[int]] | None = None,
                  decimals: int | None = None) -> str:
    """`The next action step: [...]`, with `. The trajectory: [...]` when a trace is given."""
    answer = ANSWER_PREFIX + number_text(action, decimals)
    if trace is not None:
        answer += TRACE_PREFIX + number_text(trace)
    return answer


def parse_llarva_action(text: str, action_dim: int = JOINTS + 1, previous_gripper: float = 1.0, *,
                        open_missing_gripper: bool = True) -> tuple[np.ndarray, bool]:
    """The first bracketed list after the answer prefix (of the whole text when it has none) -> `action_dim`
    numbers, and whether it parsed. With `open_missing_gripper`, one number short gets the gripper appended as
    open (1.0), as LLARVA does. Anything unparseable falls back to a zero arm and `previous_gripper` instead of
    crashing a rollout."""
    start = text.find(ANSWER_PREFIX.strip())
    match = _LIST.search(text[start:] if start >= 0 else text)
    if match:
        try:
            values = [float(v) for v in match.group(1).split(",")]
        except ValueError:
            values = []
        if open_missing_gripper and len(values) == action_dim - 1:
            values.append(1.0)
        if len(values) == action_dim and all(math.isfinite(v) for v in values):
            return np.array(values, dtype=np.float32), True
    fallback = np.zeros(action_dim, np.float32)
    fallback[-1] = previous_gripper
    return fallback, False
