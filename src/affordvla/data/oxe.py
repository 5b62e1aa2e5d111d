"""Open X-Embodiment RLDS datasets (robovlms-calvin-oxe.md section 4), streamed from TFRecord shards without
TensorFlow.

A dataset lives in `<root>/<name>/<version>/` with `dataset_info.json`, `features.json` and shards
`<name>-<split>.tfrecord-NNNNN-of-MMMMM`; each record is one episode whose step features are flattened
(`steps/action`, `steps/observation/image_0`, ...). Per-dataset standardisation turns bridge and fractal (RT-1)
episodes into one schema: RGB frames, 7-D actions (6 end-effector deltas + an absolute gripper, 1 = open) and
the language instruction. Streaming reads one shard and one episode at a time, so memory is bounded by a
shuffle buffer of whole windows, not by the dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import IterableDataset

from affordvla.data.sample import ActionWindowSample
from affordvla.data.tfrecord import TFRecordError, parse_example_record, read_records

log = logging.getLogger(__name__)
TRAIN_FRACTION_WITHOUT_VAL = 0.95  # datasets without a "val" split: train[:95%] for training, train[95%:] to validate

# Named mixtures: (dataset, sampling weight). Weights are OpenVLA's; datasets absent from the data root are
# reported, never silently dropped.
MIXTURES: dict[str, list[tuple[str, float]]] = {
    "bridge": [("bridge_orig", 1.0)],
    "fractal": [("fractal20220817_data", 1.0)],
    "bridge_rt_1": [("bridge_orig", 1.0), ("fractal20220817_data", 1.0)],
    "oxe_magic_soup": [
        ("fractal20220817_data", 0.54087122203), ("kuka", 0.8341046294), ("bridge_orig", 1.0), ("taco_play", 2.0),
        ("jaco_play", 1.0), ("berkeley_cable_routing", 1.0), ("roboturk", 2.0), ("viola", 2.0),
        ("berkeley_autolab_ur5", 2.0), ("toto", 1.0), ("language_table", 0.1),
        ("stanford_hydra_dataset_converted_externally_to_rlds", 2.0),
        ("austin_buds_dataset_converted_externally_to_rlds", 1.0),
        ("nyu_franka_play_dataset_converted_externally_to_rlds", 3.0),
        ("furniture_bench_dataset_converted_externally_to_rlds", 0.1),
        ("ucsd_kitchen_dataset_converted_externally_to_rlds", 2.0),
        ("austin_sailor_dataset_converted_externally_to_rlds", 1.0),
        ("austin_sirius_dataset_converted_externally_to_rlds", 1.0),
        ("dlr_edan_shared_control_converted_externally_to_rlds", 1.0),
        ("iamlab_cmu_pickup_insert_converted_externally_to_rlds", 1.0), ("utaustin_mutex", 1.0),
        ("berkeley_fanuc_manipulation", 2.0), ("cmu_stretch", 1.0),
    ],
}


class OXEFormatError(ValueError):
    """An RLDS dataset folder or episode does not follow the format; the message names the file."""


# ------------------------------------------------------------------------------------------- standardisation


@dataclass
class Episode:
    images: np.ndarray  # (T, H, W, 3) uint8
    actions: np.ndarray  # (T, 7) float32: 6 end-effector deltas + gripper (1 open, 0 closed)
    instruction: str
    source: str


def binarize_gripper(values: np.ndarray, open_above: float = 0.95, closed_below: float = 0.05) -> np.ndarray:
    """Continuous gripper openness -> 1 (open) / 0 (closed); in-between values take the next decided state
    (scanning from the end; an undecided last step counts as closed)."""
    out = np.empty(len(values), dtype=np.float32)
    carry = 1.0 if len(values) and values[-1] > open_above else 0.0
    for t in range(len(values) - 1, -1, -1):
        if values[t] > open_above:
            carry = 1.0
        elif values[t] < closed_below:
            carry = 0.0
        out[t] = carry
    return out


def relative_to_absolute_gripper(values: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """RT-1's relative gripper commands (+1 close, -1 open, ~0 no change) -> absolute state, 1 open / 0 closed.

    Before the first command the gripper is taken to be in the state opposite to it (open if it never moves)."""
    command = np.where(values > threshold, -1.0, np.where(values < -threshold, 1.0, 0.0))  # +1 = open state
    decided = command[command != 0]
    state = -decided[0] if len(decided) else 1.0
    out = np.empty(len(values), dtype=np.float32)
    for t, c in enumerate(command):
        state = c if c != 0 else state
        out[t] = (state + 1) / 2
    return out


def _decode_images(frames: list[bytes], where: str) -> np.ndarray:
    images = []
    for t, data in enumerate(frames):
        try:
            with Image.open(io.BytesIO(data)) as im:
                images.append(np.asarray(im.convert("RGB")))
        except OSError as exc:
            raise OXEFormatError(f"{where}: step {t}: undecodable image ({exc})") from None
    return np.stack(images)


def _steps(features: dict, key: str, where: str, per_step: int | None = None, count: int | None = None):
    if key not in features:
        raise OXEFormatError(f"{where}: missing feature {key!r}; has {sorted(features)[:12]}")
    value = features[key]
    if per_step is not None:
        value = np.asarray(value, dtype=np.float32)
        if count is not None and value.size != count * per_step:
            raise OXEFormatError(f"{where}: {key} has {value.size} values, expected {count} steps x {per_step}")
        return value.reshape(-1, per_step)
    return value


def _instruction(values: list[bytes]) -> str:
    texts = [v.decode("utf-8") for v in values if v]
    return texts[0] if texts else ""


def standardize_bridge(features: dict, where: str) -> Episode:
    """bridge_orig: camera `image_0`; step 0 dropped; deltas relabelled from the end-effector state
    (state[t+1] - state[t], last step dropped); gripper binarised."""
    images = _steps(features, "steps/observation/image_0", where)
    count = len(images)
    actions = _steps(features, "steps/action", where, 7, count)
    state = _steps(features, "steps/observation/state", where, 7, count)
    if count < 3:
        raise OXEFormatError(f"{where}: bridge episode with {count} steps; at least 3 are needed")
    images, actions, state = images[1:], actions[1:], state[1:]
    gripper = binarize_gripper(actions[:, 6])
    deltas = state[1:, :6] - state[:-1, :6]
    return Episode(images=_decode_images(images[:-1], where),
                   actions=np.concatenate([deltas, gripper[:-1, None]], axis=1).astype(np.float32),
                   instruction=_instruction(_steps(features, "steps/language_instruction", where)), source=where)


def standardize_fractal(features: dict, where: str) -> Episode:
    """fractal20220817_data (RT-1): camera `image`; world_vector + rotation_delta + absolute gripper."""
    images = _steps(features, "steps/observation/image", where)
    count = len(images)
    world = _steps(features, "steps/action/world_vector", where, 3, count)
    rotation = _steps(features, "steps/action/rotation_delta", where, 3, count)
    gripper = relative_to_absolute_gripper(_steps(features, "steps/action/gripper_closedness_action", where, 1,
                                                  count)[:, 0])
    return Episode(images=_decode_images(images, where),
                   actions=np.concatenate([world, rotation, gripper[:, None]], axis=1).astype(np.float32),
                   instruction=_instruction(_steps(features, "steps/observation/natural_language_instruction", where)),
                   source=where)


STANDARDIZE: dict[str, Callable[[dict, str], Episode]] = {
    "bridge_orig": standardize_bridge,
    "bridge_dataset": standardize_bridge,
    "fractal20220817_data": standardize_fractal,
}


# ----------------------------------------------------------------------------------------------- datasets


_SHARD = re.compile(r"^(?P<name>.+)-(?P<split>[a-z]+)\.tfrecord-(?P<index>\d{5})-of-(?P<total>\d{5})$")


@dataclass
class RLDSDataset:
    name: str
    path: Path  # <root>/<name>/<version>
    splits: dict[str, list[Path]]  # split -> shards in order
    info: dict[str, Any]

    @classmethod
    def open(cls, root: str | Path, name: str, version: str | None = None) -> RLDSDataset:
        base = Path(root) / name
        if not base.is_dir():
            raise OXEFormatError(f"RLDS dataset folder {base} does not exist")
        if version is None:
            versions = sorted((p for p in base.iterdir() if p.is_dir()),
                              key=lambda p: tuple(int(x) if x.isdigit() else -1 for x in p.name.split(".")))
            if not versions:
                raise OXEFormatError(f"{base}: no version folders")
            path = versions[-1]
        else:
            path = base / version
        info_path = path / "dataset_info.json"
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise OXEFormatError(f"{info_path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise OXEFormatError(f"{info_path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        if not (path / "features.json").is_file():
            raise OXEFormatError(f"{path / 'features.json'} does not exist")
        splits: dict[str, list[tuple[int, Path]]] = {}
        for file in path.iterdir():
            match = _SHARD.match(file.name)
            if match and match["name"] == name:
                splits.setdefault(match["split"], []).append((int(match["index"]), file))
        for split, shards in splits.items():
            total = int(_SHARD.match(shards[0][1].name)["total"])
            if sorted(i for i, _ in shards) != list(range(total)):
                raise OXEFormatError(f"{path}: split {split!r} has shards {sorted(i for i, _ in shards)} of {total}")
        if not splits:
            raise OXEFormatError(f"{path}: no {name}-<split>.tfrecord-NNNNN-of-MMMMM shards")
        return cls(name, path, {s: [f for _, f in sorted(v)] for s, v in splits.items()}, info)

    def content_hash(self) -> str:
        """Hash of the metadata files and every shard's name and size: the key of cached statistics."""
        digest = hashlib.sha256()
        for meta in ("dataset_info.json", "features.json"):
            digest.update((self.path / meta).read_bytes())
        for split in sorted(self.splits):
            for shard in self.splits[split]:
                digest.update(f"{shard.name}:{shard.stat().st_size}".encode())
        return digest.hexdigest()[:16]

    def shard_lengths(self, split: str) -> list[int]:
        """Episodes per shard, from dataset_info.json's shardLengths (counted by streaming when absent)."""
        for entry in self.info.get("splits", []):
            if entry.get("name") == split and "shardLengths" in entry:
                lengths = [int(n) for n in entry["shardLengths"]]
                if len(lengths) == len(self.splits[split]):
                    return lengths
        return [sum(1 for _ in read_records(shard, verify=False)) for shard in self.splits[split]]

    def episode_records(self, split: str, *, rank: int = 0, world_size: int = 1) -> Iterator[tuple[str, bytes]]:
        """(where, serialized Example) for the episodes of a logical split ('train' or 'val'), restricted to this
        consumer's share (consumers = distributed ranks x loader workers). With at least as many shards as
        consumers, shard i goes to consumer i mod world_size (each reads whole shards only). With fewer, shard
        i is shared by consumers i, i + n, i + 2n, ... (n shards), which take its records in turn; either way the
        shares are disjoint and together cover the split. Without a stored 'val' split, the stored train split is
        cut as TFDS's train[:95%] / train[95%:] (by global episode index)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"consumer {rank} is outside {world_size} consumers")
        if split in self.splits:
            stored, keep = split, None
        elif split == "val" and "train" in self.splits:
            stored, keep = "train", "val"
        else:
            raise OXEFormatError(f"{self.path}: no split {split!r}; has {sorted(self.splits)}")
        if keep is None and split == "train" and "val" not in self.splits:
            keep = "train"
        lengths = self.shard_lengths(stored) if keep else [0] * len(self.splits[stored])
        boundary = round(TRAIN_FRACTION_WITHOUT_VAL * sum(lengths))
        shards = len(self.splits[stored])
        if world_size <= shards:  # whole shards dealt out
            mine, turn, turns = lambda i: i % world_size == rank, 0, 1
        else:  # consumers rank % n, rank % n + n, ... share shard rank % n, taking its records in turn
            sharing = range(rank % shards, world_size, shards)
            mine, turn, turns = lambda i: i == rank % shards, sharing.index(rank), len(sharing)
        first = 0
        for shard_index, (shard, length) in enumerate(zip(self.splits[stored], lengths)):
            start, first = first, first + length
            if not mine(shard_index):
                continue
            for index, data in enumerate(read_records(shard)):
                if index % turns != turn:
                    continue
                position = start + index
                if keep == "train" and position >= boundary or keep == "val" and position < boundary:
                    continue
                yield f"{shard}, record {index}", data

    def episodes(self, split: str, *, rank: int = 0, world_size: int = 1, on_error: str = "raise",
                 skipped: list[str] | None = None) -> Iterator[Episode]:
        """Standardised episodes. With on_error="skip", bad episodes are left out and their locations appended
        to `skipped` (the caller's counter); the shard framing must still be intact to go on reading."""
        standardize = STANDARDIZE.get(self.name)
        if standardize is None:
            raise OXEFormatError(f"no standardisation for dataset {self.name!r}; known: {sorted(STANDARDIZE)}")
        for where, data in self.episode_records(split, rank=rank, world_size=world_size):
            try:
                episode = standardize(parse_example_record(data, where), where)
                if not np.isfinite(episode.actions).all():
                    bad = sorted(set(np.nonzero(~np.isfinite(episode.actions))[0].tolist()))
                    raise OXEFormatError(f"{where}: NaN or infinite actions at steps {bad[:10]}")
            except (OXEFormatError, TFRecordError) as exc:
                if on_error != "skip" or isinstance(exc, TFRecordError) and "checksum" in str(exc):
                    raise
                log.warning("skipping %s", exc)
                if skipped is not None:
                    skipped.append(where)
                continue
            yield episode

    def action_statistics(self, cache_dir: str | Path | None = None) -> dict[str, Any]:
        """q01 / q99 / mean / std / min / max of the standardised training actions, computed once and cached
        under the dataset's content hash."""
        cache_dir = Path(cache_dir) if cache_dir is not None else self.path
        content_hash = self.content_hash()
        cache = cache_dir / f"affordvla_action_stats_{content_hash}.json"
        if cache.is_file():
            return json.loads(cache.read_text())
        actions = np.concatenate([e.actions for e in self.episodes("train")])
        stats = {"dataset": self.name, "count": len(actions), "hash": content_hash,
                 "q01": np.quantile(actions, 0.01, axis=0).tolist(), "q99": np.quantile(actions, 0.99, axis=0).tolist(),
                 "mean": actions.mean(0).tolist(), "std": actions.std(0).tolist(),
                 "min": actions.min(0).tolist(), "max": actions.max(0).tolist()}
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats, indent=2))
        tmp.replace(cache)
        return stats


