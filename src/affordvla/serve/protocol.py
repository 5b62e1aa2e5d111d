"""What a request to the policy server may hold, checked field by field: every refusal is a `RequestError` with
an HTTP status and the field it concerns, so a client learns what to fix.

Images come as base64 PNG/JPEG (optionally a data URL), as a json-numpy array (OpenVLA's deploy payload:
{"__numpy__": base64 of the raw bytes, "dtype": "|u1", "shape": [H, W, 3]}), or as a multipart upload (turned into
the base64 form before these checks). Nothing is ever unpickled: arrays are read with numpy.frombuffer from uint8
bytes only.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

KEYPOINTS_PATH = "/v1/keypoints"
ACT_PATH = "/act"
SESSION_PREFIX = "/v1/sessions/"
UINT8_DESCRS = ("|u1", "<u1", ">u1", "u1", "uint8")
IMAGE_FORMATS = ("PNG", "JPEG")
MAX_SESSION_ID = 128


class RequestError(ValueError):
    """A request the server refuses: `status` (4xx), the `field` at fault and a sentence saying what was expected."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message

    def body(self) -> dict[str, Any]:
        return {"error": {"field": self.field, "message": self.message}}


@dataclass(frozen=True)
class Limits:
    """Request bounds: the body in bytes, the image's pixel count and longest side."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 1024 * 1024
    max_image_side: int = 2048


@dataclass
class KeypointsRequest:
    """A checked /v1/keypoints request."""

    model: str | None
    image: np.ndarray
    instruction: str
    task: str = ""
    objects: list[str] = field(default_factory=list)


@dataclass
class ActRequest:
    """A checked /act request (or a session reset, which carries no image)."""

    model: str | None
    image: np.ndarray | None
    instruction: str
    state: np.ndarray | None = None
    unnorm_key: str | None = None
    session_id: str | None = None
    reset: bool = False
    execution: str | None = None  # a reset's choice of chunk execution ("first" or "ensemble")


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, "body", f"not valid JSON ({exc}); send a JSON object or a multipart form") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "body", f"expected a JSON object, got {type(payload).__name__}")
    if set(payload) == {"encoded"}:  # OpenVLA's double encoding, for clients without json-numpy
        if not isinstance(payload["encoded"], str):
            raise RequestError(400, "encoded", "expected a string holding the JSON payload")
        return parse_json(payload["encoded"].encode())
    return payload


def _check_size(height: int, width: int, name: str, limits: Limits) -> None:
    if height * width > limits.max_image_pixels or max(height, width) > limits.max_image_side:
        raise RequestError(413, name, f"image of {width}x{height} pixels is over the limit ({limits.max_image_pixels} "
                           f"pixels, {limits.max_image_side} per side)")


def decode_encoded_image(text: str, name: str, limits: Limits) -> np.ndarray:
    """A base64 PNG or JPEG (a `data:image/...;base64,` prefix allowed) as HxWx3 uint8 RGB."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, name, "not valid base64 (expected a base64-encoded PNG or JPEG)") from None
    if not raw:
        raise RequestError(400, name, "empty image")
    try:
        with Image.open(io.BytesIO(raw)) as image:
            if image.format not in IMAGE_FORMATS:
                raise RequestError(415, name, f"image format {image.format} is not accepted (PNG or JPEG)")
            _check_size(image.height, image.width, name, limits)  # before decoding the pixels
            image.load()
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise RequestError(400, name, f"not a readable PNG or JPEG ({exc})") from None
    except Image.DecompressionBombError:
        raise RequestError(413, name, "image is over the decompression limit") from None


