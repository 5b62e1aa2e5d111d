"""RLBench demonstrations, read without rlbench, PyRep or CoppeliaSim.

Both layouts are understood:

    {task}/variation{N}/variation_descriptions.pkl, {task}/variation{N}/episodes/episode{M}/...
    {task}/all_variations/episodes/episode{M}/{variation_descriptions,variation_number}.pkl, ...

An episode folder holds `{camera}_{rgb|depth|mask}/{i}.png` and `low_dim_obs.pkl`, a pickled `rlbench.demo.Demo`
of `rlbench.backend.observation.Observation`s. The pickles are read by a restricted unpickler: rlbench and pyrep
classes become plain attribute holders, numpy arrays are rebuilt, and every other global is refused.
"""

from __future__ import annotations

import contextlib
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from affordvla.data.safe_pickle import (
    NUMPY_GLOBALS,
    RestrictedUnpickler,
    UnsafePickleError,
)

CAMERAS = ("left_shoulder", "right_shoulder", "overhead", "wrist", "front")
DEPTH_SCALE = 2**24 - 1  # depth PNGs hold a 0-1 value as a 24-bit integer in R (high), G, B (low)


class RLBenchFormatError(ValueError):
    """An RLBench episode does not follow the format; the message names the file."""


class RLBenchRecord:
    """Stands in for any rlbench / pyrep class found in a pickle: it only keeps the pickled attributes."""

    def __init__(self, *args, **kwargs):
        self._args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) from classes with __slots__
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({sorted(k for k in self.__dict__ if not k.startswith('_args'))})"


class Demo(RLBenchRecord):
    """rlbench.demo.Demo: a list of observations in `_observations`."""

    @property
    def observations(self) -> list[Any]:
        return list(getattr(self, "_observations", []))

    def __len__(self) -> int:
        return len(self.observations)

    def __getitem__(self, i: int) -> Any:
        return self.observations[i]


class Observation(RLBenchRecord):
    """rlbench.backend.observation.Observation."""


_CLASS_FOR = {("rlbench.demo", "Demo"): Demo, ("rlbench.backend.observation", "Observation"): Observation}
# copyreg helpers that protocol 0/1 pickles of plain classes use; they only ever see the stub classes above
_PLAIN_OBJECT_GLOBALS = frozenset({("copyreg", "_reconstructor"), ("builtins", "object")})