# ------------------------------------------------------------------------------------------------- windows


def episode_windows(episode: Episode, window_size: int, chunk_size: int) -> Iterator[ActionWindowSample]:
    """One sample per step t: frames t-ws+1..t (clamped at 0, masked) and for each the next `chunk_size`
    actions (clamped at the last step, masked)."""
    length = len(episode.actions)
    for t in range(length):
        frame_ids = np.arange(t - window_size + 1, t + 1)
        frame_mask = frame_ids >= 0
        frame_ids = frame_ids.clip(0, length - 1)
        action_ids = frame_ids[:, None] + np.arange(chunk_size)[None, :]
        action_mask = frame_mask[:, None] & (action_ids < length)
        yield ActionWindowSample(
            images={"primary": episode.images[frame_ids]}, instruction=episode.instruction,
            actions=episode.actions[action_ids.clip(0, length - 1)], action_mask=action_mask,
            frame_mask=frame_mask, meta={"source": episode.source, "step": t},
        )


def mixture_weights(mixture: str | list[tuple[str, float]], available: set[str]) -> dict[str, float]:
    """Normalised sampling weights of the mixture's datasets found in `available`; the missing ones are logged."""
    if isinstance(mixture, str) and mixture not in MIXTURES:
        raise ValueError(f"unknown mixture {mixture!r}; valid: {sorted(MIXTURES)}")
    entries = MIXTURES[mixture] if isinstance(mixture, str) else mixture
    present = [(name, w) for name, w in entries if name in available]
    missing = [name for name, _ in entries if name not in available]
    if missing:
        log.warning("mixture datasets not found under the data root and left out: %s", missing)
    if not present:
        raise OXEFormatError(f"none of the mixture's datasets are available: {[n for n, _ in entries]}")
    total = sum(w for _, w in present)
    return {name: w / total for name, w in present}


