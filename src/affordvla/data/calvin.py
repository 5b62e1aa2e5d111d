"""CALVIN: per-frame `episode_XXXXXXX.npz` files, read without the CALVIN env.

A split folder (`task_ABC_D/training`) holds one npz per frame, `ep_start_end_ids.npy` with the play episodes'
(start, end) frame ranges (inclusive), and `lang_annotations/auto_lang_ann.npy`, a pickled dict whose
`['info']['indx']` lists the (start, end) range of every language-annotated segment and `['language']['ann']`
its instruction. The pickle is read with a restricted unpickler (numpy reconstruction only).

Samples follow RoboVLMs: one per start frame inside each annotated segment; a window of `window_size` frames
and, for each, the next `chunk_size` actions; steps past the segment end repeat the last valid frame with mask 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from affordvla.data.safe_pickle import load_object_npy
from affordvla.formats.sample import ActionWindowSample

log = logging.getLogger(__name__)
LANG_FILE = "lang_annotations/auto_lang_ann.npy"

FRAME_KEYS: dict[str, tuple[str, tuple[int, ...]]] = {  # key -> (dtype, shape) as CALVIN stores them
    "rgb_static": ("uint8", (200, 200, 3)),
    "rgb_gripper": ("uint8", (84, 84, 3)),
    "rgb_tactile": ("uint8", (160, 120, 6)),
    "depth_static": ("float32", (200, 200)),
    "depth_gripper": ("float32", (84, 84)),
    "depth_tactile": ("float32", (160, 120, 2)),
    "actions": ("float64", (7,)),
    "rel_actions": ("float64", (7,)),
    "robot_obs": ("float64", (15,)),
    "scene_obs": ("float64", (24,)),
}
ACTION_DIM = 7  # xyz, euler xyz, gripper (-1 close, +1 open)


class CalvinFormatError(ValueError):
    """A CALVIN split does not follow the format; the message names the file."""


def frame_path(root: Path, index: int) -> Path:
    return root / f"episode_{index:07d}.npz"


@dataclass
class CalvinSegment:
    """One annotated language segment of a CALVIN split: a frame range and its instruction."""

    start: int  # first frame, inclusive
    end: int  # last frame, inclusive
    instruction: str
    task: str


def read_language_segments(root: str | Path) -> list[CalvinSegment]:
    root = Path(root)
    path = root / LANG_FILE
    if not path.is_file():
        raise CalvinFormatError(f"{path} does not exist: a CALVIN split needs its language annotations")
    data = load_object_npy(path)
    try:
        ranges = data["info"]["indx"]
        instructions = data["language"]["ann"]
        tasks = data["language"]["task"]
    except (KeyError, TypeError) as exc:
        raise CalvinFormatError(f"{path}: expected ['info']['indx'], ['language']['ann'] and ['language']['task'] "
                                f"({exc!r} missing)") from None
    if not len(ranges) == len(instructions) == len(tasks):
        raise CalvinFormatError(f"{path}: {len(ranges)} ranges, {len(instructions)} instructions, {len(tasks)} tasks")
    segments = []
    for i, ((start, end), text, task) in enumerate(zip(ranges, instructions, tasks)):
        if int(end) < int(start):
            raise CalvinFormatError(f"{path}: segment {i} ends ({end}) before it starts ({start})")
        segments.append(CalvinSegment(int(start), int(end), str(text), str(task)))
    return segments


def read_episode_ranges(root: str | Path) -> np.ndarray:
    path = Path(root) / "ep_start_end_ids.npy"
    if not path.is_file():
        raise CalvinFormatError(f"{path} does not exist")
    ranges = np.load(path, allow_pickle=False)
    if ranges.ndim != 2 or ranges.shape[1] != 2:
        raise CalvinFormatError(f"{path}: expected an (E, 2) array of start/end frame ids, got {ranges.shape}")
    return ranges.astype(np.int64)


def load_frame(root: Path, index: int, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    path = frame_path(root, index)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise CalvinFormatError(f"{path}: missing key(s) {missing}; has {sorted(npz.files)}")
            frame = {k: npz[k] for k in keys}
    except FileNotFoundError:
        raise CalvinFormatError(f"{path} does not exist (frame {index} of an annotated segment)") from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CalvinFormatError(f"{path}: unreadable frame ({exc})") from None
    for key, value in frame.items():
        _check_value(path, key, value)
    return frame


def _check_value(path: Path, key: str, value: np.ndarray) -> None:
    """Images must be HxWxC uint8 and vectors must have CALVIN's length and be finite."""
    _, shape = FRAME_KEYS.get(key, (None, None))
    if key.startswith("rgb_"):
        if value.dtype != np.uint8 or value.ndim != 3:
            raise CalvinFormatError(f"{path}: {key} must be an HxWxC uint8 image, got {value.dtype} {value.shape}")
    elif shape is not None:
        if value.shape != shape:
            raise CalvinFormatError(f"{path}: {key} has shape {value.shape}, expected {shape}")
        if not np.isfinite(value).all():
            raise CalvinFormatError(f"{path}: {key} holds NaN or infinite values: {value.tolist()}")


