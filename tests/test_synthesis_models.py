"""The model-backed parts of KALIE's synthesis stage on the project's tiny offline checkpoints: loading, masks,
context annotators, ControlNet inpainting, prompt client (against a local fake endpoint) and timing helpers."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pytest
import torch

from affordvla.offline.tiny_synthesis import (
    ensure_tiny_models,
    tiny_backend,
    tiny_grounded_sam,
)
from affordvla.synthesis.annotators import ANNOTATORS, make_annotator
from affordvla.synthesis.checkpoints import CheckpointError
from affordvla.synthesis.inpaint import (
    ControlNetInpaintBackend,
    _soft_injection,
    feather,
    only_masked_box,
    scaled_pixels,
)
from affordvla.synthesis.interfaces import InpaintRequest
from affordvla.synthesis.masks import GroundedSamMasks
from affordvla.synthesis.prompts import (
    SYSTEM_PROMPT,
    ChatFilter,
    ChatPrompts,
    PromptError,
    TemplatePrompts,
    description_prompt,
    generation_prompt,
    parse_description_list,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_tiny_models(tmp_path_factory.mktemp("tiny_synthesis_models"))


def scene(height: int = 90, width: int = 120) -> np.ndarray:
    """A table with a red bar, a blue disc and a straight white line."""
    rng = np.random.default_rng(0)
    image = np.full((height, width, 3), (170, 140, 100), np.uint8)
    image = (image + rng.integers(0, 10, image.shape)).astype(np.uint8)
    cv2.rectangle(image, (10, 15), (50, 30), (200, 30, 30), -1)
    cv2.circle(image, (85, 55), 15, (30, 60, 200), -1)
    cv2.line(image, (5, 80), (115, 75), (240, 240, 240), 2)
    return image


# ------------------------------------------------------------------------------------------------ checkpoints


def test_tiny_checkpoints_load_through_from_pretrained(tiny):
    from diffusers import (
        ControlNetModel,
        DPMSolverMultistepScheduler,
        StableDiffusionControlNetInpaintPipeline,
    )
    from transformers import (
        AutoImageProcessor,
        AutoModelForDepthEstimation,
        AutoModelForZeroShotObjectDetection,
        AutoProcessor,
        SamModel,
        SamProcessor,
    )

    assert type(AutoModelForZeroShotObjectDetection.from_pretrained(tiny["grounding_dino"])).__name__ == \
        "GroundingDinoForObjectDetection"
    processor = AutoProcessor.from_pretrained(tiny["grounding_dino"])
    assert processor.tokenizer.decode(processor.tokenizer("usb stick.").input_ids) == "[CLS] usb stick. [SEP]"
    assert type(SamModel.from_pretrained(tiny["sam"])).__name__ == "SamModel"
    assert type(SamProcessor.from_pretrained(tiny["sam"])).__name__ == "SamProcessor"
    assert type(AutoModelForDepthEstimation.from_pretrained(tiny["dpt"])).__name__ == "DPTForDepthEstimation"
    AutoImageProcessor.from_pretrained(tiny["dpt"])
    pipe = StableDiffusionControlNetInpaintPipeline.from_pretrained(
        tiny["stable_diffusion"], controlnet=ControlNetModel.from_pretrained(tiny["controlnet"]), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.tokenizer.model_max_length == 77 and pipe.vae_scale_factor == 8
    assert pipe.unet.config.in_channels == 4


def test_missing_or_broken_checkpoints_name_the_path(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        GroundedSamMasks(tmp_path / "nowhere", tiny["sam"])
    broken = tmp_path / "broken_sam"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="broken_sam"):
        GroundedSamMasks(tiny["grounding_dino"], broken)
    with pytest.raises(CheckpointError, match="model_index.json is missing"):
        ControlNetInpaintBackend(tiny["controlnet"], tiny["controlnet"])


# ------------------------------------------------------------------------------------------------ masks


def test_grounded_sam_masks_plumbing(tiny):
    image = scene()
    provider = tiny_grounded_sam(tiny["grounding_dino"].parent, box_threshold=0.0, text_threshold=0.0)
    found = provider.masks(image, ["brush", "usb stick"])  # random weights: thresholds at 0 force a box
    assert set(found) == {"brush", "usb stick"}
    for name, mask in found.items():
        assert mask.dtype == bool and mask.shape == image.shape[:2] and mask.any()
        x0, y0, x1, y1 = provider.last_detections[name].box
        assert 0 <= x0 <= x1 <= image.shape[1] and 0 <= y0 <= y1 <= image.shape[0]
        assert provider.last_detections[name].phrase  # some of the name's tokens passed the text threshold
    again = provider.masks(image, ["brush", "usb stick"])
    assert all(np.array_equal(found[n], again[n]) for n in found)

    provider.box_threshold = 1.0  # no sigmoid score exceeds 1: every name is a skip, left out of the result
    assert provider.masks(image, ["brush", "usb stick"]) == {}
    assert set(provider.last_skipped) == {"brush", "usb stick"}
    provider.box_threshold, provider.text_threshold = 0.0, 1.0  # boxes pass, but no token: still a skip
    assert provider.masks(image, ["brush"]) == {}
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        provider.masks(image.astype(np.float32), ["brush"])


# ------------------------------------------------------------------------------------------------ annotators


def test_every_annotator_keeps_the_image_size(tiny):
    image = scene(45, 67)  # odd, non-square
    for name in sorted(ANNOTATORS) + ["segmentation"]:
        annotator = make_annotator(name, checkpoint=tiny["dpt"]) if name == "depth" else make_annotator(name)
        out = annotator(image)
        assert out.shape == (45, 67, 3) and out.dtype == np.uint8, name
        assert np.array_equal(out, annotator(image)), f"{name} is not deterministic"
        json.dumps(annotator.describe())


def test_canny_is_opencv_canny_at_kalie_thresholds():
    image = scene()
    expected = cv2.Canny(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 165, 215)
    out = make_annotator("canny")(image)
    assert all(np.array_equal(out[:, :, c], expected) for c in range(3))
    assert expected.any()


def test_classical_annotators_follow_the_structure():
    image = np.full((96, 128, 3), 40, np.uint8)
    cv2.rectangle(image, (30, 30), (90, 70), (220, 220, 220), -1)
    soft = make_annotator("softedge")(image)[:, :, 0]
    assert soft[30, 60] > 200 and soft[50, 60] == 0 and soft[5, 5] == 0  # bright on the outline only
    scribble = make_annotator("scribble")(image)[:, :, 0]
    assert set(np.unique(scribble)) <= {0, 255} and scribble[30, 60] == 255 and scribble[50, 60] == 0
    lines = make_annotator("mlsd")(image)[:, :, 0]
    assert (lines[25:36, 40:80] > 0).any(axis=0).all()  # the top edge is one drawn segment
    assert not lines[40:60, 45:75].any()
    seg = make_annotator("seg", regions=2)(image)
    assert len({tuple(c) for c in seg.reshape(-1, 3)}) == 2 and not np.array_equal(seg[50, 60], seg[5, 5])
    depth = make_annotator("depth_foreground")(image)[:, :, 0]
    assert depth[50, 60] > depth[5, 5] + 100  # the object is nearer than the table


def test_annotator_registry_errors():
    with pytest.raises(ValueError, match="unknown context annotator 'hed'"):
        make_annotator("hed")
    with pytest.raises(ValueError, match="depth_foreground"):
        make_annotator("depth")  # no silent classical fallback
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        make_annotator("canny")(np.zeros((8, 8), np.uint8))


# ------------------------------------------------------------------------------------------------ inpainting


@pytest.fixture(scope="module")
def backend(tiny):
    return tiny_backend(tiny["stable_diffusion"].parent, working_size=64)


def request_near_border(seed: int = 42) -> InpaintRequest:
    image = scene(96, 120)
    mask = np.zeros(image.shape[:2], bool)
    mask[60:90, 85:118] = True  # close to the bottom-right corner: the square crop must shift inside the image
    cv2.circle(mask.view(np.uint8), (70, 70), 8, 1, -1)
    return InpaintRequest(image=image, object_mask=mask, affine=np.eye(2, 3), moved_mask=mask, inpaint_mask=mask,
                          context=make_annotator("softedge")(image), prompt=generation_prompt("a red brush"),
                          seed=seed)


def test_inpaint_changes_pixels_only_inside_the_mask(backend):
    request = request_near_border()
    out = backend.inpaint(request)
    assert out.shape == request.image.shape and out.dtype == np.uint8
    mask = request.inpaint_mask
    # the guarantee: outside the inpaint mask every pixel is returned bit-identical
    assert np.array_equal(out[~mask], request.image[~mask])
    # and the core of the mask (alpha 1 after the feathering) is re-rendered
    blur = scaled_pixels(backend.mask_blur, out.shape, backend.reference_size)
    core = feather(mask, blur) == 1.0
    assert core.sum() > 0.5 * mask.sum()
    assert (out[core] != request.image[core]).any(axis=1).mean() > 0.9
    empty = InpaintRequest(**{**vars(request), "inpaint_mask": np.zeros_like(mask)})
    assert np.array_equal(backend.inpaint(empty), request.image)


def test_inpaint_is_seeded(backend):
    first = backend.inpaint(request_near_border(seed=42))
    assert np.array_equal(first, backend.inpaint(request_near_border(seed=42)))
    assert not np.array_equal(first, backend.inpaint(request_near_border(seed=43)))
    backend.latent_fill = "original"  # the old pixels now show through the 25% that strength 0.75 keeps
    try:
        assert not np.array_equal(first, backend.inpaint(request_near_border(seed=42)))
    finally:
        backend.latent_fill = "nothing"


def test_inpaint_describe_records_kalie_parameters(backend):
    described = backend.describe()
    json.dumps(described)
    assert described["steps"] == 20 and described["guidance_scale"] == 7.0 and described["strength"] == 0.75
    assert "DPM++ 2M" in described["sampler"] and described["working_size"] == 64
    assert described["latent_fill"] == "nothing" and described["negative_prompt"].startswith("deformed, animal")
    assert type(backend.pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert backend.pipeline.scheduler.config.algorithm_type == "dpmsolver++"
    assert backend.pipeline.scheduler.config.solver_order == 2


def test_only_masked_crop_and_feather_geometry():
    mask = np.zeros((100, 200), bool)
    mask[40:50, 90:130] = True
    assert only_masked_box(mask, 10) == (80, 15, 140, 75)  # 40x10 box + 10 px each side, widened to 60x60
    mask[:] = False
    mask[90:100, 0:10] = True  # corner: shifted inside, still square
    assert only_masked_box(mask, 20) == (0, 70, 30, 100)
    mask[:] = False
    mask[10:90, 5:195] = True  # wider than the image is tall: clipped to the image height
    assert only_masked_box(mask, 50) == (0, 0, 200, 100)
    assert scaled_pixels(50, (350, 200, 3), 700) == 25.0 and scaled_pixels(50, (350, 200, 3), None) == 50.0

    disc = np.zeros((64, 64), np.uint8)
    cv2.circle(disc, (32, 32), 20, 1, -1)
    alpha = feather(disc.astype(bool), 2.0)
    assert alpha[disc == 0].max() == 0.0 and alpha[32, 32] == 1.0
    assert 0 < alpha[32, 13] < 1  # just inside the edge: partly blended


def test_soft_injection_weights():
    down = tuple(torch.ones(1) for _ in range(12))
    scaled, mid = _soft_injection(None, None, (down, torch.ones(1)))
    assert float(scaled[0]) == pytest.approx(0.825 ** 12) and float(scaled[11]) == pytest.approx(0.825)
    assert float(mid) == 1.0


# ------------------------------------------------------------------------------------------------ prompts


class FakeChat:
    """An OpenAI-compatible endpoint on 127.0.0.1 answering from a script of (status, content) pairs."""

    def __init__(self, script: list[tuple[int, str]]):
        self.script, self.requests = list(script), []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # http.server's handler name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, content = fake.script.pop(0) if fake.script else (500, "script exhausted")
                reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}
                                   if status == 200 else {"error": content}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def chat_prompts(url: str, **options) -> tuple[ChatPrompts, list[float]]:
    waits: list[float] = []
    return ChatPrompts(url, "fake-vlm", api_key="sk-test", backoff=0.5, sleep=waits.append, **options), waits


def test_prompt_client_valid_list(tmp_path):
    image = scene()
    reply = '["a blue plastic brush", "a wooden brush with black bristles"]'
    with FakeChat([(200, reply)]) as server:
        prompts, waits = chat_prompts(server.url, cache_path=tmp_path / "prompts.json")
        found = prompts.descriptions(image, "Sweep the trash off the table with the brush.", "brush", 2)
        assert found == ["a blue plastic brush", "a wooden brush with black bristles"]
        assert prompts.descriptions(image, "Sweep the trash off the table with the brush.", "brush", 2) == found
    assert len(server.requests) == 1 and waits == []  # the second answer came from the cache
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["headers"]["Authorization"] == "Bearer sk-test"
    body = request["body"]
    assert body["model"] == "fake-vlm" and body["temperature"] == 1.3
    assert body["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
    parts = body["messages"][1]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[1]["text"] == description_prompt("Sweep the trash off the table with the brush.", "brush", 2)
    # a rerun reads the cache file and asks nothing (no server is listening any more)
    rerun, _ = chat_prompts(server.url, cache_path=tmp_path / "prompts.json", max_attempts=1)
    assert rerun.descriptions(image, "Sweep the trash off the table with the brush.", "brush", 2) == found


def test_prompt_client_retries_a_malformed_reply():
    with FakeChat([(200, "Sure! Here are some brushes: a red one, a blue one."),
                   (200, '```json\n["a red brush"]\n```')]) as server:
        prompts, waits = chat_prompts(server.url)
        assert prompts.descriptions(scene(), "task", "brush", 1) == ["a red brush"]
    assert len(server.requests) == 2 and waits == [0.5]


def test_prompt_client_gives_up_with_a_clear_error():
    with FakeChat([(200, "no list here"), (503, "overloaded"), (200, '["unterminated')]) as server:
        prompts, waits = chat_prompts(server.url)
        with pytest.raises(PromptError, match=r"gave no usable answer in 3 attempts.*no JSON list.*HTTP 503"):
            prompts.descriptions(scene(), "task", "brush", 2)
    assert len(server.requests) == 3 and waits == [0.5, 1.0]  # exponential backoff
    with FakeChat([(401, "bad key")]) as server:
        prompts, _ = chat_prompts(server.url)
        with pytest.raises(PromptError, match="HTTP 401.*not retried"):
            prompts.descriptions(scene(), "task", "brush", 2)
    assert len(server.requests) == 1


def test_prompt_parsing_and_alternatives():
    assert parse_description_list('Here: ["a", "b", "a", " "]') == ["a", "b"]
    for bad in ("[]", '{"a": 1}', "[1, 2]", "nothing"):
        with pytest.raises(ValueError):
            parse_description_list(bad)
    templates = TemplatePrompts(per_object={"bowl": ["a glass bowl", "a steel bowl"]}, seed=3)
    assert templates.descriptions(scene(), "t", "bowl", 3) == ["a glass bowl", "a steel bowl", "a glass bowl"]
    drawn = templates.descriptions(scene(), "t", "brush", 4)
    assert len(set(drawn)) == 4 and all("brush" in d for d in drawn)
    assert drawn == TemplatePrompts(seed=3).descriptions(scene(), "t", "brush", 4)
    assert generation_prompt("a red brush") == "a red brush, top down view, highres, best quality, photorealistic"
    with FakeChat([(200, "Yes, all objects are identifiable."), (200, "No.")]) as server:
        check = ChatFilter(server.url, "fake-vlm", api_key_env=None)
        assert check.keep(scene(), "Sweep.", ["brush", "trash"]) is True
        assert check.keep(scene(), "Sweep.", ["brush", "trash"]) is False
    assert "Authorization" not in server.requests[0]["headers"]


# ------------------------------------------------------------------------------------------------ timing helpers


def test_timing_helpers(tiny):
    from affordvla.offline.synthesis_timing import build_sd15_random, time_tiny_inpaint

    timing = time_tiny_inpaint(tiny["stable_diffusion"].parent, repeats=1)
    assert timing["inpaint_median_s"] > 0 and timing["steps"] == 20
    parts = build_sd15_random("meta", parts=("unet", "controlnet"))  # real-size SD1.5, no memory or weights
    millions = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in parts.items()}
    assert millions["unet"] == pytest.approx(859.52, abs=0.01)
    assert millions["controlnet"] == pytest.approx(361.28, abs=0.01)
