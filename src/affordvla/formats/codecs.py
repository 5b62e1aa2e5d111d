"""Keypoint text codecs: normalised (K, 2) keypoints <-> the answer text a VLM is trained to generate.

Every codec works on numpy float arrays of (x, y) normalised to [0, 1] of the image (x = column). `decode`
raises `KeypointParseError`; `try_decode` returns None instead. Both count successes and failures so an
evaluation can report how often a model's output was unreadable rather than crashing on it.
"""

from __future__ import annotations

import abc
import json
import math
import re
from collections.abc import Sequence

import numpy as np

from affordvla.formats.sample import KALIE_POINT_NAMES


class KeypointParseError(ValueError):
    """Generated text could not be read back as keypoints."""


class KeypointCodec(abc.ABC):
    """An answer format for keypoints: encodes points as the text a model is trained to write, and decodes
    generated text back to points (counting the answers it cannot read)."""

    name: str = ""
    fixed_count = True  # encode requires exactly one point per name
    # The image fraction one unit of a coordinate written in digits stands for (KALIE's 0-999 ints: 1/1000;
    # RoboPoint's "0.531": 1, its fraction digits a tenth each further). None: coordinates are not digits.
    integer_unit: float | None = None

    def __init__(self, point_names: Sequence[str] = KALIE_POINT_NAMES) -> None:
        self.point_names = tuple(point_names)
        self.reset_counts()

    # --- public API -------------------------------------------------------------------------------
    def encode(self, keypoints: np.ndarray) -> str:
        return self._encode(self._check(keypoints))

    def decode(self, text: str) -> np.ndarray:
        # Counting happens here (not only in try_decode) so callers that catch errors themselves still count.
        try:
            if not isinstance(text, str):
                raise KeypointParseError(f"expected str, got {type(text).__name__}")
            out = np.asarray(self._decode(text), dtype=np.float64).reshape(-1, 2)
        except KeypointParseError:
            self.n_failed += 1
            raise
        except (ValueError, TypeError, OverflowError) as e:  # any slip in a parser is a parse failure
            self.n_failed += 1
            raise KeypointParseError(str(e)) from e
        self.n_parsed += 1
        return out

    def try_decode(self, text: str) -> np.ndarray | None:
        try:
            return self.decode(text)
        except KeypointParseError:
            return None

    def reset_counts(self) -> None:
        self.n_parsed = 0
        self.n_failed = 0

    @property
    def failure_rate(self) -> float:
        total = self.n_parsed + self.n_failed
        return self.n_failed / total if total else 0.0

    # --- subclass hooks ---------------------------------------------------------------------------
    @abc.abstractmethod
    def _encode(self, keypoints: np.ndarray) -> str: ...

    @abc.abstractmethod
    def _decode(self, text: str) -> np.ndarray: ...

    def _check(self, keypoints: np.ndarray) -> np.ndarray:
        kp = np.asarray(keypoints, dtype=np.float64)
        if kp.ndim != 2 or kp.shape[1] != 2:
            raise ValueError(f"keypoints must be (K, 2), got {kp.shape}")
        if self.fixed_count and len(kp) != len(self.point_names):
            raise ValueError(f"{len(kp)} keypoints but {len(self.point_names)} point names")
        return kp


class PaliGemmaLocCodec(KeypointCodec):
    """`<locYYYY><locXXXX>` per point (y first, PaliGemma convention), bin index of `bins` equal bins."""

    name = "paligemma_loc"
    _LOC = re.compile(r"<loc(\d+)>")

    def __init__(self, point_names: Sequence[str] = KALIE_POINT_NAMES, bins: int = 1024) -> None:
        super().__init__(point_names)
        if not 1 <= bins <= 10_000:  # indices must fit the 4-digit token
            raise ValueError(f"bins must be in 1..10000, got {bins}")
        self.bins = bins

    def _index(self, v: float) -> int:
        return min(max(math.floor(v * self.bins), 0), self.bins - 1)

    def _encode(self, kp: np.ndarray) -> str:
        return "".join(f"<loc{self._index(y):04d}><loc{self._index(x):04d}>" for x, y in kp)

    def _decode(self, text: str) -> np.ndarray:
        need = 2 * len(self.point_names)
        # Anything that is not a loc token (labels, spaces, stray tokens) is ignored; extras beyond 2K dropped.
        toks = self._LOC.findall(text)[:need]
        if len(toks) < need:
            raise KeypointParseError(f"{len(toks)} loc tokens, need {need}")
        idx = []
        for t in toks:
            if len(t) != 4 or int(t) >= self.bins:
                raise KeypointParseError(f"loc token <loc{t}> out of range for {self.bins} bins")
            idx.append(int(t))
        yx = (np.array(idx, dtype=np.float64).reshape(-1, 2) + 0.5) / self.bins  # bin centres
        return yx[:, ::-1]


