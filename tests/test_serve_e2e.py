"""affordvla-serve end to end: a real server process on 127.0.0.1, started by the test on tiny exports of a
keypoint-text policy and an LSTM action policy (one server for the whole module), answers exactly what the same
exports answer in process, alone or batched with 15 others; a session over HTTP is the in-process session's
rollout; /health says 503 then 200; every kind of bad request gets its 4xx naming the field and the server stays
healthy (bodies built by hand as a client or curl sends them); and the demo, in a real headless Chromium
(Debian's, driven by Playwright through its executable path), shows the points the API answers."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from serve_helpers import KEY, LIMITS, ServerProcess, free_port, serve_command, server_env, train_export

from affordvla.formats.kalie_tasks import TASKS
from affordvla.offline.tabletop import make_scenes
from affordvla.policies import load_policy
from affordvla.serve import PolicyClient


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory, tiny_backbone_dir) -> dict[str, Path]:
    """A keypoint-text policy (the default's head, smoke data at 64 px) and an LSTM action policy, each trained a
    few steps and exported by affordvla-train; `samples` is the keypoint run's toy KALIE data."""
    kp, kp_cfg = train_export(tmp_path_factory.mktemp("serve_kp"), tiny_backbone_dir,
                              ["debug=smoke", "dataset.generate.image_size=64"])
    lstm, _ = train_export(tmp_path_factory.mktemp("serve_lstm"), tiny_backbone_dir,
                           ["experiment=toy_actions_lstm", "dataset.generate.train_episodes=2",
                            "dataset.generate.val_episodes=1", "dataset.generate.episode_length=8",
                            "dataset.batch_size=4", "trainer.max_steps=3", "trainer.val_check_interval=3",
                            "head.hidden_size=16"])
    return {"kp": kp, "lstm": lstm, "samples": Path(kp_cfg.dataset.root)}


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_exports) -> ServerProcess:
    """affordvla-serve on both exports, as a user starts it: batching on (up to 16 requests wait at most 0.5 s to
    share a forward pass), an API key, the demo with the keypoint run's test split, small request limits."""
    root = tmp_path_factory.mktemp("served")
    port = free_port()
    overrides = ["accelerator=cpu", "max_batch_size=16", "batch_timeout=0.5",
                 f"demo.samples={tiny_exports['samples']}", *[f"limits.{k}={v}" for k, v in LIMITS.items()]]
    server = ServerProcess(serve_command({"kp": tiny_exports["kp"], "lstm": tiny_exports["lstm"]}, port, overrides),
                           port, root / "server.log", env=server_env(root, AFFORDVLA_SERVE_API_KEY=KEY))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def policies(tiny_exports):
    return {name: load_policy(tiny_exports[name]) for name in ("kp", "lstm")}


@pytest.fixture
def client(served):
    with PolicyClient(served.url, api_key=KEY, timeout=120, retries=0) as client:
        yield client


def _scenes(count: int, seed: int = 5):
    return [(s.image, TASKS[s.task].instruction, s.task, list(TASKS[s.task].objects))
            for s in make_scenes(seed, count, 64)]


def test_health_is_503_until_every_model_is_loaded_then_200(served):
    assert 503 in served.health and served.health[-1] == 200, served.health
    assert served.health.index(503) < served.health.index(200)


def test_info_describes_each_model(client, tiny_exports):
    models = client.info()["models"]
    assert models["kp"]["kind"] == "keypoints" and models["lstm"]["kind"] == "actions"
    assert models["kp"]["export"] == str(tiny_exports["kp"])


def test_keypoints_over_http_equal_in_process_predict(client, policies):
    for image, instruction, task, objects in _scenes(3):
        expected = policies["kp"].predict([{"image": image, "instruction": instruction, "task": task,
                                            "objects": objects}])[0]
        answer = client.keypoints(image, instruction, model="kp", task=task, objects=objects)
        assert answer.text == expected.text and answer.parsed == expected.parsed
        assert answer.names == list(expected.names)
        assert np.array_equal(answer.array, expected.points)
        for name, (x, y) in answer.points.items():
            assert answer.pixels[name] == (x * 64, y * 64)


def test_kalie_helper_returns_the_five_named_points_or_says_why(client, policies):
    image, _, task, _ = _scenes(1, seed=9)[0]
    expected = policies["kp"].predict([{"image": image, "instruction": TASKS[task].instruction, "task": task,
                                        "objects": list(TASKS[task].objects)}])[0]
    if set(expected.names) >= {"Grasp Point", "Post-contact Point"} and expected.parsed:
        points = client.kalie_points(image, task, model="kp")
        assert list(points) == list(expected.names)[:5]
    else:  # a few training steps may not yet answer all five: the helper names what is missing
        with pytest.raises(ValueError, match="answered without"):
            client.kalie_points(image, task, model="kp")


def test_sixteen_concurrent_requests_are_batched_and_equal_batch_one(client, served):
    scenes = _scenes(16, seed=21)
    alone = [client.keypoints(image, instruction, model="kp", task=task, objects=objects)
             for image, instruction, task, objects in scenes]
    together: list = [None] * 16
    barrier = threading.Barrier(16)

    def ask(i: int) -> None:
        with PolicyClient(served.url, api_key=KEY, timeout=120, retries=0) as own:
            image, instruction, task, objects = scenes[i]
            barrier.wait()
            together[i] = own.keypoints(image, instruction, model="kp", task=task, objects=objects)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    sizes = [answer.timings["batch_size"] for answer in together]
    assert max(sizes) > 1, sizes  # 16 requests released together within the 0.5 s batching window
    for one, batched in zip(alone, together):
        assert batched.text == one.text and np.array_equal(batched.array, one.array)


