"""Serving parts that need no model: request checks, the session store, and the client's retries against a real
HTTP server on 127.0.0.1 that fails on purpose."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from affordvla.serve.apis import resolve_model
from affordvla.serve.client import PolicyClient, ServeRequestError, ServeUnavailable
from affordvla.serve.protocol import Limits, RequestError, decode_image, parse_act, parse_json
from affordvla.serve.sessions import SessionStore

LIMITS = Limits(max_body_bytes=10_000, max_image_pixels=100, max_image_side=10)


def _png(width, height, colour=(10, 20, 30), fmt="PNG") -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), colour, np.uint8)).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_png_and_a_json_numpy_array_decode_to_the_same_pixels():
    pixels = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    from_png = decode_image({"image": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()},
                            LIMITS)
    # json-numpy's layout: base64 of the raw C-order bytes, numpy's dtype descriptor, the shape
    from_array = decode_image({"image": {"__numpy__": base64.b64encode(pixels.tobytes()).decode(), "dtype": "|u1",
                                         "shape": [4, 5, 3]}}, LIMITS)
    assert np.array_equal(from_png, pixels) and np.array_equal(from_array, pixels)


def test_an_image_over_the_side_limit_is_refused_before_decoding():
    with pytest.raises(RequestError) as caught:
        decode_image({"image": _png(11, 2)}, LIMITS)
    assert caught.value.status == 413 and caught.value.field == "image"


def test_object_arrays_are_never_read():
    raw = base64.b64encode(b"\x80\x04K\x01.").decode()  # a pickle of the number 1
    with pytest.raises(RequestError) as caught:
        decode_image({"image": {"__numpy__": raw, "dtype": "|O", "shape": [1, 1, 3]}}, LIMITS)
    assert caught.value.status == 422 and "uint8" in caught.value.message


def test_openvla_double_encoded_payload_and_a_reset_without_image():
    inner = {"image": {"__numpy__": base64.b64encode(bytes(12)).decode(), "dtype": "|u1", "shape": [2, 2, 3]},
             "instruction": "pick", "unnorm_key": "bridge_orig"}
    request = parse_act(parse_json(json.dumps({"encoded": json.dumps(inner)}).encode()), LIMITS)
    assert request.image.shape == (2, 2, 3) and request.unnorm_key == "bridge_orig"
    reset = parse_act({"session_id": "s", "reset": True}, LIMITS)
    assert reset.reset and reset.image is None


def test_a_request_without_model_goes_to_the_only_model_of_its_kind():
    kinds = {"kp": "keypoints", "a": "actions", "b": "actions"}
    assert resolve_model(None, kinds, "keypoints") == "kp"
    with pytest.raises(RequestError, match="several actions policies"):
        resolve_model(None, kinds, "actions")


def test_sessions_expire_when_idle_and_the_oldest_goes_when_full():
    now = [0.0]
    store = SessionStore(max_sessions=2, idle_seconds=10, clock=lambda: now[0])
    store.start("a", "m", "session-a")
    now[0] = 5
    store.start("b", "m", "session-b")
    assert store.get("a") == ("m", "session-a")  # used at 5: a is now the more recent
    store.start("c", "m", "session-c")  # full: b, least recently used, goes
    assert store.get("b") is None and store.get("a") is not None
    now[0] = 16.5  # a and c idle for 11.5 s
    assert store.get("a") is None and store.get("c") is None and len(store) == 0


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 to the first `failures` POSTs, then 200; a 422 on /bad."""

    failures = 2
    calls = 0

    def do_POST(self):
        type(self).calls += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/bad":
            return self._send(422, {"error": {"field": "image", "message": "expected uint8"}})
        if type(self).calls <= type(self).failures:
            return self._send(503, {"detail": "busy"})
        return self._send(200, {"model": "m", "actions": [[1.0, 2.0]], "text": "", "parsed": True})

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky():
    _Flaky.calls = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_client_retries_5xx_with_backoff_then_succeeds(flaky):
    with PolicyClient(flaky, retries=3, backoff=0.01) as client:
        answer = client.act(np.zeros((2, 2, 3), np.uint8), "go")
    assert _Flaky.calls == 3 and answer.actions.tolist() == [[1.0, 2.0]]


def test_client_gives_up_after_its_bounded_retries(flaky):
    _Flaky.failures = 10
    try:
        with PolicyClient(flaky, retries=2, backoff=0.01) as client, pytest.raises(ServeUnavailable):
            client.act(np.zeros((2, 2, 3), np.uint8), "go")
        assert _Flaky.calls == 3
    finally:
        _Flaky.failures = 2


def test_client_raises_on_4xx_at_once_with_the_field(flaky):
    with PolicyClient(flaky, retries=3, backoff=0.01) as client, pytest.raises(ServeRequestError) as caught:
        client._call("POST", "/bad", data="{}")
    assert _Flaky.calls == 1 and caught.value.status == 422 and caught.value.field == "image"


def test_client_retries_connection_errors_a_bounded_number_of_times():
    from serve_helpers import free_port

    with (PolicyClient(f"http://127.0.0.1:{free_port()}", retries=1, backoff=0.01, timeout=2) as client,
          pytest.raises(ServeUnavailable, match="2 attempts")):
        client.info()


def test_a_model_that_cannot_load_stops_the_start_before_the_port_is_bound(tmp_path):
    import os
    import socket
    import subprocess

    from serve_helpers import free_port, serve_command, server_env

    (tmp_path / "not-an-export").mkdir()
    (tmp_path / "not-an-export" / "notes.txt").write_text("a user's folder")
    port = free_port()
    done = subprocess.run(serve_command({"bad": tmp_path / "not-an-export"}, port, ["accelerator=cpu"]),
                          capture_output=True, text=True, timeout=300, env={**os.environ, **server_env(tmp_path)})
    assert done.returncode == 1, done.stderr[-2000:]
    assert "affordvla-serve: error: serve: models.bad" in done.stderr and "policy.json" in done.stderr
    with socket.socket() as sock:  # nothing listens there
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_an_mlflow_run_id_resolves_to_the_runs_export(tmp_path):
    from mlflow import MlflowClient

    from affordvla.serve.server import resolve_source

    export = tmp_path / "run" / "model"
    export.mkdir(parents=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("serve", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment)
    config = tmp_path / "config_resolved.yaml"  # as affordvla-train logs it under run/
    config.write_text(f"task_name: train\nexport_dir: {export}\n")
    client.log_artifact(run.info.run_id, str(config), "run")
    assert resolve_source("kp", run.info.run_id, uri) == export
    with pytest.raises(FileNotFoundError, match="neither an export folder nor an MLflow run id"):
        resolve_source("kp", str(tmp_path / "missing"), uri)