class KalieJsonCodec(KeypointCodec):
    """KALIE's target text: indent-4 JSON of zero-padded 3-digit strings on a 0-999 scale of its 450x450 crop.

    Reading is lenient about the wrapping (prose, code fences, single quotes, trailing commas, a missing closing
    brace, key case, KALIE's "Grasp Point: (x, y)" string format, a missing opening brace or comma) and strict
    about the values: every named point needs exactly two finite numbers in 0..999.
    """

    name = "kalie_json"
    integer_unit = 1e-3
    _TRAILING_COMMA = re.compile(r",\s*([}\]])")
    _INT = r"\s*[\"']?(\d+)[\"']?\s*"

    def __init__(self, point_names: Sequence[str] = KALIE_POINT_NAMES) -> None:
        super().__init__(point_names)
        # `"Name": [x, y]` or `Name: (x, y)`, quotes optional: found by name when the text is not valid JSON.
        self._pairs = [
            re.compile(r"(?<![\w-])[\"']?" + re.escape(n) + r"[\"']?\s*:\s*[\[(]" + self._INT + ","
                       + self._INT + r",?\s*[\])]", re.IGNORECASE)
            for n in self.point_names
        ]

    @staticmethod
    def _fmt(v: float) -> str:
        i = round(v * 1000)  # an int for Python and numpy floats alike
        return "000" if i < 0 else "999" if i >= 1000 else f"{i:03d}"

    def _encode(self, kp: np.ndarray) -> str:
        return json.dumps({n: [self._fmt(x), self._fmt(y)] for n, (x, y) in zip(self.point_names, kp)}, indent=4)

    def _decode(self, text: str) -> np.ndarray:
        pairs = self._pairs_from_json(text)
        if pairs is None:
            pairs = self._pairs_from_names(text)
        if pairs is None:
            raise KeypointParseError("no JSON object or 'Name: (x, y)' pair for every point")
        return np.array([[self._coordinate(c) for c in pair] for pair in pairs])

    @staticmethod
    def _coordinate(c) -> float:
        if isinstance(c, bool) or not isinstance(c, (int, float, str)):
            raise KeypointParseError(f"coordinate {c!r} is not a number")
        v = float(c)  # int(float(v)) like KALIE's scorer, so "397.9" reads as 397
        if not 0 <= v < 1000:  # also rejects NaN and infinities
            raise KeypointParseError(f"coordinate {c!r} outside 0..999")
        return int(v) / 1000

    def _pairs_from_json(self, text: str) -> list | None:
        obj = self._load_json(text)
        if not obj:
            return None
        found = {str(k).strip().lower(): v for k, v in obj.items()}  # models sometimes change the case
        pairs = [found.get(n.lower()) for n in self.point_names]
        if not all(isinstance(v, (list, tuple)) and len(v) == 2 for v in pairs):
            return None
        return pairs

    def _pairs_from_names(self, text: str) -> list | None:
        matches = [p.search(text) for p in self._pairs]
        return None if None in matches else [m.groups() for m in matches]

    def _load_json(self, text: str) -> dict | None:
        start = text.find("{")
        if start < 0:
            return None
        # Repairs: single quotes, trailing commas; raw_decode ignores text after the object.
        body = self._TRAILING_COMMA.sub(r"\1", text[start:].replace("'", '"'))
        dec = json.JSONDecoder()
        try:
            obj = dec.raw_decode(body)[0]
        except json.JSONDecodeError:
            # Truncated output: keep up to the last complete point and close the open braces. A half-written
            # last point is cut off, so it shows up as a missing point rather than a wrong value.
            cut = body[: body.rfind("]") + 1]
            cut = cut + "}" * max(cut.count("{") - cut.count("}"), 0)
            try:
                obj = dec.raw_decode(cut)[0]
            except json.JSONDecodeError:
                return None
        return obj if isinstance(obj, dict) else None


class RoboPointTupleCodec(KeypointCodec):
    """RoboPoint answer `[(0.512, 0.334), (0.100, 0.900)]`: any number of points in [0, 1], 3 decimals.

    Reading collects every parenthesised pair of numbers (RoboPoint's scorer does the same): prose around them,
    missing brackets, spacing, quotes and trailing commas are tolerated, groups that are not two numbers (prose
    in parentheses, 3-tuples) are skipped, and a truncated last tuple drops out. A pair whose number is NaN or
    outside [0, 1] fails the whole answer rather than being dropped or clipped.
    """

    name = "robopoint"
    fixed_count = False  # RoboPoint answers carry 1..N points; names are not written
    integer_unit = 1.0
    # A group ends at ")" or, when the ")" is missing, at the list's "]"; an unclosed group is truncation.
    _GROUP = re.compile(r"\(([^()\[\]]*)[)\]]")
    _NUMBER = re.compile(r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?|nan|inf(?:inity)?)", re.IGNORECASE)

    def __init__(self, point_names: Sequence[str] = KALIE_POINT_NAMES, num_points: int | None = None) -> None:
        super().__init__(point_names)
        self.num_points = num_points

    def _encode(self, kp: np.ndarray) -> str:
        # Clipped like the other codecs' grids (and +0.0 turns -0.0 into 0.0, so no "-0.000").
        kp = np.clip(kp, 0.0, 1.0) + 0.0
        return "[" + ", ".join(f"({x:.3f}, {y:.3f})" for x, y in kp) + "]"

    def _decode(self, text: str) -> np.ndarray:
        pts = []
        for group in self._GROUP.findall(text):
            items = [i.strip().strip("\"'").strip() for i in group.split(",")]
            if len(items) == 3 and not items[2]:  # "(x, y,)"
                items = items[:2]
            if len(items) != 2 or not all(self._NUMBER.fullmatch(i) for i in items):
                continue
            xy = [float(i) for i in items]
            if not all(0.0 <= v <= 1.0 for v in xy):  # also rejects NaN and infinities
                raise KeypointParseError(f"point ({group}) outside [0, 1]")
            pts.append(xy)
        need = self.num_points if self.num_points is not None else 1
        if len(pts) < need:
            raise KeypointParseError(f"{len(pts)} point tuples, need {need}")
        return np.array(pts[: self.num_points] if self.num_points is not None else pts)


CODECS: dict[str, type[KeypointCodec]] = {
    "paligemma_loc": PaliGemmaLocCodec,
    "kalie_json": KalieJsonCodec,
    "robopoint": RoboPointTupleCodec,
}


def make_codec(name: str, **kwargs) -> KeypointCodec:
    if name not in CODECS:
        raise ValueError(f"unknown keypoint codec {name!r}; valid names: {', '.join(sorted(CODECS))}")
    return CODECS[name](**kwargs)

