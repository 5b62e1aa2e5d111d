"""affordvla-serve: exported policies behind one HTTP server (LitServe: dynamic batching, workers per device).

    affordvla-serve +models.kp=outputs/runs/train/<time>/model +models.lstm=<MLflow run id> port=8000

Every model is loaded once in this process before the port is bound, so a model that cannot load stops the start
with the reason; the workers then load their own copies and `/health` answers 200 once all are ready. The request
gate (an ASGI middleware in the server process) checks the API key, the body size and every field of a request
before it reaches a worker, answering a 4xx JSON error that names the field.
"""

from __future__ import annotations

import gc
import hmac
import json
import logging
import os
import re
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from affordvla.serve.apis import DEFAULT_LOADER, ActAPI, KeypointsAPI, import_loader, resolve_model
from affordvla.serve.protocol import (
    ACT_PATH,
    KEYPOINTS_PATH,
    SESSION_PREFIX,
    Limits,
    RequestError,
    parse_act,
    parse_json,
    parse_keypoints,
)

log = logging.getLogger("affordvla.serve")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
API_KEY_HEADER = "x-api-key"
OPEN_PATHS = ("/health",)  # load balancers probe it without a key
RESET_PATH = re.compile(r"^/v1/sessions/([^/]{1,128})/reset$")


@dataclass
class ServeSettings:
    """What conf/serve.yaml holds, checked."""

    models: dict[str, str]
    host: str = "127.0.0.1"
    port: int = 8000
    accelerator: str = "auto"
    devices: int | str = 1
    workers_per_device: int = 1
    max_batch_size: int = 8
    batch_timeout: float = 0.01
    timeout: float = 30.0
    api_key_env: str | None = "AFFORDVLA_SERVE_API_KEY"
    limits: Limits = field(default_factory=Limits)
    max_sessions: int = 64
    session_idle_seconds: float = 600.0
    tracking_uri: str | None = None
    demo: bool = True
    demo_samples: str | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("serve: models is empty; name at least one policy, e.g. +models.kp=outputs/runs/train/"
                             "<time>/model (an export folder or an MLflow run id; the + adds a key)")
        for key in ("max_batch_size", "workers_per_device", "port"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"serve: {key}={getattr(self, key)!r}; expected a positive integer")
        if self.batch_timeout < 0:
            raise ValueError(f"serve: batch_timeout={self.batch_timeout}; expected seconds >= 0")


# --------------------------------------------------------------------------------------------- model sources


def resolve_source(name: str, source: str, tracking_uri: str | None = None) -> Path:
    """An export folder as given, or the export of an affordvla-train MLflow run (its `export_dir`)."""
    path = Path(source)
    if path.is_dir():
        return path
    if not RUN_ID.match(str(source)):
        raise FileNotFoundError(f"serve: models.{name}={source}: neither an export folder nor an MLflow run id "
                                "(32 hex digits)")
    from omegaconf import OmegaConf

    from affordvla.tracking.runs import download_artifact, get_run, open_store

    client = open_store(tracking_uri)
    get_run(client, source)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            config = download_artifact(source, "run/config_resolved.yaml", tmp, client.tracking_uri)
        except Exception as exc:  # MLflow raises several types for a missing artifact
            raise ValueError(f"serve: models.{name}: run {source} has no run/config_resolved.yaml: not an "
                             f"affordvla-train run ({exc})") from None
        export = OmegaConf.load(config).get("export_dir")
    if not export or not Path(export).is_dir():
        raise FileNotFoundError(f"serve: models.{name}: run {source} wrote no export on this machine (export_dir "
                                f"{export!r}); export it with affordvla-export --run-id {source}")
    return Path(export)


def check_models(settings: ServeSettings, loader: str = DEFAULT_LOADER) -> tuple[dict[str, str], dict[str, dict]]:
    """Load every model once here (before the port is bound), so one that cannot load stops the start with its
    reason. Returns the export folder and `info()` of each model."""
    load = import_loader(loader)
    folders, infos = {}, {}
    for name, source in settings.models.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"serve: model name {name!r}: use letters, digits, '_', '.', '-'")
        folder = resolve_source(name, str(source), settings.tracking_uri)
        try:
            policy = load(folder)
        except Exception as exc:
            raise ValueError(f"serve: models.{name} ({folder}) cannot be served: {exc}") from exc
        folders[name] = str(folder)
        infos[name] = {"name": name, "export": str(folder), **json.loads(json.dumps(policy.info(), default=str))}
        del policy
        gc.collect()
    return folders, infos


