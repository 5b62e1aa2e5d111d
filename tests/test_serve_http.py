"""Bad requests against a real server process on 127.0.0.1 (the tiny exports of test_serve_e2e): each gets its 4xx
with a JSON error naming the field, and the server stays healthy. Request bodies are built by hand here as a client
(or curl) would send them."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image
from serve_helpers import KEY, served, tiny_exports  # noqa: F401  (session fixtures)


def png(width: int = 16, height: int = 16, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def array(values: np.ndarray) -> dict:  # json-numpy's layout, written out by hand
    return {"__numpy__": b64(values.tobytes()), "dtype": values.dtype.str, "shape": list(values.shape)}


@pytest.fixture
def server(served):
    return served


GOOD_IMAGE = b64(png())
GOOD_ARRAY = array(np.full((16, 16, 3), 7, np.uint8))

# (name, path, body, headers or None, expected status, field the error must name)
BAD = [
    ("no image", "/v1/keypoints", {"instruction": "sweep"}, None, 400, "image"),
    ("corrupt base64", "/v1/keypoints", {"image": "%%%not base64%%%", "instruction": "sweep"}, None, 400, "image"),
    ("truncated PNG", "/v1/keypoints", {"image": b64(png()[:60]), "instruction": "sweep"}, None, 400, "image"),
    ("image over the limit", "/v1/keypoints", {"image": b64(png(120, 120)), "instruction": "sweep"}, None, 413,
     "image"),
    ("not PNG or JPEG", "/v1/keypoints", {"image": b64(png(fmt="GIF")), "instruction": "sweep"}, None, 415, "image"),
    ("float pixels for /act", "/act", {"image": array(np.zeros((16, 16, 3), np.float32)), "instruction": "go"}, None,
     422, "image"),
    ("wrong shape for /act", "/act", {"image": array(np.zeros((16, 16), np.uint8)), "instruction": "go"}, None, 422,
     "image"),
    ("bytes short of the shape", "/act", {"image": {**GOOD_ARRAY, "shape": [32, 32, 3]}, "instruction": "go"}, None,
     422, "image"),
    ("non-JSON", "/v1/keypoints", b"image=abc&instruction=x", {"Content-Type": "application/json"}, 400, "body"),
    ("a JSON list", "/act", [1, 2, 3], None, 400, "body"),
    ("unknown model", "/v1/keypoints", {"image": GOOD_IMAGE, "instruction": "sweep", "model": "nope"}, None, 404,
     "model"),
    ("keypoint model on /act", "/act", {"image": GOOD_ARRAY, "instruction": "go", "model": "kp"}, None, 400, "model"),
    ("action model on /v1/keypoints", "/v1/keypoints", {"image": GOOD_IMAGE, "instruction": "x", "model": "lstm"},
     None, 400, "model"),
    ("missing instruction", "/v1/keypoints", {"image": GOOD_IMAGE}, None, 400, "instruction"),
    ("objects not a list", "/v1/keypoints", {"image": GOOD_IMAGE, "instruction": "x", "objects": "brush"}, None, 422,
     "objects"),
    ("state not numbers", "/act", {"image": GOOD_ARRAY, "instruction": "go", "state": ["a"]}, None, 422, "state"),
    ("unknown session", "/act", {"image": GOOD_ARRAY, "instruction": "go", "session_id": "never-begun"}, None, 404,
     "session_id"),
    ("wrong API key", "/v1/keypoints", {"image": GOOD_IMAGE, "instruction": "x"}, {"X-API-Key": "wrong"}, 401,
     "X-API-Key"),
    ("missing API key", "/info", None, {"X-API-Key": ""}, 401, "X-API-Key"),
    ("oversize body", "/v1/keypoints", {"image": "A" * 300_000, "instruction": "x"}, None, 413, "body"),
]


@pytest.mark.parametrize("name,path,body,headers,status,field", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_its_4xx_naming_the_field(server, name, path, body, headers, status, field):
    sent_headers = {"X-API-Key": KEY, "Content-Type": "application/json", **(headers or {})}
    data = body if isinstance(body, bytes) else (None if body is None else json.dumps(body))
    method = "GET" if body is None else "POST"
    response = requests.request(method, server.url + path, data=data, headers=sent_headers, timeout=60)
    assert response.status_code == status, (name, response.status_code, response.text[:300])
    error = response.json()["error"]
    assert error["field"] == field and error["message"], (name, error)
    assert requests.get(server.url + "/health", timeout=10).status_code == 200


def test_multipart_upload_without_its_file_names_the_image(server):
    response = requests.post(server.url + "/v1/keypoints", files={"instruction": (None, "sweep")},
                             headers={"X-API-Key": KEY}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["field"] == "image"


def test_multipart_upload_and_openvla_double_encoding_are_served(server):
    upload = requests.post(server.url + "/v1/keypoints", files={"image": ("scene.png", png(), "image/png")},
                           data={"instruction": "sweep", "objects": ["brush", "trash"]}, headers={"X-API-Key": KEY},
                           timeout=60)
    assert upload.status_code == 200, upload.text
    assert upload.json()["width"] == 16 and upload.json()["model"] == "kp"
    encoded = json.dumps({"image": GOOD_ARRAY, "instruction": "go", "unnorm_key": None})
    act = requests.post(server.url + "/act", json={"encoded": encoded}, headers={"X-API-Key": KEY}, timeout=60)
    assert act.status_code == 200, act.text
    assert np.asarray(act.json()["actions"]).ndim == 2 and act.json()["model"] == "lstm"


def test_health_and_the_openvla_payload_need_no_more_than_documented(server):
    assert requests.get(server.url + "/health", timeout=10).status_code == 200  # no key for probes
    info = requests.get(server.url + "/info", headers={"X-API-Key": KEY}, timeout=10).json()
    assert {name: m["kind"] for name, m in info["models"].items()} == {"kp": "keypoints", "lstm": "actions"}
