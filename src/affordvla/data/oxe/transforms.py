"""The shared standardisation steps: gripper conventions, quaternion -> roll-pitch-yaw, language decoding, and
`standardize`, which applies a dataset's spec to one parsed episode."""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from affordvla.data.oxe.specs import DatasetSpec


class OXEFormatError(ValueError):
    """An RLDS dataset folder or episode does not follow the format; the message names the dataset and file."""


@dataclass
class Episode:
    """One standardised episode: primary camera frames, 7-D actions (6 end-effector values, deltas unless the spec
    is `absolute_pose`, + gripper, 1 open), the instruction, where it came from, and the other requested camera
    roles."""

    images: np.ndarray  # (T, H, W, 3) uint8, the primary camera
    actions: np.ndarray  # (T, 7) float32
    instruction: str
    source: str
    extra_images: dict[str, np.ndarray] = field(default_factory=dict)  # role -> (T, H, W, 3)


def binarize_gripper(values: np.ndarray, open_above: float = 0.95, closed_below: float = 0.05) -> np.ndarray:
    """Continuous gripper openness -> 1 (open) / 0 (closed); in-between values take the next decided state,
    scanning from the end. A run of in-between values at the very end keeps the last raw value (OpenVLA's scan
    starts from it)."""
    out = np.empty(len(values), dtype=np.float32)
    carry = float(values[-1]) if len(values) else 0.0
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


def apply_gripper_rule(values: np.ndarray, rule: str) -> np.ndarray:
    """A dataset's gripper values -> 1 open / 0 closed by the spec's rule (specs.GRIPPER_RULES)."""
    values = np.asarray(values, dtype=np.float32)
    if rule == "rel2abs":
        return relative_to_absolute_gripper(values)
    if rule == "binarize":
        return binarize_gripper(values)
    if rule == "clip":
        return np.clip(values, 0, 1)
    if rule == "invert_clip":
        return 1 - np.clip(values, 0, 1)
    if rule == "invert":
        return 1 - values
    if rule == "as_is":
        return values
    raise ValueError(f"unknown gripper rule {rule!r}")


def quaternion_to_euler(quaternion: np.ndarray) -> np.ndarray:
    """(..., 4) xyzw quaternions -> (..., 3) roll, pitch, yaw (extrinsic x-y-z) as tensorflow_graphics'
    euler.from_quaternion computes them for OpenVLA: the quaternion is not normalised (an all-zero one gives
    zeros), the rotation-matrix entries are clipped to [-1, 1], and at gimbal lock (|pitch| = 90 degrees) yaw is
    set to 0 and the remaining turn goes to roll."""
    q = np.asarray(quaternion, dtype=np.float64)
    x, y, z = np.moveaxis(np.clip(q[..., :3], -1, 1), -1, 0)  # tfg shrinks 2x, 2y, 2z into [-2, 2]
    w = q[..., 3]

    def entry(value):
        return np.clip(value, -1, 1)

    r00, r10 = entry(1 - 2 * (y * y + z * z)), entry(2 * (x * y + w * z))
    r21, r22 = entry(2 * (y * z + w * x)), entry(1 - 2 * (x * x + y * y))
    r20, r01, r02 = entry(2 * (x * z - w * y)), entry(2 * (x * y - w * z)), entry(2 * (x * z + w * y))
    general = np.stack([np.arctan2(r21, r22), -np.arcsin(r20), np.arctan2(r10, r00)], axis=-1)
    sign = np.where(r20 < 0, -1.0, 1.0)
    locked = np.stack([np.arctan2(-sign * r01, -sign * r02), -sign * np.pi / 2, np.zeros_like(r20)], axis=-1)
    return np.where((np.abs(np.abs(r20) - 1) < 1e-6)[..., None], locked, general)


def decode_codepoints(values: np.ndarray) -> str:
    """language_table's instruction: unicode code points padded with zeros -> text up to the first zero."""
    values = np.asarray(values).reshape(-1)
    end = np.flatnonzero(values == 0)
    return "".join(chr(int(c)) for c in values[: end[0] if len(end) else len(values)])


def _decode_images(frames: list[bytes], where: str, size: int | None) -> np.ndarray:
    images = []
    for t, data in enumerate(frames):
        try:
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("RGB")
                if size is not None and im.size != (size, size):  # OpenVLA resizes every camera to a square
                    im = im.resize((size, size), Image.BILINEAR)
                images.append(np.asarray(im))
        except OSError as exc:
            raise OXEFormatError(f"{where}: step {t}: undecodable image ({exc})") from None
    return np.stack(images)