class CalvinWindowDataset(Dataset):
    """Language-annotated windows of a CALVIN split as ActionWindowSamples."""

    def __init__(self, root: str | Path, window_size: int = 8, chunk_size: int = 10,
                 cameras: tuple[str, ...] = ("rgb_static", "rgb_gripper"), action_key: str = "rel_actions",
                 state_key: str | None = "robot_obs", frame_cache_size: int = 256):
        self.root = Path(root)
        if not self.root.is_dir():
            raise CalvinFormatError(f"CALVIN split folder {self.root} does not exist")
        if action_key not in ("rel_actions", "actions"):
            raise ValueError(f"action_key must be 'rel_actions' or 'actions', got {action_key!r}")
        self.window_size, self.chunk_size = window_size, chunk_size
        self.cameras, self.action_key, self.state_key = tuple(cameras), action_key, state_key
        self.segments = read_language_segments(self.root)
        # one sample per start frame of every annotated segment
        self.index = [(s, start) for s, seg in enumerate(self.segments) for start in range(seg.start, seg.end + 1)]
        self._keys = self.cameras + (action_key,) + ((state_key,) if state_key else ())
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._cache_size = frame_cache_size

    def __len__(self) -> int:
        return len(self.index)

    def _frame(self, index: int) -> dict[str, np.ndarray]:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        frame = load_frame(self.root, index, self._keys)
        self._cache[index] = frame
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return frame

    def __getitem__(self, i: int) -> ActionWindowSample:
        segment_id, start = self.index[i]
        segment = self.segments[segment_id]
        steps = self.window_size + self.chunk_size - 1
        frame_ids = np.arange(start, start + steps)
        valid = frame_ids <= segment.end
        frames = [self._frame(int(min(f, segment.end))) for f in frame_ids]
        actions = np.stack([f[self.action_key] for f in frames]).astype(np.float32)  # (steps, 7)
        t = np.arange(self.window_size)[:, None] + np.arange(self.chunk_size)[None, :]  # (T, n) step index
        window = slice(0, self.window_size)
        return ActionWindowSample(
            images={cam: np.stack([f[cam] for f in frames[window]]) for cam in self.cameras},
            instruction=segment.instruction,
            actions=actions[t],
            action_mask=valid[t],
            frame_mask=valid[window],
            state=np.stack([f[self.state_key] for f in frames[window]]).astype(np.float32) if self.state_key else None,
            meta={"source": str(self.root), "segment": segment_id, "task": segment.task, "start_frame": start},
        )

    def action_statistics(self, cache_dir: str | Path | None = None) -> dict[str, Any]:
        """Mean, std, q01 and q99 per action dimension over every annotated frame (each frame once).

        Reading every frame's npz takes minutes on a real split, so the result is cached as JSON under a hash of
        the split's episode and language index files and the action key, in `cache_dir`. Without one nothing is
        stored (the split folder is the user's data, never written to); a folder that cannot be written only costs
        the recomputation."""
        digest = hashlib.sha256(self.action_key.encode())
        for index_file in (self.root / "ep_start_end_ids.npy", self.root / LANG_FILE):
            digest.update(index_file.read_bytes() if index_file.is_file() else b"-")
        cache = Path(cache_dir) / f"affordvla_action_stats_{digest.hexdigest()[:16]}.json" if cache_dir else None
        if cache is not None and cache.is_file():
            return json.loads(cache.read_text())
        frames = sorted({f for seg in self.segments for f in range(seg.start, seg.end + 1)})
        values = np.stack([load_frame(self.root, f, (self.action_key,))[self.action_key] for f in frames])
        stats = {"action_key": self.action_key, "count": len(frames),
                 "mean": values.mean(0).tolist(), "std": values.std(0).tolist(),
                 "q01": np.quantile(values, 0.01, axis=0).tolist(), "q99": np.quantile(values, 0.99, axis=0).tolist(),
                 "min": values.min(0).tolist(), "max": values.max(0).tolist()}
        if cache is None:
            return stats
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(stats, indent=2))
            tmp.replace(cache)
        except OSError as exc:
            log.info("action statistics not cached (%s): %s", cache, exc)
        return stats