def stream_mixture(root: str | Path, mixture: str | list[tuple[str, float]], split: str, *, window_size: int,
                   chunk_size: int, seed: int = 0, shuffle_buffer: int = 256, rank: int = 0,
                   world_size: int = 1) -> Iterator[ActionWindowSample]:
    """Interleave the mixture's datasets by weight, windows shuffled through a bounded buffer. Each dataset is
    read shard by shard (this consumer's shards only) and restarts when exhausted, so the stream is endless for
    training; memory holds at most `shuffle_buffer` windows plus one episode per dataset."""
    root = Path(root)
    available = {p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()
    weights = mixture_weights(mixture, available)
    datasets = {name: RLDSDataset.open(root, name) for name in weights}
    rng = np.random.default_rng([seed, rank])

    def windows(name: str) -> Iterator[ActionWindowSample]:
        while True:
            produced = False
            for episode in datasets[name].episodes(split, rank=rank, world_size=world_size):
                for window in episode_windows(episode, window_size, chunk_size):
                    produced = True
                    yield window
            if not produced:
                raise OXEFormatError(f"{datasets[name].path}: split {split!r} gives consumer {rank} of {world_size} "
                                     "no episodes (fewer episodes than ranks x loader workers?)")

    sources = {name: windows(name) for name in weights}
    names, probabilities = list(weights), np.array(list(weights.values()))
    buffer: list[ActionWindowSample] = []
    while True:
        name = names[rng.choice(len(names), p=probabilities)]
        buffer.append(next(sources[name]))
        if len(buffer) >= shuffle_buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))


