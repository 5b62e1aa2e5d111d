"""`PolicyClient(url)`: the Python client of affordvla-serve.

One connection pool (a requests Session), a timeout on every call, bounded retries with exponential backoff on
5xx answers and connection errors, and `ServeRequestError` (never a retry) on a 4xx, carrying the field the server
named. Images go as base64 PNG to /v1/keypoints and as json-numpy arrays to /act (OpenVLA's payload).
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import json_numpy
import numpy as np
import requests
from PIL import Image

from affordvla.formats.kalie_tasks import TASKS
from affordvla.formats.sample import KALIE_POINT_NAMES

RETRY_STATUSES = (500, 502, 503, 504)


class ServeRequestError(ValueError):
    """The server refused a request (4xx): `status`, the `field` it named and its message."""

    def __init__(self, status: int, field: str | None, message: str):
        super().__init__(f"HTTP {status}: {field + ': ' if field else ''}{message}")
        self.status, self.field, self.message = status, field, message


class ServeUnavailable(ConnectionError):
    """The server could not answer (connection errors or 5xx) after the bounded retries."""


@dataclass
class KeypointsAnswer:
    """The answer of /v1/keypoints: points normalised to [0, 1] and in pixels, the raw text and parse status."""

    model: str
    names: list[str]
    points: dict[str, tuple[float, float]]
    pixels: dict[str, tuple[float, float]]
    text: str
    parsed: bool
    timings: dict[str, float]

    @property
    def array(self) -> np.ndarray:
        """(K, 2) float32 normalised points in `names` order (as KeypointPrediction.points)."""
        return np.array([self.points[n] for n in self.names], dtype=np.float32).reshape(-1, 2)


@dataclass
class ActAnswer:
    """The answer of /act: the action chunk (n, D) in dataset units; in a session also `executed`, the action
    (D,) to send under the session's execution."""

    model: str
    actions: np.ndarray
    text: str
    parsed: bool
    session_id: str | None
    timings: dict[str, float]
    executed: np.ndarray | None = None