class _RLBenchUnpickler(RestrictedUnpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _CLASS_FOR:
            return _CLASS_FOR[(module, name)]
        if module.split(".")[0] in ("rlbench", "pyrep"):
            return type(name, (RLBenchRecord,), {"__module__": "affordvla.data.rlbench.stubs"})
        return super().find_class(module, name)


def load_rlbench_pickle(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise RLBenchFormatError(f"{path} does not exist")
    with open(path, "rb") as f:
        try:
            return _RLBenchUnpickler(f, source=str(path), allowed=NUMPY_GLOBALS | _PLAIN_OBJECT_GLOBALS).load()
        except UnsafePickleError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to decode a data file is a format error
            raise RLBenchFormatError(f"{path}: corrupt or truncated pickle ({type(exc).__name__}: {exc})") from None


# ----------------------------------------------------------------------------------------------- layout


@dataclass
class RLBenchEpisode:
    """One episode folder of an RLBench task variation, with its language descriptions."""

    task: str
    variation: int
    path: Path  # the episode{M} folder
    descriptions_path: Path

    def descriptions(self) -> list[str]:
        value = load_rlbench_pickle(self.descriptions_path)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not value:
            raise RLBenchFormatError(f"{self.descriptions_path}: expected a non-empty list of strings")
        return value

    def demo(self) -> Demo:
        demo = load_rlbench_pickle(self.path / "low_dim_obs.pkl")
        if not isinstance(demo, Demo):
            raise RLBenchFormatError(f"{self.path / 'low_dim_obs.pkl'}: expected an rlbench Demo, got "
                                     f"{type(demo).__name__}")
        return demo

    def image_path(self, camera: str, kind: str, index: int) -> Path:
        return self.path / f"{camera}_{kind}" / f"{index}.png"

    def rgb(self, camera: str, index: int) -> np.ndarray:
        return _read_png(self.image_path(camera, "rgb", index), "RGB")

    def depth(self, camera: str, index: int, near: float, far: float) -> np.ndarray:
        """Depth in metres from the 24-bit RGB encoding."""
        return decode_depth(_read_png(self.image_path(camera, "depth", index), "RGB"), near, far)


def _read_png(path: Path, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode))
    except (OSError, ValueError) as exc:
        raise RLBenchFormatError(f"cannot read image {path}: {exc}") from None


def decode_depth(rgb: np.ndarray, near: float, far: float) -> np.ndarray:
    value = rgb.astype(np.float64) @ np.array([65536.0, 256.0, 1.0])
    return (near + value / DEPTH_SCALE * (far - near)).astype(np.float32)


def encode_depth(depth_01: np.ndarray) -> np.ndarray:
    """0-1 depth -> the 24-bit RGB image RLBench saves (fixture writer)."""
    value = np.round(np.clip(depth_01, 0, 1) * DEPTH_SCALE).astype(np.int64)
    return np.stack([(value >> 16) & 255, (value >> 8) & 255, value & 255], -1).astype(np.uint8)


def _number(name: str, prefix: str) -> int:
    match = re.fullmatch(prefix + r"(\d+)", name)
    return int(match.group(1)) if match else -1


def list_episodes(task_dir: str | Path) -> list[RLBenchEpisode]:
    """Every episode of a task folder, in either layout, ordered by (variation, episode number)."""
    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        raise RLBenchFormatError(f"RLBench task folder {task_dir} does not exist")
    episodes = []
    all_variations = task_dir / "all_variations" / "episodes"
    if all_variations.is_dir():
        for folder in all_variations.iterdir():
            if _number(folder.name, "episode") >= 0:
                number_file = folder / "variation_number.pkl"
                variation = int(load_rlbench_pickle(number_file)) if number_file.is_file() else -1
                episodes.append(RLBenchEpisode(task_dir.name, variation, folder, folder / "variation_descriptions.pkl"))
    for variation_dir in task_dir.iterdir():
        variation = _number(variation_dir.name, "variation")
        if variation < 0 or not (variation_dir / "episodes").is_dir():
            continue
        for folder in (variation_dir / "episodes").iterdir():
            if _number(folder.name, "episode") >= 0:
                episodes.append(RLBenchEpisode(task_dir.name, variation, folder,
                                               variation_dir / "variation_descriptions.pkl"))
    if not episodes:
        raise RLBenchFormatError(f"{task_dir}: no variation*/episodes/episode* or all_variations/episodes/episode*")
    return sorted(episodes, key=lambda e: (e.variation, _number(e.path.name, "episode")))


# ------------------------------------------------------------------------------------------ keyframes


def keyframes(demo: Demo, stopped_tolerance: float = 0.1, cooldown: int = 4) -> list[int]:
    """PerAct's keyframe rule: the gripper state changes, the arm stops (every joint velocity within the
    tolerance, gripper unchanged over i-1, i, i+1, not the second-to-last frame, at least `cooldown` frames
    after the last stop), or it is the last frame. The second-to-last keyframe is dropped when it is adjacent to
    the last."""
    obs = demo.observations
    count = len(obs)
    keys: list[int] = []
    since_stop = cooldown  # the first stop may come at once
    for i in range(count):
        gripper_changed = i > 0 and obs[i].gripper_open != obs[i - 1].gripper_open
        stopped = False
        if 0 < i < count - 2:
            still = np.allclose(obs[i].joint_velocities, 0, atol=stopped_tolerance)
            steady = obs[i - 1].gripper_open == obs[i].gripper_open == obs[i + 1].gripper_open
            stopped = still and steady and since_stop >= cooldown
        since_stop = 0 if stopped else since_stop + 1
        if gripper_changed or stopped or i == count - 1:
            keys.append(i)
    if len(keys) > 1 and keys[-2] == keys[-1] - 1:
        keys.pop(-2)
    return keys


# ---------------------------------------------------------------------------------------- fixture writer


@contextlib.contextmanager
def _rlbench_classes():
    """Temporarily importable `rlbench.demo.Demo` and `rlbench.backend.observation.Observation` classes, so a
    fixture pickles under exactly the names RLBench's own files carry."""
    names = ("rlbench", "rlbench.backend", "rlbench.demo", "rlbench.backend.observation")
    saved = {name: sys.modules.get(name) for name in names}
    modules = {name: types.ModuleType(name) for name in names}
    demo_cls = type("Demo", (), {"__module__": "rlbench.demo"})
    observation_cls = type("Observation", (), {"__module__": "rlbench.backend.observation"})
    modules["rlbench.demo"].Demo = demo_cls
    modules["rlbench.backend.observation"].Observation = observation_cls
    try:
        sys.modules.update(modules)
        yield demo_cls, observation_cls
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def write_episode(folder: str | Path, observations: list[dict[str, Any]], *, images: dict[str, list[np.ndarray]],
                  descriptions: list[str] | None = None, variation_number: int | None = None,
                  protocol: int = 4) -> Path:
    """Write one episode as RLBench's dataset generator does: image PNGs, then `low_dim_obs.pkl` with the image
    fields set to None. `observations` are dicts of Observation attributes; `images` maps `{camera}_{kind}` to
    frames (depth already RGB-encoded). Classes are pickled under their rlbench module names."""
    import pickle

    folder = Path(folder)
    for name, frames in images.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(folder / name / f"{i}.png")
    with _rlbench_classes() as (demo_cls, observation_cls):
        demo = demo_cls.__new__(demo_cls)
        demo._observations = []
        for values in observations:
            obs = observation_cls.__new__(observation_cls)
            obs.__dict__.update(values)
            demo._observations.append(obs)
        demo.random_seed = None
        with open(folder / "low_dim_obs.pkl", "wb") as f:
            pickle.dump(demo, f, protocol=protocol)
    if descriptions is not None:
        with open(folder / "variation_descriptions.pkl", "wb") as f:
            pickle.dump(descriptions, f)
    if variation_number is not None:
        with open(folder / "variation_number.pkl", "wb") as f:
            pickle.dump(variation_number, f)
    return folder