def decode_array_image(value: dict[str, Any], name: str, limits: Limits) -> np.ndarray:
    """A json-numpy array: uint8, shape (H, W, 3)."""
    unknown = sorted(set(value) - {"__numpy__", "dtype", "shape"})
    if unknown:
        raise RequestError(400, name, f"unexpected keys {unknown} in a json-numpy array")
    if value.get("dtype") not in UINT8_DESCRS:
        raise RequestError(422, name, f"dtype {value.get('dtype')!r}: expected uint8 ('|u1') pixels")
    shape = value.get("shape")
    if (not isinstance(shape, list) or len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape)
            or shape[2] != 3):
        raise RequestError(422, name, f"shape {shape!r}: expected [height, width, 3]")
    _check_size(shape[0], shape[1], name, limits)
    if not isinstance(value["__numpy__"], str):
        raise RequestError(400, name, "'__numpy__' must be a base64 string")
    try:
        raw = base64.b64decode(value["__numpy__"], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, name, "'__numpy__' is not valid base64") from None
    if len(raw) != shape[0] * shape[1] * 3:
        raise RequestError(422, name, f"{len(raw)} bytes do not fill the shape {shape} of uint8 pixels")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape).copy()


def decode_image(payload: dict[str, Any], limits: Limits, name: str = "image") -> np.ndarray:
    if payload.get(name) is None:
        raise RequestError(400, name, "missing: send a base64 PNG/JPEG string, a json-numpy uint8 array or a "
                           "multipart file")
    value = payload[name]
    if isinstance(value, str):
        return decode_encoded_image(value, name, limits)
    if isinstance(value, dict) and "__numpy__" in value:
        return decode_array_image(value, name, limits)
    raise RequestError(422, name, f"expected a base64 string or a json-numpy array, got {type(value).__name__}")


def _text(payload: dict[str, Any], name: str, required: bool) -> str:
    value = payload.get(name)
    if value is None or (isinstance(value, str) and not value.strip() and required):
        if required:
            raise RequestError(400, name, "missing: expected a non-empty string")
        return ""
    if not isinstance(value, str):
        raise RequestError(422, name, f"expected a string, got {type(value).__name__}")
    return value


def _model(payload: dict[str, Any]) -> str | None:
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(422, "model", f"expected a model name (string), got {type(model).__name__}")
    return model


def parse_keypoints(payload: dict[str, Any], limits: Limits) -> KeypointsRequest:
    objects = payload.get("objects") or []
    if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
        raise RequestError(422, "objects", "expected a list of object names (strings)")
    return KeypointsRequest(model=_model(payload), image=decode_image(payload, limits),
                            instruction=_text(payload, "instruction", True), task=_text(payload, "task", False),
                            objects=list(objects))


def session_id_of(payload: dict[str, Any]) -> str | None:
    session = payload.get("session_id")
    if session is None:
        return None
    if not isinstance(session, str) or not session or len(session) > MAX_SESSION_ID:
        raise RequestError(422, "session_id", f"expected a non-empty string of at most {MAX_SESSION_ID} characters")
    return session


def parse_act(payload: dict[str, Any], limits: Limits) -> ActRequest:
    unnorm_key = payload.get("unnorm_key")
    if unnorm_key is not None and not isinstance(unnorm_key, str):
        raise RequestError(422, "unnorm_key", f"expected a dataset name (string), got {type(unnorm_key).__name__}")
    if payload.get("reset"):  # a session reset: no observation
        session = session_id_of(payload)
        if session is None:
            raise RequestError(400, "session_id", "missing: a reset names its session")
        execution = payload.get("execution")
        if execution is not None and not isinstance(execution, str):
            raise RequestError(422, "execution", "expected 'first' or 'ensemble'")
        return ActRequest(model=_model(payload), image=None, instruction="", unnorm_key=unnorm_key,
                          session_id=session, reset=True, execution=execution)
    state = payload.get("state")
    if state is not None:
        if isinstance(state, dict) and "__numpy__" in state:
            raise RequestError(422, "state", "expected a list of numbers")
        try:
            state = np.asarray(state, dtype=np.float32)
        except (TypeError, ValueError):
            raise RequestError(422, "state", "expected a list of numbers") from None
        if state.ndim != 1 or not np.isfinite(state).all():
            raise RequestError(422, "state", f"expected a flat list of finite numbers, got shape {state.shape}")
    return ActRequest(model=_model(payload), image=decode_image(payload, limits),
                      instruction=_text(payload, "instruction", True), state=state, unnorm_key=unnorm_key,
                      session_id=session_id_of(payload))