# ------------------------------------------------------------------------------------------- fixture writer


def write_rlds_dataset(root: str | Path, name: str, episodes_by_split: dict[str, list[dict[str, Any]]], *,
                       version: str = "1.0.0", shards: int = 2) -> Path:
    """Write episodes (dicts of flattened Example features) as a TFDS/RLDS folder: dataset_info.json,
    features.json and `<name>-<split>.tfrecord-NNNNN-of-MMMMM` shards, episodes dealt round-robin to shards."""
    from affordvla.data.tfrecord import encode_example, write_records

    path = Path(root) / name / version
    path.mkdir(parents=True, exist_ok=True)
    split_info = []
    for split, episodes in episodes_by_split.items():
        lengths = []
        for shard in range(shards):
            mine = episodes[shard::shards]
            write_records(path / f"{name}-{split}.tfrecord-{shard:05d}-of-{shards:05d}",
                          (encode_example(e) for e in mine))
            lengths.append(len(mine))
        split_info.append({"name": split, "shardLengths": [str(n) for n in lengths], "filepathTemplate":
                           "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"})
    (path / "dataset_info.json").write_text(json.dumps({"name": name, "version": version, "fileFormat": "tfrecord",
                                                        "splits": split_info}, indent=2))
    (path / "features.json").write_text(json.dumps({"pythonClassName":
                                                    "tensorflow_datasets.core.features.features_dict.FeaturesDict",
                                                    "featuresDict": {"features": {"steps": {}}}}, indent=2))
    return path