# ----------------------------------------------------------------------------------------------- request gate

Send = Callable[[dict], Awaitable[None]]


async def _respond(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class RequestGate:
    """ASGI middleware in the server process: API key, body size, multipart to JSON, every field checked (and the
    model's kind) before a request is queued for a worker; session resets become /act requests with `reset`."""

    def __init__(self, app, *, kinds: dict[str, str], limits: Limits, api_key: str | None):
        self.app, self.kinds, self.limits, self.api_key = app, kinds, limits, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.api_key and path not in OPEN_PATHS and not path.startswith("/demo"):
            given = dict(scope["headers"]).get(API_KEY_HEADER.encode(), b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                what = "missing" if not given else "wrong"
                return await _respond(send, 401, RequestError(401, "X-API-Key", f"{what} API key: send the key "
                                                              "in the X-API-Key header").body())
        reset = RESET_PATH.match(path)
        if scope["method"] != "POST" or not (path in (KEYPOINTS_PATH, ACT_PATH) or reset):
            if path.startswith(SESSION_PREFIX) and scope["method"] == "POST":
                return await _respond(send, 404, RequestError(404, "path", "expected POST /v1/sessions/<id>/reset "
                                                              "(an id of at most 128 characters)").body())
            return await self.app(scope, receive, send)
        try:
            body = await self._read_body(scope, receive)
            payload = await self._payload(scope, body, allow_empty=bool(reset))
            if reset:
                payload = {**payload, "session_id": reset.group(1), "reset": True}
            self._check(KEYPOINTS_PATH if path == KEYPOINTS_PATH else ACT_PATH, payload)
        except RequestError as exc:
            return await _respond(send, exc.status, exc.body())
        data = json.dumps(payload).encode()
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        inner = {**scope, "path": ACT_PATH if reset else path, "raw_path": (ACT_PATH if reset else path).encode(),
                 "headers": headers}
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # only a disconnect can follow
            sent = True
            return {"type": "http.request", "body": data, "more_body": False}

        return await self.app(inner, replay, send)

    async def _read_body(self, scope, receive) -> bytes:
        limit = self.limits.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, "body", f"{int(declared)} bytes is over the limit of {limit} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestError(400, "body", "the client disconnected before sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestError(413, "body", f"over the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def _payload(self, scope, body: bytes, allow_empty: bool) -> dict[str, Any]:
        content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
        if content_type.startswith("multipart/form-data"):
            return await self._form(scope, body)
        if allow_empty and not body.strip():
            return {}
        return parse_json(body)

    async def _form(self, scope, body: bytes) -> dict[str, Any]:
        """A multipart upload as the JSON payload: the file (field `image`) base64-encoded, other fields as text
        (`objects` repeated or a JSON list, `state` a JSON list)."""
        import base64

        from starlette.requests import Request

        async def once():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(scope, once).form(max_files=2, max_fields=32)
        except Exception as exc:  # python-multipart's and starlette's parse errors
            raise RequestError(400, "body", f"not a readable multipart form ({exc})") from None
        payload: dict[str, Any] = {}
        for key in form:
            values = form.getlist(key)
            value = values[0]
            if hasattr(value, "read"):
                if key != "image":
                    raise RequestError(400, key, "unexpected file: upload the image as the field 'image'")
                payload[key] = base64.b64encode(await value.read()).decode()
            elif key in ("objects", "state"):
                texts = [str(v) for v in values]
                if len(texts) == 1 and texts[0].lstrip().startswith("["):
                    try:
                        payload[key] = json.loads(texts[0])
                    except json.JSONDecodeError:
                        raise RequestError(422, key, "expected a JSON list") from None
                else:
                    payload[key] = [float(t) for t in texts] if key == "state" else texts
            else:
                payload[key] = str(value)
        return payload

    def _check(self, endpoint: str, payload: dict[str, Any]) -> None:
        if endpoint == KEYPOINTS_PATH:
            request = parse_keypoints(payload, self.limits)
            resolve_model(request.model, self.kinds, "keypoints")
        else:
            request = parse_act(payload, self.limits)
            resolve_model(request.model, self.kinds, "actions")


# ------------------------------------------------------------------------------------------------------ server


def _lit_server_class():
    import litserve as ls

    class LitServer(ls.LitServer):
        """LitServer that starts answering at once: /health says 503 while the workers load (rather than the port
        holding connections unanswered), then 200."""

        def verify_worker_status(self):
            pass

    return LitServer


def build_server(settings: ServeSettings, *, loader: str = DEFAULT_LOADER):
    """The LitServer with both endpoints, the gate, /info and (when asked) the demo. Loads every model once first:
    a model that cannot load raises here, before any port is bound."""
    from fastapi.responses import JSONResponse

    _LitServer = _lit_server_class()
    folders, infos = check_models(settings, loader)
    kinds = {name: info["kind"] for name, info in infos.items()}
    if "actions" in kinds.values() and settings.accelerator not in ("cpu",) and settings.devices not in (1, "1"):
        raise ValueError(f"serve: devices={settings.devices} with action policies: a session's history lives in "
                         "one worker, so /act runs on one device; serve one replica per device instead")
    common = {"max_batch_size": settings.max_batch_size, "batch_timeout": settings.batch_timeout, "loader": loader}
    keypoints = KeypointsAPI(folders, kinds, settings.limits, **common)
    act = ActAPI(folders, kinds, settings.limits, max_sessions=settings.max_sessions,
                 session_idle_seconds=settings.session_idle_seconds, **common)
    api_key = None
    if settings.api_key_env:
        api_key = os.environ.get(settings.api_key_env) or None
    # the session store lives in one process: /act gets one worker
    server = _LitServer([keypoints, act], accelerator=settings.accelerator, devices=settings.devices,
                          workers_per_device={KEYPOINTS_PATH: settings.workers_per_device, ACT_PATH: 1},
                          timeout=settings.timeout, info_path="/litserve/info",
                          middlewares=[(RequestGate, {"kinds": kinds, "limits": settings.limits, "api_key": api_key})])

    @server.app.get("/info")
    async def info() -> JSONResponse:
        return JSONResponse({"models": infos, "max_batch_size": settings.max_batch_size,
                             "batch_timeout": settings.batch_timeout,
                             "limits": {"max_body_bytes": settings.limits.max_body_bytes,
                                        "max_image_pixels": settings.limits.max_image_pixels,
                                        "max_image_side": settings.limits.max_image_side}})

    if settings.demo:
        import gradio as gr

        from affordvla.serve.demo import build_demo

        url = f"http://{settings.host}:{settings.port}"
        gr.mount_gradio_app(server.app, build_demo(url, infos, api_key=api_key, samples=settings.demo_samples),
                            path="/demo", max_file_size=settings.limits.max_body_bytes,
                            theme=gr.themes.Default(font=["sans-serif"], font_mono=["monospace"]))
    return server


def serve(settings: ServeSettings, *, loader: str = DEFAULT_LOADER) -> None:
    server = build_server(settings, loader=loader)
    log.info("serving %s on http://%s:%d", sorted(settings.models), settings.host, settings.port)
    server.run(host=settings.host, port=settings.port, generate_client_file=False, num_api_servers=1)


def settings_from_config(cfg) -> ServeSettings:
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True)
    return ServeSettings(
        models={str(k): str(v) for k, v in (plain.get("models") or {}).items()}, host=plain["host"],
        port=plain["port"], accelerator=plain["accelerator"], devices=plain["devices"],
        workers_per_device=plain["workers_per_device"], max_batch_size=plain["max_batch_size"],
        batch_timeout=float(plain["batch_timeout"]), timeout=float(plain["timeout"]),
        api_key_env=plain.get("api_key_env"), limits=Limits(**plain["limits"]),
        max_sessions=plain["sessions"]["max_sessions"], session_idle_seconds=float(plain["sessions"]["idle_seconds"]),
        tracking_uri=plain.get("tracking_uri"), demo=bool(plain["demo"]["enabled"]),
        demo_samples=plain["demo"].get("samples"))
