"""KALIE's JSON dataset format, read and written as its `hdf5_to_json` writes it.

Layout::

    <root>/imgs/entry_0.png ...
    <root>/data_jsonformat.json   {"entry_i": {"img", "points": <JSON string>, "other": {"task", "objects", ...}}}
    <root>/data_strformat.json    same entries, points as "Grasp Point: (x, y), Function Point: (x, y), ..."

Points are ints on a 0-1000 scale of the image (x = column, y = row), not pixels.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import random
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from affordvla.formats.kalie_tasks import TASKS, task_for_instruction
from affordvla.formats.sample import KALIE_POINT_NAMES, KeypointSample

logger = logging.getLogger(__name__)

JSON_NAME = "data_jsonformat.json"
STR_NAME = "data_strformat.json"
IMG_DIR = "imgs"
SPLITS_FILE = "splits.json"  # the project's own train/val/test keys beside the index (KALIE splits by seed)
MANIFEST = "manifest.json"  # the synthesis stage writes it last: a synthesised dataset, complete
SCALE = 1000  # KALIE's keypoint scale: ints in [0, SCALE]
ON_ERROR_CHOICES = ("raise", "skip")


class KalieFormatError(ValueError):
    """A KALIE dataset file does not follow the format; the message names the file and the entry."""


@dataclass
class KalieEntry:
    """One entry of a KALIE data_jsonformat.json: image, the five keypoints, task and objects."""

    key: str
    image_path: Path
    points: dict[str, tuple[int, int]]  # KALIE_POINT_NAMES order, 0-1000 ints
    task: str
    objects: list[str]
    other: dict[str, Any]  # the whole "other" dict, kept so rewriting an entry loses nothing
    source: Path | None = None  # the data_jsonformat.json it came from, for error messages and meta


# ---------------------------------------------------------------------------------------------- points


def _check_point(name: str, value: Any, where: str) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise KalieFormatError(f"{where}: {name!r} must be a list [x, y] of 2 ints, got {value!r}")
    out = []
    for v in value:
        # bool is an int subclass and floats may hide rounding: accept true ints only.
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise KalieFormatError(f"{where}: {name!r} coordinate {v!r} is not an int")
        if not 0 <= int(v) <= SCALE:
            raise KalieFormatError(f"{where}: {name!r} coordinate {v} is outside [0, {SCALE}]")
        out.append(int(v))
    return out[0], out[1]


def _check_points(points: Mapping[str, Any], where: str) -> dict[str, tuple[int, int]]:
    names = set(points)
    missing = [n for n in KALIE_POINT_NAMES if n not in names]
    extra = sorted(names - set(KALIE_POINT_NAMES))
    if missing or extra:
        raise KalieFormatError(f"{where}: points must name exactly {list(KALIE_POINT_NAMES)}; "
                               f"missing {missing}, unexpected {extra}")
    # Return in canonical order: downstream code reads the values positionally.
    return {n: _check_point(n, points[n], where) for n in KALIE_POINT_NAMES}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last duplicate; a doubled point name is a labelling bug.
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_points_string(text: str, *, where: str) -> dict[str, tuple[int, int]]:
    """Parse the JSON string stored under "points" into {name: (x, y)} in KALIE_POINT_NAMES order."""
    if not isinstance(text, str):
        raise KalieFormatError(f"{where}: points must be a JSON string, got {type(text).__name__}")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except ValueError as exc:  # JSONDecodeError is a ValueError, as is our duplicate-key error
        raise KalieFormatError(f"{where}: points string is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise KalieFormatError(f"{where}: points string must hold a JSON object, got {type(obj).__name__}")
    return _check_points(obj, where)


def points_to_json_string(points: Mapping[str, Sequence[int]]) -> str:
    """The "points" value exactly as hdf5_to_json writes it: json.dumps(..., indent=4), canonical key order."""
    return json.dumps({n: [int(points[n][0]), int(points[n][1])] for n in KALIE_POINT_NAMES}, indent=4)


def points_to_str_format(points: Mapping[str, Sequence[int]]) -> str:
    """The data_strformat.json form: "Grasp Point: (x, y), Function Point: (x, y), ..."."""
    return ", ".join(f"{n}: ({int(points[n][0])}, {int(points[n][1])})" for n in KALIE_POINT_NAMES)


def to_kalie_int(v: float) -> int:
    """Normalised coordinate -> KALIE 0-1000 int (Python round, as KALIE uses), clamped into range."""
    if not math.isfinite(v):
        raise ValueError(f"cannot convert non-finite coordinate {v!r} to a KALIE int")
    return min(SCALE, max(0, int(round(v * SCALE))))


# ---------------------------------------------------------------------------------------------- reading


def _entry_sort_key(key: str) -> tuple[str, int, str]:
    # entry_2 before entry_10: split off a trailing number and compare it as an int.
    m = re.search(r"(\d+)$", key)
    return (key[: m.start()], int(m.group(1)), key) if m else (key, -1, key)


def _resolve_image(root: Path, img: str) -> Path:
    p = Path(img)
    if p.is_absolute():
        return p
    resolved = root / p
    if not resolved.exists() and (root / IMG_DIR / p.name).exists():
        # hdf5_to_json stores f"{outdir}imgs/...", i.e. relative to the cwd it ran in, not to the root.
        return root / IMG_DIR / p.name
    return resolved


def _parse_entry(root: Path, json_path: Path, key: str, value: Any) -> KalieEntry:
    where = f"{json_path}, entry {key!r}"
    if not isinstance(value, dict):
        raise KalieFormatError(f"{where}: entry must be a JSON object, got {type(value).__name__}")
    for field_name in ("img", "points", "other"):
        if field_name not in value:
            raise KalieFormatError(f"{where}: missing {field_name!r}")
    img, other = value["img"], value["other"]
    if not isinstance(img, str) or not img:
        raise KalieFormatError(f"{where}: 'img' must be a non-empty path string, got {img!r}")
    if not isinstance(other, dict):
        raise KalieFormatError(f"{where}: 'other' must be a JSON object, got {type(other).__name__}")
    if not isinstance(other.get("task"), str):
        raise KalieFormatError(f"{where}: other.task must be a string, got {other.get('task')!r}")
    objects = other.get("objects")
    if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
        raise KalieFormatError(f"{where}: other.objects must be a list of strings, got {objects!r}")
    points = parse_points_string(value["points"], where=where)
    image_path = _resolve_image(root, img)
    if not image_path.is_file():
        raise KalieFormatError(f"{where}: image file not found: {image_path}")
    return KalieEntry(key, image_path, points, other["task"], list(objects), other, source=json_path)


def read_kalie_index(root: str | Path, *, on_error: str = "raise") -> tuple[list[KalieEntry], int]:
    """Read and validate `root/data_jsonformat.json`; returns (entries in numeric key order, n_skipped).

    File-level problems always raise; per-entry problems raise or, with on_error="skip", are logged and counted.
    """
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    root = Path(root)
    json_path = root / JSON_NAME
    if not json_path.is_file():
        raise KalieFormatError(f"{json_path}: file not found (expected the KALIE index {JSON_NAME})")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise KalieFormatError(f"{json_path}: invalid JSON at line {exc.lineno}, column {exc.colno}: "
                               f"{exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise KalieFormatError(f"{json_path}: not UTF-8 text: {exc}") from None
    if not isinstance(data, dict):
        raise KalieFormatError(f"{json_path}: top level must be an object of entries, got {type(data).__name__}")

    entries: list[KalieEntry] = []
    skipped = 0
    for key in sorted(data, key=_entry_sort_key):
        try:
            entries.append(_parse_entry(root, json_path, key, data[key]))
        except KalieFormatError as exc:
            if on_error == "raise":
                raise
            skipped += 1
            logger.warning("skipping KALIE entry: %s", exc)
    return entries, skipped


def load_kalie_sample(entry: KalieEntry) -> KeypointSample:
    """Decode the entry's image and turn its 0-1000 points into a normalised KeypointSample."""
    source = str(entry.source) if entry.source is not None else ""
    try:
        with Image.open(entry.image_path) as im:
            image = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
        raise KalieFormatError(f"{source or entry.image_path}, entry {entry.key!r}: cannot read image "
                               f"{entry.image_path}: {exc}") from None
    known = TASKS.get(entry.task) or task_for_instruction(entry.task)
    # KALIE's own files store the instruction text as "task"; a task name is mapped to its instruction.
    instruction = TASKS[entry.task].instruction if entry.task in TASKS else entry.task
    keypoints = np.array([entry.points[n] for n in KALIE_POINT_NAMES], dtype=np.float32) / SCALE
    return KeypointSample(
        image=image,
        instruction=instruction,
        keypoints=keypoints,
        point_names=KALIE_POINT_NAMES,
        task=known.name if known else entry.task,
        objects=list(entry.objects),
        meta={"source": source, "entry": entry.key, "image_path": str(entry.image_path)},
    )