def encode_png(image: np.ndarray | Image.Image | str | Path) -> str:
    """Base64 PNG of an HxWx3 uint8 array or PIL image; a path's file bytes as they are."""
    if isinstance(image, (str, Path)):
        return base64.b64encode(Path(image).read_bytes()).decode()
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    buffer = io.BytesIO()
    pil.convert("RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class PolicyClient:
    """Client of one affordvla-serve address. Use as a context manager, or call close()."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.2, pool_size: int = 16):
        if retries < 0 or backoff < 0 or timeout <= 0:
            raise ValueError(f"PolicyClient: retries ({retries}) and backoff ({backoff}) must be >= 0, timeout "
                             f"({timeout}) > 0")
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.http = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self.http.mount("http://", adapter)
        self.http.mount("https://", adapter)
        if api_key:
            self.http.headers["X-API-Key"] = api_key

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # --- transport ------------------------------------------------------------------------------------------
    def _call(self, method: str, path: str, *, data: str | None = None, idempotent: bool = True) -> dict[str, Any]:
        """One request with bounded retries on connection errors and 5xx; a 4xx raises ServeRequestError. A
        session step is not idempotent: it is retried only when the connection could not be made."""
        headers = {"Content-Type": "application/json"} if data is not None else None
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self.http.request(method, self.url + path, data=data, headers=headers,
                                             timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = f"{type(exc).__name__}: {exc}"
                if idempotent or isinstance(exc, requests.ConnectTimeout) or not isinstance(exc, requests.Timeout):
                    continue
                raise ServeUnavailable(f"{method} {path}: {last} (a session step is not retried)") from None
            if response.status_code in RETRY_STATUSES and (idempotent or response.status_code == 503):
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            body = self._json(response)
            if 400 <= response.status_code < 500:
                error = body.get("error") if isinstance(body.get("error"), dict) else {}
                raise ServeRequestError(response.status_code, error.get("field"),
                                        error.get("message") or str(body.get("detail") or response.text[:200]))
            if response.status_code >= 300:
                raise ServeUnavailable(f"{method} {path}: unexpected HTTP {response.status_code}")
            return body
        raise ServeUnavailable(f"{method} {self.url}{path}: no answer after {self.retries + 1} attempts ({last})")

    @staticmethod
    def _json(response: requests.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            return {"detail": response.text[:200]}
        return body if isinstance(body, dict) else {"detail": body}

    # --- endpoints ------------------------------------------------------------------------------------------
    def health(self) -> bool:
        """True when every model is loaded (one try, no retries)."""
        try:
            return self.http.get(self.url + "/health", timeout=self.timeout).status_code == 200
        except requests.RequestException:
            return False

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.25) -> None:
        deadline = time.monotonic() + timeout
        while not self.health():
            if time.monotonic() > deadline:
                raise ServeUnavailable(f"{self.url}: /health not 200 within {timeout:g} s")
            time.sleep(interval)

    def info(self) -> dict[str, Any]:
        return self._call("GET", "/info")

    def keypoints(self, image, instruction: str, *, model: str | None = None, task: str = "",
                  objects: Sequence[str] = ()) -> KeypointsAnswer:
        payload = {"image": encode_png(image), "instruction": instruction, "task": task, "objects": list(objects)}
        if model is not None:
            payload["model"] = model
        body = self._call("POST", "/v1/keypoints", data=json_numpy.dumps(payload))
        return KeypointsAnswer(model=body["model"], names=list(body["names"]),
                               points={k: tuple(v) for k, v in body["points"].items()},
                               pixels={k: tuple(v) for k, v in body.get("pixels", {}).items()},
                               text=body["text"], parsed=body["parsed"], timings=body.get("timings", {}))

    def kalie_points(self, image, task: str, *, model: str | None = None) -> dict[str, tuple[float, float]]:
        """KALIE's five named points (normalised) for one of its tasks, prompted with the task's instruction and
        objects; ValueError when the answer does not hold all five."""
        if task not in TASKS:
            raise ValueError(f"task {task!r} is not one of KALIE's tasks {sorted(TASKS)}")
        spec = TASKS[task]
        answer = self.keypoints(image, spec.instruction, model=model, task=task, objects=spec.objects)
        missing = [name for name in KALIE_POINT_NAMES if name not in answer.points]
        if missing:
            raise ValueError(f"model {answer.model!r} answered without {missing} (parsed={answer.parsed}, text "
                             f"{answer.text[:120]!r})")
        return {name: answer.points[name] for name in KALIE_POINT_NAMES}

    def act(self, image, instruction: str, *, session: str | None = None, model: str | None = None,
            state: Sequence[float] | None = None, unnorm_key: str | None = None) -> ActAnswer:
        payload: dict[str, Any] = {"image": np.ascontiguousarray(np.asarray(image, dtype=np.uint8)),
                                   "instruction": instruction}
        for key, value in (("session_id", session), ("model", model), ("unnorm_key", unnorm_key)):
            if value is not None:
                payload[key] = value
        if state is not None:
            payload["state"] = [float(v) for v in state]
        body = self._call("POST", "/act", data=json_numpy.dumps(payload), idempotent=session is None)
        return ActAnswer(model=body["model"], actions=np.asarray(body["actions"], dtype=np.float32),
                         text=body.get("text", ""), parsed=body.get("parsed", True),
                         session_id=body.get("session_id"), timings=body.get("timings", {}),
                         executed=None if body.get("executed") is None else np.asarray(body["executed"], np.float32))

    def reset(self, session: str, *, model: str | None = None, unnorm_key: str | None = None,
              execution: str | None = None) -> None:
        """Begin (or begin again) the episode of `session`; `execution` "first" or "ensemble" (of chunks)."""
        payload: Mapping[str, Any] = {k: v for k, v in (("model", model), ("unnorm_key", unnorm_key),
                                                        ("execution", execution)) if v}
        self._call("POST", f"/v1/sessions/{session}/reset", data=json_numpy.dumps(dict(payload)))