def _per_step(spec: DatasetSpec, features: dict, key: str, where: str, count: int) -> np.ndarray:
    """A numeric per-step feature as (count, *shape) float32, its size checked."""
    name = f"steps/{key}"
    if name not in features:
        raise OXEFormatError(f"{where}: dataset {spec.name}: missing feature {name!r}; has {sorted(features)[:12]}")
    shape = spec.feature_shapes[key]
    value = features[name]
    if isinstance(value, list):  # a tensor feature with encoding "zlib" / "bytes": one raw buffer per step
        value = np.concatenate([np.frombuffer(_inflate(v), dtype="<f4") for v in value]) if value else np.zeros(0)
    value = np.asarray(value, dtype=np.float32)
    size = int(np.prod(shape)) if shape else 1
    if value.size != count * size:
        raise OXEFormatError(f"{where}: dataset {spec.name}: {name} has {value.size} values, expected {count} steps "
                             f"x {size}")
    return value.reshape(count, size)


def _inflate(data: bytes) -> bytes:
    """A TFDS tensor stored as bytes: zlib-compressed (encoding "zlib", as kuka's) or raw (encoding "bytes")."""
    try:
        return zlib.decompress(data)
    except zlib.error:
        return data


def _texts(features: dict, key: str) -> list[str]:
    return [v.decode("utf-8") for v in features.get(f"steps/{key}", [])]


def episode_instruction(spec: DatasetSpec, features: dict) -> str:
    """The episode's instruction (the first non-empty step's); "" when it has none or is marked unlabeled
    (`episode_metadata/has_language` 0)."""
    has_language = features.get("episode_metadata/has_language")
    if has_language is not None and len(has_language) and not int(np.asarray(has_language).reshape(-1)[0]):
        return ""
    if spec.language_codepoints:
        values = np.asarray(features.get(f"steps/{spec.language}", []))
        size = spec.feature_shapes[spec.language][0]
        texts = [decode_codepoints(row) for row in values.reshape(-1, size)] if values.size else []
    else:
        texts = _texts(features, spec.language)
    return next((t for t in texts if t), "")


def standardize(spec: DatasetSpec, features: dict, where: str, *, image_size: int | None = None,
                cameras: tuple[str, ...] = ("primary",), decode_images: bool = True) -> Episode:
    """One parsed episode (flattened Example features) -> an Episode in the common convention. Camera roles the
    dataset lacks are filled with black frames (OpenVLA pads them likewise); with `decode_images` False the
    frames are left empty (statistics need only the actions)."""
    image_key = f"steps/{spec.images['primary']}"
    if image_key not in features:
        raise OXEFormatError(f"{where}: dataset {spec.name}: missing feature {image_key!r}")
    count = len(features[image_key])
    xyz = _per_step(spec, features, spec.xyz.key, where, count)[:, spec.xyz.start:spec.xyz.start + spec.xyz.count]
    actions = np.zeros((count, 7), np.float32)
    actions[:, : xyz.shape[1]] = xyz
    if spec.rot is not None:
        rot = _per_step(spec, features, spec.rot.key, where, count)[:, spec.rot.start:spec.rot.start + spec.rot.count]
        actions[:, 3:6] = quaternion_to_euler(rot) if spec.rot_quaternion else rot
    if spec.gripper is not None:
        raw_gripper = _per_step(spec, features, spec.gripper.key, where, count)[:, spec.gripper.start]
    keep = slice(1, None) if spec.drop_first else slice(None)
    if spec.relabel_from_state:
        state = _per_step(spec, features, spec.state, where, count)[keep]
        if len(state) < 2:
            raise OXEFormatError(f"{where}: dataset {spec.name}: episode with {count} steps; at least 3 are needed")
    actions = actions[keep]
    if spec.gripper is not None:
        actions[:, 6] = apply_gripper_rule(raw_gripper[keep], spec.gripper_rule)
    else:
        actions[:, 6] = spec.gripper_constant
    frames = slice(None)
    if spec.relabel_from_state:  # deltas from the state; the last step has no next state and is dropped
        actions = np.concatenate([state[1:, :6] - state[:-1, :6], actions[:-1, 6:]], axis=1)
        frames = slice(None, -1)
    length = len(actions)
    images = {}
    for role in cameras:
        key = spec.images.get(role)
        if not decode_images:
            images[role] = np.zeros((length, 0, 0, 3), np.uint8)
        elif key is None:
            side = image_size or spec.feature_shapes[spec.images["primary"]][0]
            images[role] = np.zeros((length, side, side, 3), np.uint8)
        else:
            if f"steps/{key}" not in features:
                raise OXEFormatError(f"{where}: dataset {spec.name}: missing feature 'steps/{key}'")
            images[role] = _decode_images(features[f"steps/{key}"][keep][frames], where, image_size)
    primary = images.pop("primary", None)
    if primary is None:
        raise OXEFormatError(f"cameras {list(cameras)} must include 'primary'")
    return Episode(images=primary, actions=actions.astype(np.float32), instruction=episode_instruction(spec, features),
                   source=where, extra_images=images)