# ------------------------------------------------------------------------------------------- fixture writer


def write_calvin_split(root: str | Path, episodes: list[int], segments: list[tuple[int, int, str, str]],
                       *, seed: int = 0, first_frame: int = 0) -> Path:
    """Write a CALVIN split as CALVIN's recorder lays it out: consecutive play episodes of the given lengths
    (frame ids from `first_frame`), every frame an npz with all of FRAME_KEYS, `ep_start_end_ids.npy`, and
    `lang_annotations/auto_lang_ann.npy` from (start, end, instruction, task) segments (frame ids, inclusive).
    Frame values are a deterministic function of the frame id, so tests can recompute them."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ranges, frame = [], first_frame
    for length in episodes:
        ranges.append((frame, frame + length - 1))
        for index in range(frame, frame + length):
            save_frame(root, index, fixture_frame(index, seed))
        frame += length
    write_split_index(root, ranges, segments)
    return root


def save_frame(root: Path, index: int, frame: dict[str, np.ndarray]) -> None:
    """One `episode_XXXXXXX.npz`; keys CALVIN has that `frame` lacks are written as zeros of their shape."""
    full = {key: np.zeros(shape, dtype) for key, (dtype, shape) in FRAME_KEYS.items() if key not in frame}
    np.savez_compressed(frame_path(root, index), **full, **frame)


def write_split_index(root: Path, ranges: list[tuple[int, int]], segments: list[tuple[int, int, str, str]]) -> None:
    """`ep_start_end_ids.npy` and `lang_annotations/auto_lang_ann.npy` (CALVIN's pickled dict layout)."""
    np.save(root / "ep_start_end_ids.npy", np.array(ranges, dtype=np.int64))
    (root / "lang_annotations").mkdir(exist_ok=True)
    annotations = {
        "language": {"ann": [s[2] for s in segments], "task": [s[3] for s in segments],
                     "emb": np.zeros((len(segments), 1, 384), dtype=np.float32)},
        "info": {"episodes": [], "indx": [(s[0], s[1]) for s in segments]},
    }
    np.save(root / "lang_annotations" / "auto_lang_ann.npy", annotations, allow_pickle=True)


def fixture_frame(index: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, index])
    frame = {}
    for key, (dtype, shape) in FRAME_KEYS.items():
        if dtype == "uint8":
            frame[key] = rng.integers(0, 256, shape, dtype=np.uint8)
        else:
            frame[key] = rng.uniform(-1, 1, shape).astype(dtype)
    frame["rel_actions"][-1] = frame["actions"][-1] = 1.0 if index % 2 else -1.0  # gripper +-1
    frame["rel_actions"][:6] = np.clip(frame["rel_actions"][:6], -1, 1)
    return frame