# ---------------------------------------------------------------------------------------------- writing


def _atomic_write(path: Path, write: Any, mode: str = "w") -> None:
    # Temp file in the target dir, then os.replace: readers never see a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_existing(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise KalieFormatError(f"{path}: top level must be an object of entries, got {type(data).__name__}")
    return data


def write_kalie_dataset(
    root: str | Path,
    entries: Iterable[tuple[np.ndarray, Mapping[str, Sequence[int]], Mapping[str, Any]]],
    *,
    write_str_format: bool = True,
    start_index: int = 0,
) -> list[str]:
    """Write (image uint8 HxWx3, points 0-1000, other) items as entry_{start_index + j}; returns the keys.

    Images are written first and the JSON files last, so no entry is listed without its image. With
    start_index > 0 the entries already in the JSON files are kept (appending); with 0 they are replaced.
    """
    if start_index < 0:
        raise ValueError(f"start_index must be >= 0, got {start_index}")
    root = Path(root)
    (root / IMG_DIR).mkdir(parents=True, exist_ok=True)
    json_path, str_path = root / JSON_NAME, root / STR_NAME
    js = _load_existing(json_path) if start_index > 0 else {}
    st = _load_existing(str_path) if start_index > 0 and write_str_format else {}

    keys: list[str] = []
    for i, (image, points, other) in enumerate(entries, start=start_index):
        key = f"entry_{i}"
        where = f"{json_path}, entry {key!r}"
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{where}: image must be uint8 HxWx3, got {image.dtype} {image.shape}")
        checked = _check_points(points, where)
        if not isinstance(other.get("task"), str) or not isinstance(other.get("objects"), list):
            raise ValueError(f"{where}: other must hold 'task' (str) and 'objects' (list), got {dict(other)!r}")
        rel = f"{IMG_DIR}/{key}.png"  # relative to root, so the dataset can be moved
        _atomic_write(root / rel, lambda f, im=image: Image.fromarray(im).save(f, format="PNG"), mode="wb")
        js[key] = {"img": rel, "points": points_to_json_string(checked), "other": dict(other)}
        if write_str_format:
            st[key] = {"img": rel, "points": points_to_str_format(checked), "other": dict(other)}
        keys.append(key)

    def dump(data: dict[str, Any]):
        ordered = {k: data[k] for k in sorted(data, key=_entry_sort_key)}
        return lambda f: json.dump(ordered, f, indent=4)

    if write_str_format:
        _atomic_write(str_path, dump(st))
    _atomic_write(json_path, dump(js))
    return keys


# ---------------------------------------------------------------------------------------------- split


def kalie_split(keys: Sequence[str], *, seed: int = 2023, train_fraction: float = 0.8) -> tuple[list[str], list[str]]:
    """KALIE's split: shuffle a copy with random.Random(seed); the first round(fraction * n) are train."""
    if not 0.0 <= train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in [0, 1], got {train_fraction}")
    shuffled = list(keys)
    random.Random(seed).shuffle(shuffled)
    n_train = round(train_fraction * len(shuffled))
    return shuffled[:n_train], shuffled[n_train:]
