"""KALIE's collection HDF5 files and their conversion to the JSON layout.

A collection file is `{data_dir}/{task}/{filename}_{num_trials}.hdf5` with one group per sample, `entry_{i}`,
holding `init_image` (uint8 HxWx3, the camera frame cropped to rows 0-700 and columns 250-950, then turned 180
degrees) and five `(x, y)` int datasets, one per keypoint, on a 0-1000 scale of that image. The task is known
only from the folder name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from affordvla.data.kalie import SCALE, KalieFormatError, write_kalie_dataset
from affordvla.formats.kalie_tasks import TASKS
from affordvla.formats.sample import KALIE_POINT_NAMES

log = logging.getLogger(__name__)

# dataset name in the collection file -> KALIE point name, in KALIE's order
COLLECTION_POINT_KEYS: dict[str, str] = dict(
    zip(("grasp_point", "function_point", "target_point", "pre_contact_point", "post_contact_point"),
        KALIE_POINT_NAMES)
)
CAMERA_CROP = (0, 250, 700, 950)  # row0, col0, row1, col1 of the 720x1280 camera frame


@dataclass
class CollectedSample:
    """One sample of KALIE's HDF5 collection: the stored image and its keypoints."""

    key: str  # entry_i in its file
    image: np.ndarray  # HxWx3 uint8
    points: dict[str, tuple[int, int]]  # KALIE point name -> (x, y) on 0-1000


# ------------------------------------------------------------------------------------- the collection tool


def crop_and_turn(frame: np.ndarray) -> np.ndarray:
    """Camera frame -> the stored `init_image`: crop CAMERA_CROP, then turn 180 degrees."""
    row0, col0, row1, col1 = CAMERA_CROP
    if frame.shape[0] < row1 or frame.shape[1] < col1:
        raise ValueError(f"camera frame {frame.shape} is smaller than the crop {CAMERA_CROP}")
    return np.ascontiguousarray(frame[row0:row1, col0:col1][::-1, ::-1])


def click_to_kalie(x: float, y: float, size: int) -> tuple[int, int]:
    """A click at pixel (x, y) of the turned, cropped image -> KALIE's 0-1000 ints: round(v / size * 1000)."""
    return round(x / size * SCALE), round(y / size * SCALE)


def write_collection_hdf5(path: str | Path, samples: Iterable[tuple[np.ndarray, Mapping[str, Sequence[int]]]]) -> Path:
    """Write (init_image, {point name: (x, y)}) samples as the collection tool does: `entry_{i}` groups."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    by_name = {name: key for key, name in COLLECTION_POINT_KEYS.items()}
    with h5py.File(path, "w") as f:
        for i, (image, points) in enumerate(samples):
            group = f.create_group(f"entry_{i}")
            group.create_dataset("init_image", data=np.asarray(image, dtype=np.uint8))
            for name in KALIE_POINT_NAMES:
                group.create_dataset(by_name[name], data=np.asarray(points[name], dtype=np.int64))
    return path


# ------------------------------------------------------------------------------------------------ reading


def _entry_index(key: str) -> int:
    try:
        return int(key.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def _read_group(path: Path, key: str, group) -> CollectedSample:
    where = f"{path}, entry {key!r}"
    import h5py

    if not isinstance(group, h5py.Group):
        raise KalieFormatError(f"{where}: expected a group, found a {type(group).__name__}")
    missing = [name for name in ("init_image", *COLLECTION_POINT_KEYS) if name not in group]
    if missing:
        raise KalieFormatError(f"{where}: missing dataset(s) {missing}")
    image = np.asarray(group["init_image"][()])
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise KalieFormatError(f"{where}: init_image must be uint8 HxWx3, got {image.dtype} {image.shape}")
    points = {}
    for dataset, name in COLLECTION_POINT_KEYS.items():
        value = np.asarray(group[dataset][()])
        if value.shape != (2,) or not np.issubdtype(value.dtype, np.number):
            raise KalieFormatError(f"{where}: {dataset} must hold two numbers (x, y), got {value!r}")
        x, y = (round(float(v)) for v in value)
        if not (0 <= x <= SCALE and 0 <= y <= SCALE):
            raise KalieFormatError(f"{where}: {dataset} = ({x}, {y}) lies outside 0..{SCALE}")
        points[name] = (x, y)
    return CollectedSample(key, image, points)


def read_collection_hdf5(path: str | Path, *, on_error: str = "raise") -> tuple[list[CollectedSample], int]:
    """All `entry_i` groups of one collection file, in index order; (samples, number skipped)."""
    import h5py

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        if on_error == "skip":
            log.warning("skipping unreadable collection file %s: %s", path, exc)
            return [], 1
        raise KalieFormatError(f"{path}: not a readable HDF5 file ({exc})") from None
    samples, skipped = [], 0
    with f:
        for key in sorted(f.keys(), key=lambda k: (_entry_index(k), k)):
            try:
                if not key.startswith("entry_"):
                    raise KalieFormatError(f"{path}, entry {key!r}: collection groups are named entry_<i>")
                samples.append(_read_group(path, key, f[key]))
            except (KalieFormatError, OSError, KeyError) as exc:
                if on_error != "skip":
                    if isinstance(exc, KalieFormatError):
                        raise
                    raise KalieFormatError(f"{path}, entry {key!r}: unreadable ({exc})") from None
                skipped += 1
                log.warning("skipping %s", exc)
    return samples, skipped


def collection_files(data_dir: str | Path) -> Iterator[tuple[str, Path]]:
    """(task folder name, file) for every `{data_dir}/{task}/*.hdf5`, sorted."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"KALIE collection folder {data_dir} does not exist")
    for task_dir in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        for file in sorted(task_dir.glob("*.hdf5")):
            yield task_dir.name, file


def hdf5_to_json(data_dir: str | Path, out_root: str | Path, *, on_error: str = "raise",
                 write_str_format: bool = True) -> dict[str, int]:
    """Convert every collection file under `data_dir` into one KALIE JSON dataset at `out_root`.

    Entries are numbered entry_0.. in (task folder, file, entry index) order. The task folder must be one of
    KALIE's five tasks: its instruction becomes `other.task` and its object prompts `other.objects`.
    Returns {"entries": written, "skipped": skipped}.
    """
    out = Path(out_root)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # a dataset there would be replaced
        held = sorted(p.name for p in out.iterdir())[:4] if out.is_dir() else []
        raise FileExistsError(f"{out} already exists{f' and holds {held}' if held else ' as a file'}: the converted "
                              "KALIE dataset is written to a new or empty folder only; give another out_dir")
    items: list[tuple[np.ndarray, dict[str, tuple[int, int]], dict]] = []
    skipped = 0
    for task_name, file in collection_files(data_dir):
        task = TASKS.get(task_name)
        if task is None:
            raise KalieFormatError(f"{file}: folder {task_name!r} is not a KALIE task; valid: {sorted(TASKS)}")
        samples, bad = read_collection_hdf5(file, on_error=on_error)
        skipped += bad
        other = {"task": task.instruction, "objects": list(task.objects)}
        items += [(s.image, s.points, dict(other)) for s in samples]
    if not items:
        raise KalieFormatError(f"{data_dir}: no collection entries found under <task>/*.hdf5")
    write_kalie_dataset(out_root, items, write_str_format=write_str_format)
    log.info("wrote %d KALIE entries to %s (%d skipped)", len(items), out_root, skipped)
    return {"entries": len(items), "skipped": skipped}