class OXEMixtureStream(IterableDataset):
    """`stream_mixture` as a torch IterableDataset: shards are divided among every (distributed rank, loader
    worker) pair, so no two consumers read the same episode. The rank and world size come from
    torch.distributed when it is initialised, and from the arguments otherwise."""

    def __init__(self, root: str | Path, mixture: str | list[tuple[str, float]], split: str = "train", *,
                 window_size: int = 1, chunk_size: int = 1, seed: int = 0, shuffle_buffer: int = 256,
                 rank: int | None = None, world_size: int | None = None):
        self.root, self.mixture, self.split = root, mixture, split
        self.window_size, self.chunk_size, self.seed, self.shuffle_buffer = window_size, chunk_size, seed, shuffle_buffer
        self.rank, self.world_size = rank, world_size

    def consumer(self) -> tuple[int, int]:
        import torch.distributed as dist
        from torch.utils.data import get_worker_info

        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            initialised = dist.is_available() and dist.is_initialized()
            rank, world = (dist.get_rank(), dist.get_world_size()) if initialised else (0, 1)
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        return rank * workers + worker_id, world * workers

    def __iter__(self) -> Iterator[ActionWindowSample]:
        consumer, consumers = self.consumer()
        return stream_mixture(self.root, self.mixture, self.split, window_size=self.window_size,
                              chunk_size=self.chunk_size, seed=self.seed, shuffle_buffer=self.shuffle_buffer,
                              rank=consumer, world_size=consumers)
