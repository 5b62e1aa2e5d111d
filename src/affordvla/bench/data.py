"""Reader throughput on each format's fixture, the HDF5 cache against per-frame npz loading, and OXE memory.

Every figure is measured in this process on fixtures written here (nothing is downloaded):
- `data.<format>.samples_per_s`: samples a reader yields per second (images decoded);
- `data.calvin.hdf5_speedup`: CALVIN window sampling from the HDF5 cache over the npz reader (one file per
  frame, the way RoboVLMs reads it), same windows in the same random order, side by side;
- `data.oxe.mixture_samples_per_s`: windows per second streamed from a five-dataset OXE mixture (fractal, bridge,
  taco_play, language_table, kuka in their published layouts);
- `data.oxe.peak_mb_1x` / `_10x`: peak traced memory of a pass over that mixture with 1x and 10x the episodes
  (flat = the stream holds a bounded buffer, whatever the dataset size); `data.oxe.peak_ratio_10x_to_1x` their
  ratio, and `data.oxe.peak_ratio_within_limit` 1 when it is at most 1.1 (a warning is logged otherwise).
"""

from __future__ import annotations

import logging
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)
PEAK_RATIO_LIMIT = 1.1  # the bound on data.oxe.peak_mb_10x / data.oxe.peak_mb_1x


def _rate(count: int, run: Callable[[], int]) -> float:
    started = time.perf_counter()
    produced = run()
    seconds = time.perf_counter() - started
    assert produced == count, (produced, count)
    return count / seconds


def _kalie(work: Path) -> float:
    from affordvla.data.kalie import load_kalie_sample, read_kalie_index
    from affordvla.offline.toy_kalie import ensure_toy_kalie

    root = work / "kalie"
    ensure_toy_kalie(root, seed=3, image_size=128, splits={"train": 200, "val": 0, "test": 0})
    entries, _ = read_kalie_index(root)
    return _rate(len(entries), lambda: sum(1 for e in read_kalie_index(root)[0] if load_kalie_sample(e).image.size))


def _robopoint(work: Path) -> float:
    from affordvla.data.robopoint import (
        point_entry,
        pointing_samples,
        write_conversations,
    )

    rng = np.random.default_rng(0)
    (work / "robopoint" / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(200):
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(work / f"robopoint/images/{i}.png")
        entries.append(point_entry(str(i), f"{i}.png", "Point to free space.", rng.uniform(0, 1, (4, 2))))
    path = write_conversations(work / "robopoint" / "train.json", entries)
    return _rate(200, lambda: len(pointing_samples(path, work / "robopoint" / "images")[0]))


def _rlbench(work: Path) -> float:
    from affordvla.data.rlbench import list_episodes, write_episode

    rng = np.random.default_rng(0)
    steps, episodes = 40, 5
    for m in range(episodes):
        observations = [{"joint_positions": rng.uniform(-1, 1, 7), "joint_velocities": rng.uniform(-1, 1, 7),
                         "gripper_open": 1.0, "gripper_pose": rng.uniform(-1, 1, 7), "misc": {}}
                        for _ in range(steps)]
        frames = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(steps)]
        write_episode(work / "rlbench" / "reach" / "all_variations" / "episodes" / f"episode{m}", observations,
                      images={"front_rgb": frames}, descriptions=["reach the target"], variation_number=0)

    def run() -> int:
        count = 0
        for episode in list_episodes(work / "rlbench" / "reach"):
            demo = episode.demo()
            for t in range(len(demo)):
                count += episode.rgb("front", t).size > 0
        return count

    return _rate(steps * episodes, run)


def _calvin(work: Path) -> dict[str, float]:
    from affordvla.data.calvin import CalvinWindowDataset, write_calvin_split
    from affordvla.data.h5cache import CachedWindowDataset, calvin_episodes, convert

    root = work / "calvin" / "training"
    if not (root / "ep_start_end_ids.npy").exists():
        segments = [(s * 40, s * 40 + 31, f"task {s}", f"task_{s}") for s in range(6)]
        write_calvin_split(root, [240], segments)
    cache = work / "calvin.h5"
    if not cache.exists():
        convert(calvin_episodes(root), cache, source=str(root), source_format="calvin")
    window, chunk = 8, 10
    npz = CalvinWindowDataset(root, window_size=window, chunk_size=chunk, frame_cache_size=0)
    cached = CachedWindowDataset(cache, window_size=window, chunk_size=chunk, anchor="forward")
    order = np.random.default_rng(0).permutation(len(npz))[:96]
    npz_rate = _rate(len(order), lambda: sum(1 for i in order if npz[int(i)].actions.size))
    cache_rate = _rate(len(order), lambda: sum(1 for i in order if cached[int(i)].actions.size))
    return {"data.calvin.samples_per_s": npz_rate, "data.calvin.hdf5_samples_per_s": cache_rate,
            "data.calvin.hdf5_speedup": cache_rate / npz_rate}


OXE_MIXTURE = ("fractal20220817_data", "bridge_orig", "taco_play", "language_table", "kuka")


def _oxe(work: Path) -> dict[str, float]:
    """The five-dataset mixture streamed (each in its published layout, frames resized to 64 px): windows per
    second, and the peak traced memory of a pass over 1x and 10x the episodes with the same shuffle buffer."""
    from affordvla.data.oxe import stream_mixture
    from affordvla.offline.toy_oxe import write_toy_mixture

    steps, episodes = 20, 8
    figures = {}
    for scale in (1, 10):
        root = work / f"oxe_mixture_{scale}x"
        write_toy_mixture(root, list(OXE_MIXTURE), train_episodes=episodes * scale, val_episodes=1,
                          episode_length=steps, seed=0, shards=4, image_shape=(96, 128))
        windows = len(OXE_MIXTURE) * episodes * scale * (steps - 1)  # about one pass (bridge drops 2 steps)
        tracemalloc.start()
        started = time.perf_counter()
        stream = stream_mixture(root, [(name, 1.0) for name in OXE_MIXTURE], "train", window_size=2, chunk_size=4,
                                image_size=64, shuffle_buffer=256)
        drawn = sum(1 for _, sample in zip(range(windows), stream) if sample.actions.size)
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert drawn == windows, (drawn, windows)
        figures[f"data.oxe.peak_mb_{scale}x"] = peak / 2**20
        if scale == 1:
            figures["data.oxe.mixture_samples_per_s"] = windows / seconds
    ratio = figures["data.oxe.peak_mb_10x"] / figures["data.oxe.peak_mb_1x"]
    figures["data.oxe.peak_ratio_10x_to_1x"] = ratio
    figures["data.oxe.peak_ratio_within_limit"] = float(ratio <= PEAK_RATIO_LIMIT)
    if ratio > PEAK_RATIO_LIMIT:  # the stream's memory should not grow with the data
        log.warning("data.oxe.peak_ratio_10x_to_1x = %.3f exceeds %.1f: the OXE stream's memory grows with the data",
                    ratio, PEAK_RATIO_LIMIT)
    return figures


def run(work: str | Path = "outputs/bench/work/data") -> dict[str, float]:
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    figures = {
        "data.kalie.samples_per_s": _kalie(work),
        "data.robopoint.samples_per_s": _robopoint(work),
        "data.rlbench.samples_per_s": _rlbench(work),
    }
    figures.update(_calvin(work))
    figures.update(_oxe(work))
    return figures