def test_act_over_http_equals_in_process_predict(client, policies):
    for image, _, _, _ in _scenes(2, seed=3):
        expected = policies["lstm"].predict([{"image": image, "instruction": "push the block"}])[0]
        answer = client.act(image, "push the block", model="lstm")
        assert answer.actions.dtype == np.float32 and np.array_equal(answer.actions, expected.actions)


def test_a_twenty_step_session_over_http_is_the_in_process_rollout(client, policies):
    frames = [s.image for s in make_scenes(31, 20, 64)]
    session = policies["lstm"].session()
    expected = [session.act({"image": frame, "instruction": "push the block"}) for frame in frames]
    client.reset("episode-1", model="lstm")
    for step, (frame, want) in enumerate(zip(frames, expected)):
        got = client.act(frame, "push the block", session="episode-1", model="lstm")
        assert np.array_equal(got.actions, want.actions), step
        assert np.array_equal(got.executed, want.executed), step
    # a reset begins the episode again: the first step's answer comes back
    client.reset("episode-1", model="lstm")
    again = client.act(frames[0], "push the block", session="episode-1", model="lstm")
    assert np.array_equal(again.actions, expected[0].actions)


# ------------------------------------------------------------------------------------------------ bad requests

def png(width: int = 16, height: int = 16, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def array(values: np.ndarray) -> dict:  # json-numpy's layout, written out by hand
    return {"__numpy__": b64(values.tobytes()), "dtype": values.dtype.str, "shape": list(values.shape)}


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
def test_bad_request_gets_its_4xx_naming_the_field(served, name, path, body, headers, status, field):
    sent_headers = {"X-API-Key": KEY, "Content-Type": "application/json", **(headers or {})}
    data = body if isinstance(body, bytes) else (None if body is None else json.dumps(body))
    method = "GET" if body is None else "POST"
    response = requests.request(method, served.url + path, data=data, headers=sent_headers, timeout=60)
    assert response.status_code == status, (name, response.status_code, response.text[:300])
    error = response.json()["error"]
    assert error["field"] == field and error["message"], (name, error)
    assert requests.get(served.url + "/health", timeout=10).status_code == 200


def test_multipart_upload_without_its_file_names_the_image(served):
    response = requests.post(served.url + "/v1/keypoints", files={"instruction": (None, "sweep")},
                             headers={"X-API-Key": KEY}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["field"] == "image"


def test_multipart_upload_and_openvla_double_encoding_are_served(served):
    upload = requests.post(served.url + "/v1/keypoints", files={"image": ("scene.png", png(), "image/png")},
                           data={"instruction": "sweep", "objects": ["brush", "trash"]}, headers={"X-API-Key": KEY},
                           timeout=60)
    assert upload.status_code == 200, upload.text
    assert upload.json()["width"] == 16 and upload.json()["model"] == "kp"
    encoded = json.dumps({"image": GOOD_ARRAY, "instruction": "go", "unnorm_key": None})
    act = requests.post(served.url + "/act", json={"encoded": encoded}, headers={"X-API-Key": KEY}, timeout=60)
    assert act.status_code == 200, act.text
    assert np.asarray(act.json()["actions"]).ndim == 2 and act.json()["model"] == "lstm"


def test_health_and_the_openvla_payload_need_no_more_than_documented(served):
    assert requests.get(served.url + "/health", timeout=10).status_code == 200  # no key for probes
    info = requests.get(served.url + "/info", headers={"X-API-Key": KEY}, timeout=10).json()
    assert {name: m["kind"] for name, m in info["models"].items()} == {"kp": "keypoints", "lstm": "actions"}


# --------------------------------------------------------------------------------------------------- the demo

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def open_demo(url: str):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is installed by the dev extra")
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH and it could not be installed (`make setup` installs Debian's chromium "
                    "as root where apt-get exists)")
    return sync_api.sync_playwright()


def run_demo(url: str, image_path, screenshot=None) -> dict[str, str]:
    """Upload `image_path` in the demo at `url`, press predict, wait for panel A's overlay; the answers shown."""
    with open_demo(url) as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url + "/demo/", wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_selector("#submit", timeout=120_000)
            page.set_input_files("#image-input input[type=file]", str(image_path))
            page.wait_for_selector("#image-input img", timeout=60_000)
            page.click("#submit")
            page.wait_for_selector("#overlay-a img", timeout=120_000)
            for side in ("a", "b"):
                page.wait_for_function(f"(document.querySelector('#points-{side} textarea') || {{}}).value",
                                       timeout=120_000)
            shown = {side: page.locator(f"#points-{side} textarea").input_value() for side in ("a", "b")}
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
            return shown
        finally:
            browser.close()


def test_demo_overlay_shows_the_apis_points(served, tmp_path):
    url, headers = served.url, {"X-API-Key": KEY}
    Image.fromarray(next(iter(make_scenes(41, 1, 64))).image).save(tmp_path / "scene.png")
    shown = run_demo(url, tmp_path / "scene.png")
    # the demo's defaults: panel A the first model by name (kp), B the last (lstm); KALIE's sweeping instruction
    body = {"image": b64((tmp_path / "scene.png").read_bytes()), "model": "kp",
            "instruction": "Sweep the trash off the table with the brush."}
    answer = requests.post(url + "/v1/keypoints", json=body, headers=headers, timeout=120).json()
    assert json.loads(shown["a"]) == answer["points"]
    frame = np.asarray(Image.open(tmp_path / "scene.png").convert("RGB"))
    act = requests.post(url + "/act", json={"image": array(frame), "instruction": body["instruction"],
                                            "model": "lstm"}, headers=headers, timeout=120).json()
    assert json.loads(shown["b"]) == {"actions": act["actions"]}
