"""The demo in a real headless Chromium (Debian's, driven by Playwright through its executable path): upload an
image, predict, and the overlay shows the points the API answers for the same image."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import requests
from PIL import Image
from serve_helpers import KEY, served, tiny_exports  # noqa: F401  (session fixtures)

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
    url, headers, keypoint_model = served.url, {"X-API-Key": KEY}, "kp"  # panel A shows the first model by name
    pixels = (np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "scene.png")
    shown = run_demo(url, tmp_path / "scene.png")
    import base64

    body = {"image": base64.b64encode((tmp_path / "scene.png").read_bytes()).decode(), "model": keypoint_model,
            "instruction": "Sweep the trash off the table with the brush."}
    answer = requests.post(url + "/v1/keypoints", json=body, headers=headers, timeout=120).json()
    assert json.loads(shown["a"]) == answer["points"]
