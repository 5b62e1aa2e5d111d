"""The web demo (Gradio, mounted at /demo on the server): pick a model for each of two panels, upload an image or
draw a sample of a KALIE-format test split, type an instruction, and see each model's points drawn and named on
the image, or its action chunk plotted. The demo talks to the server's own API through PolicyClient, so what it
shows is what the API answers."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image, ImageDraw

from affordvla.serve.client import PolicyClient, ServeRequestError

SHOWN_SIZE = 384  # overlays are drawn on an upscaled copy so names stay legible on small images
COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"]


def draw_points(image: np.ndarray, names: list[str], points: dict[str, Any]) -> np.ndarray:
    """The image (upscaled to SHOWN_SIZE on its longer side) with each normalised point drawn and named."""
    pil = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    scale = SHOWN_SIZE / max(pil.size)
    pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(pil)
    for i, name in enumerate(names):
        x, y = points[name][0] * pil.width, points[name][1] * pil.height
        colour = COLOURS[i % len(COLOURS)]
        draw.ellipse((x - 6, y - 6, x + 6, y + 6), outline=colour, width=3)
        draw.text((x + 8, y - 6), name, fill=colour)
    return np.asarray(pil)


def plot_actions(actions: np.ndarray) -> np.ndarray:
    """The chunk (n, D) as one line per action dimension over the chunk's steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    actions = np.asarray(actions, dtype=np.float32).reshape(len(actions), -1)
    fig, ax = plt.subplots(figsize=(5, 3), dpi=80)
    for d in range(actions.shape[1]):
        ax.plot(np.arange(len(actions)), actions[:, d], marker="o", label=f"a{d}")
    ax.set_xlabel("step of the chunk")
    ax.set_ylabel("action (dataset units)")
    ax.legend(fontsize=6, ncol=4)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return np.asarray(Image.open(buffer).convert("RGB"))


def test_samples(folder: str | Path | None) -> list:
    """KeypointSamples of a KALIE-format folder: its test split when it has splits.json, else every entry."""
    if not folder:
        return []
    from affordvla.data.kalie import load_kalie_sample, read_kalie_index

    root = Path(folder)
    entries, _ = read_kalie_index(root)
    splits = root / "splits.json"
    if splits.is_file():
        test = set(json.loads(splits.read_text()).get("test", []))
        entries = [e for e in entries if e.key in test] or entries
    return [load_kalie_sample(e) for e in entries[:200]]


def build_demo(url: str, infos: dict[str, dict], *, api_key: str | None = None,
               samples: str | None = None) -> gr.Blocks:
    names = sorted(infos)
    pool = test_samples(samples)
    client = PolicyClient(url, api_key=api_key, retries=1)

    def run_model(model: str, image, instruction: str, task: str, objects: str):
        if not model:
            return None, "pick a model"
        if image is None:
            return None, "upload an image or draw a sample first"
        try:
            if infos[model]["kind"] == "keypoints":
                answer = client.keypoints(image, instruction, model=model, task=task or "",
                                          objects=[o.strip() for o in objects.split(",") if o.strip()])
                shown = json.dumps({n: list(answer.points[n]) for n in answer.names}, sort_keys=True)
                return draw_points(image, answer.names, answer.points), shown
            answer = client.act(image, instruction, model=model)
            return plot_actions(answer.actions), json.dumps({"actions": answer.actions.tolist()})
        except ServeRequestError as exc:
            return None, f"refused: {exc}"

    def draw_sample():
        if not pool:
            return gr.update(), gr.update(), gr.update(), gr.update()
        sample = random.choice(pool)
        return sample.image, sample.instruction, sample.task, ", ".join(sample.objects)

    with gr.Blocks(title="affordvla policies", analytics_enabled=False) as demo:
        gr.Markdown("### affordvla policies: the same input, two models")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="image", type="numpy", elem_id="image-input", sources=["upload"], height=256)
                sample = gr.Button("draw a test-split sample", elem_id="sample-button", interactive=bool(pool))
            with gr.Column():
                instruction = gr.Textbox(label="instruction", elem_id="instruction",
                                         value="Sweep the trash off the table with the brush.")
                task = gr.Textbox(label="task (KALIE prompts)", elem_id="task")
                objects = gr.Textbox(label="objects, comma separated (KALIE prompts)", elem_id="objects")
                submit = gr.Button("predict", variant="primary", elem_id="submit")
        panels = []
        with gr.Row():
            for side, default in (("a", names[0]), ("b", names[-1])):
                with gr.Column():
                    model = gr.Dropdown(names, value=default, label=f"model {side.upper()}", elem_id=f"model-{side}")
                    shown = gr.Image(label="prediction", type="numpy", elem_id=f"overlay-{side}", interactive=False)
                    points = gr.Textbox(label="answer", elem_id=f"points-{side}", interactive=False)
                    panels.append((model, shown, points))
        sample.click(draw_sample, outputs=[image, instruction, task, objects])
        for model, shown, points in panels:
            submit.click(run_model, inputs=[model, image, instruction, task, objects], outputs=[shown, points])
    return demo
