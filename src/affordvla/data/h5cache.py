"""Chunked HDF5 caches: episode datasets (CALVIN, Open X-Embodiment, RLBench) laid out for window reads, and
keypoint datasets (KALIE, RoboPoint) as one group per sample.

Layout::

    /                      attrs: format="affordvla-episodes", layout_version, source, source_format, complete
                           (+ the source's own, e.g. OXE's unlabeled_episodes)
    /episodes/0000000/     attrs: key, instruction, length, done
        images/<camera>    uint8 (T, H, W, 3), one chunk per frame, lzf-compressed
        actions            float32 (T, D)
        state              float32 (T, S)   (when the source has it)

A window read touches only the frames it needs. Conversion is resumable: an episode is marked `done` after its
last dataset is written; on restart finished episodes are skipped and a half-written one is rewritten. Reading a
cache gives the same ActionWindowSamples as reading the source (tests compare them value by value).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from affordvla.formats.sample import ActionWindowSample, KeypointSample

log = logging.getLogger(__name__)
FORMAT = "affordvla-episodes"
LAYOUT_VERSION = 1


class CacheError(ValueError):
    """An HDF5 cache is missing, incomplete or of another layout; the message names the file."""


@dataclass
class EpisodeRecord:
    """One episode as the HDF5 action cache stores it: camera frames, actions, instruction and optional state."""

    key: str  # where it came from (source file / segment), kept for error messages
    images: dict[str, np.ndarray]  # camera -> (T, H, W, 3) uint8
    actions: np.ndarray  # (T, D)
    instruction: str
    state: np.ndarray | None = None  # (T, S)


# --------------------------------------------------------------------------------------------- adapters


def calvin_episodes(root: str | Path, cameras: tuple[str, ...] = ("rgb_static", "rgb_gripper"),
                    action_key: str = "rel_actions", state_key: str | None = "robot_obs") -> Iterator[EpisodeRecord]:
    """One record per language-annotated CALVIN segment."""
    from affordvla.data.calvin import load_frame, read_language_segments

    root = Path(root)
    keys = tuple(cameras) + (action_key,) + ((state_key,) if state_key else ())
    for index, segment in enumerate(read_language_segments(root)):
        frames = [load_frame(root, f, keys) for f in range(segment.start, segment.end + 1)]
        yield EpisodeRecord(
            key=f"{root} segment {index} (frames {segment.start}-{segment.end})",
            images={cam: np.stack([f[cam] for f in frames]) for cam in cameras},
            actions=np.stack([f[action_key] for f in frames]).astype(np.float32),
            instruction=segment.instruction,
            state=np.stack([f[state_key] for f in frames]).astype(np.float32) if state_key else None,
        )


def oxe_episodes(root: str | Path, name: str, split: str = "train") -> Iterator[EpisodeRecord]:
    from affordvla.data.oxe import RLDSDataset

    for episode in RLDSDataset.open(root, name).episodes(split):
        yield EpisodeRecord(key=episode.source, images={"primary": episode.images}, actions=episode.actions,
                            instruction=episode.instruction)


def rlbench_episodes(task_dir: str | Path, cameras: tuple[str, ...] = ("front",)) -> Iterator[EpisodeRecord]:
    """One record per RLBench demonstration: RGB per camera, actions = next step's joint velocities + gripper_open
    (LLARVA's action), state = joint positions. The last frame has no next step and is dropped."""
    from affordvla.data.rlbench import list_episodes

    for episode in list_episodes(task_dir):
        observations = episode.demo().observations
        steps = len(observations) - 1
        actions = np.array([[*np.asarray(observations[t + 1].joint_velocities, dtype=np.float32)[:7],
                             float(observations[t + 1].gripper_open)] for t in range(steps)], dtype=np.float32)
        yield EpisodeRecord(
            key=str(episode.path),
            images={cam: np.stack([episode.rgb(cam, t) for t in range(steps)]) for cam in cameras},
            actions=actions, instruction=episode.descriptions()[0],
            state=np.array([np.asarray(o.joint_positions, dtype=np.float32)[:7] for o in observations[:steps]]),
        )


# ------------------------------------------------------------------------------------------------ writing


def convert(episodes: Iterator[EpisodeRecord], out_path: str | Path, *, source: str, source_format: str,
            total: int | None = None, attrs: Callable[[], dict] | None = None) -> dict[str, int]:
    """Write (or resume writing) the cache; returns {"written": new episodes, "skipped": already done}. `attrs`
    is called once the episodes are exhausted (counts the iterator kept) and stored with `complete`."""
    import h5py

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    with h5py.File(out_path, "a") as f:
        _start_writing(f, out_path, FORMAT, source, source_format)
        group = f.require_group("episodes")
        index = -1
        for index, record in enumerate(tqdm(episodes, total=total, desc=f"caching {source_format}", unit="episode")):
            name = f"{index:07d}"
            if name in group and group[name].attrs.get("done", False):
                if group[name].attrs["key"] != record.key:
                    raise CacheError(f"{out_path}: episode {name} was {group[name].attrs['key']!r}, the source now "
                                     f"gives {record.key!r}; the source changed since the cache was started")
                skipped += 1
                continue
            if name in group:  # interrupted while writing this one
                del group[name]
            _write_episode(group.create_group(name), record)
            f.flush()
            written += 1
        extra = [n for n in group if int(n) > index]
        for name in extra:  # left over from a longer source: the cache mirrors the source exactly
            del group[name]
        if attrs is not None:
            f.attrs.update(attrs())
        f.attrs["complete"] = True
    log.info("cache %s: %d episodes written, %d already there", out_path, written, skipped)
    return {"written": written, "skipped": skipped}


def is_complete(path: str | Path) -> bool:
    """Whether a cache file exists and its last conversion ran to the end."""
    import h5py

    if not Path(path).is_file():
        return False
    with h5py.File(path, "r") as f:
        return bool(f.attrs.get("complete", False))


def _start_writing(f, out_path: Path, layout: str, source: str, source_format: str) -> None:
    """Check that an existing file is a cache of this layout and source, then mark it incomplete until the end."""
    if f.attrs.get("format", layout) != layout:
        raise CacheError(f"{out_path} is not an affordvla {layout} cache (format {f.attrs.get('format')!r})")
    if "source" in f.attrs and f.attrs["source"] != source:
        raise CacheError(f"{out_path} caches {f.attrs['source']!r}, not {source!r}: use another output file")
    f.attrs.update({"format": layout, "layout_version": LAYOUT_VERSION, "source": source,
                    "source_format": source_format, "complete": False})


def _write_episode(group, record: EpisodeRecord) -> None:
    length = len(record.actions)
    images = group.create_group("images")
    for camera, frames in record.images.items():
        if len(frames) != length:
            raise CacheError(f"{record.key}: camera {camera} has {len(frames)} frames for {length} actions")
        images.create_dataset(camera, data=frames, chunks=(1, *frames.shape[1:]), compression="lzf")
    group.create_dataset("actions", data=np.asarray(record.actions, dtype=np.float32))
    if record.state is not None:
        group.create_dataset("state", data=np.asarray(record.state, dtype=np.float32))
    group.attrs.update({"key": record.key, "instruction": record.instruction, "length": length})
    group.attrs["done"] = True  # last: a crash before this line leaves the episode to be rewritten


# ------------------------------------------------------------------------------------------------ reading


class CachedWindowDataset(Dataset):
    """Windows of T frames with n-step action chunks from a cache, one sample per step of every episode.

    `anchor="history"` (Open X-Embodiment, OpenVLA): the window ends at step t, frames before the episode start
    repeat frame 0 and are masked. `anchor="forward"` (CALVIN, RoboVLMs): the window starts at step t, frames
    past the end repeat the last one and are masked. Actions past the episode end are clamped and masked.
    """

    def __init__(self, path: str | Path, window_size: int, chunk_size: int, anchor: str = "history"):
        import h5py

        if anchor not in ("history", "forward"):
            raise ValueError(f"anchor must be 'history' or 'forward', got {anchor!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise CacheError(f"cache {self.path} does not exist; create it with `affordvla-data convert`")
        with h5py.File(self.path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise CacheError(f"{self.path} is not an affordvla episode cache")
            if not f.attrs.get("complete", False):
                raise CacheError(f"{self.path} is incomplete (its conversion was interrupted): run the same "
                                 "`affordvla-data convert` again to finish it")
            self.episodes = sorted(f["episodes"])
            self.lengths = [int(f["episodes"][e].attrs["length"]) for e in self.episodes]
        self.window_size, self.chunk_size, self.anchor = window_size, chunk_size, anchor
        self.index = [(e, t) for e, length in enumerate(self.lengths) for t in range(length)]
        self._file = None

    def __len__(self) -> int:
        return len(self.index)

    def _handle(self):
        if self._file is None:  # opened lazily, once per worker process
            import h5py

            self._file = h5py.File(self.path, "r")
        return self._file

    def __getitem__(self, i: int) -> ActionWindowSample:
        episode, t = self.index[i]
        group = self._handle()["episodes"][self.episodes[episode]]
        length = self.lengths[episode]
        offset = -self.window_size + 1 if self.anchor == "history" else 0
        frame_ids = np.arange(t + offset, t + offset + self.window_size)
        frame_mask = (frame_ids >= 0) & (frame_ids < length)
        frame_ids = frame_ids.clip(0, length - 1)
        action_ids = frame_ids[:, None] + np.arange(self.chunk_size)[None, :]
        action_mask = frame_mask[:, None] & (action_ids < length)
        action_ids = action_ids.clip(0, length - 1)
        lo, hi = int(frame_ids.min()), int(action_ids.max()) + 1  # one contiguous read per dataset
        frames = {cam: group["images"][cam][lo : int(frame_ids.max()) + 1] for cam in group["images"]}
        actions = group["actions"][lo:hi]
        state = group["state"][lo : int(frame_ids.max()) + 1] if "state" in group else None
        return ActionWindowSample(
            images={cam: v[frame_ids - lo] for cam, v in frames.items()},
            instruction=str(group.attrs["instruction"]),
            actions=actions[action_ids - lo], action_mask=action_mask, frame_mask=frame_mask,
            state=None if state is None else state[frame_ids - lo],
            meta={"source": str(self.path), "episode": self.episodes[episode], "step": t,
                  "key": str(group.attrs["key"])},
        )

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None  # h5py handles do not cross process boundaries
        return state


# ------------------------------------------------------------------------------------- keypoint datasets

KEYPOINT_FORMAT = "affordvla-keypoints"


def convert_keypoints(samples: Iterator[KeypointSample], out_path: str | Path, *, source: str, source_format: str,
                      total: int | None = None) -> dict[str, int]:
    """Cache keypoint samples (KALIE, RoboPoint) under /samples/<meta entry>, resumably like `convert`:
    a sample group is written whole, marked done last, and skipped on a rerun."""
    import h5py

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    with h5py.File(out_path, "a") as f:
        _start_writing(f, out_path, KEYPOINT_FORMAT, source, source_format)
        group = f.require_group("samples")
        for sample in tqdm(samples, total=total, desc=f"caching {source_format}", unit="sample"):
            name = str(sample.meta["entry"]).replace("/", "_")
            if name in group and group[name].attrs.get("done", False):
                skipped += 1
                continue
            if name in group:
                del group[name]
            entry = group.create_group(name)
            entry.create_dataset("image", data=sample.image, chunks=sample.image.shape, compression="lzf")
            entry.create_dataset("keypoints", data=sample.keypoints.astype(np.float32))
            entry.attrs.update({"instruction": sample.instruction, "task": sample.task,
                                "point_names": json.dumps(list(sample.point_names)),
                                "objects": json.dumps(list(sample.objects)), "meta": json.dumps(sample.meta)})
            entry.attrs["done"] = True
            f.flush()
            written += 1
        f.attrs["complete"] = True
    return {"written": written, "skipped": skipped}


class KeypointCache:
    """Random access to a keypoint cache by entry key; the sample equals the one the reader gave."""

    def __init__(self, path: str | Path):
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise CacheError(f"cache {self.path} does not exist; create it with `affordvla-data convert`")
        with h5py.File(self.path, "r") as f:
            if f.attrs.get("format") != KEYPOINT_FORMAT or not f.attrs.get("complete", False):
                raise CacheError(f"{self.path} is not a complete affordvla keypoint cache")
            self.keys = sorted(f["samples"])
        self._file = None

    def __contains__(self, key: str) -> bool:
        return key.replace("/", "_") in self.keys

    def get(self, key: str) -> KeypointSample:
        import h5py

        if self._file is None:
            self._file = h5py.File(self.path, "r")
        entry = self._file["samples"][key.replace("/", "_")]
        return KeypointSample(image=entry["image"][()], instruction=str(entry.attrs["instruction"]),
                              keypoints=entry["keypoints"][()],
                              point_names=tuple(json.loads(entry.attrs["point_names"])),
                              task=str(entry.attrs["task"]), objects=json.loads(entry.attrs["objects"]),
                              meta=json.loads(entry.attrs["meta"]))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        return state
