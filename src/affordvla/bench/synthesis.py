"""KALIE's synthesis stage: throughput, the share of time outside the inpainting call, and whether training on
synthetic variants helps on held-out scenes with unseen object colours and poses.

Every figure is measured in this process (or in training subprocesses started here) on generated toy data:
- `synthesis.samples_per_s`: synthetic samples per second of the whole stage (reading, masks, context maps,
  compositing backend, PNG and journal writing) on CPU;
- `synthesis.outside_backend_share_compositing`: the share of the stage's time spent outside `backend.inpaint`
  with the compositing backend;
- `synthesis.outside_diffusion_share`: the same share with the diffusion backend (ControlNet inpainting with
  KALIE's sampler settings on the project's tiny offline checkpoints, 64-px working size, CPU);
- `synthesis.keypoint_error_with` / `_without`: held-out `test/keypoint_error` of the project's trainer
  (`affordvla.train`, default tiny PaliGemma) after the same number of steps on originals + synthetic variants
  against originals alone. The originals are toy scenes whose grasped object has a hue in the first half of the
  hue circle and a principal axis within [0, 90) degrees; the test and validation scenes have both in the other
  half, so their colours and poses are unseen by the originals.
"""

from __future__ import annotations

import colorsys
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

LEARNING = {"pool": 1600, "train": 320, "val": 32, "test": 200, "variants": 2, "steps": 250, "batch_size": 32}


def _compositing_recipe(num_variants: int, seed: int = 0):
    from affordvla.synthesis.annotators import make_annotator
    from affordvla.synthesis.compositing import CompositingBackend
    from affordvla.synthesis.dataset_masks import DatasetMasks
    from affordvla.synthesis.recipe import KalieRecipe

    return KalieRecipe(CompositingBackend(), DatasetMasks(), make_annotator("softedge"), num_variants=num_variants,
                       seed=seed)


def _throughput(work: Path) -> dict[str, float]:
    from affordvla.offline.toy_kalie import ensure_toy_kalie
    from affordvla.synthesis.pipeline import synthesize_dataset

    source = ensure_toy_kalie(work / "toy_throughput", seed=11, image_size=128,
                              splits={"train": 60, "val": 0, "test": 0})
    out = work / "throughput_out"
    shutil.rmtree(out, ignore_errors=True)
    result = synthesize_dataset(source, out, _compositing_recipe(4), progress=False)
    return {"synthesis.samples_per_s": result.synthetic / result.seconds,
            "synthesis.outside_backend_share_compositing": 1.0 - result.backend_seconds / result.seconds}


def _diffusion_share(work: Path, tiny_root: Path = Path("outputs/artifacts/synthesis_tiny")) -> dict[str, float]:
    """The stage with the diffusion backend (ControlNet inpainting, KALIE's 20 steps and CFG 7) on the project's
    tiny offline checkpoints at a 64-px working size: what the stage costs around the diffusion calls."""
    from affordvla.offline.tiny_synthesis import ensure_tiny_models
    from affordvla.offline.toy_kalie import ensure_toy_kalie
    from affordvla.synthesis.annotators import make_annotator
    from affordvla.synthesis.dataset_masks import DatasetMasks
    from affordvla.synthesis.inpaint import ControlNetInpaintBackend
    from affordvla.synthesis.pipeline import synthesize_dataset
    from affordvla.synthesis.recipe import KalieRecipe

    models = ensure_tiny_models(tiny_root, ["stable_diffusion", "controlnet"])  # shared with synthesis=kalie
    backend = ControlNetInpaintBackend(models["stable_diffusion"], models["controlnet"], device="cpu",
                                       working_size=64)
    source = ensure_toy_kalie(work / "toy_diffusion", seed=12, image_size=128, splits={"train": 2, "val": 0, "test": 0})
    out = work / "diffusion_out"
    shutil.rmtree(out, ignore_errors=True)
    recipe = KalieRecipe(backend, DatasetMasks(), make_annotator("softedge"), num_variants=1)
    result = synthesize_dataset(source, out, recipe, progress=False)
    return {"synthesis.outside_diffusion_share": 1.0 - result.backend_seconds / result.seconds,
            "synthesis.diffusion_tiny_samples_per_s": result.synthetic / result.seconds}


# ------------------------------------------------------------------------------------------------ learning


def _appearance(root: Path, entry) -> tuple[float, float]:
    """(hue in [0, 1), principal-axis angle in [0, 180) degrees) of the entry's first (grasped) object."""
    name = entry.objects[0]
    with Image.open(root / entry.other["masks"][name]) as im:
        mask = np.asarray(im) >= 128
    with Image.open(entry.image_path) as im:
        image = np.asarray(im.convert("RGB"), dtype=np.float64)
    r, g, b = image[mask].mean(axis=0) / 255.0
    hue = colorsys.rgb_to_hsv(r, g, b)[0]
    rows, cols = np.nonzero(mask)
    cov = np.cov(np.stack([cols, rows]).astype(np.float64))
    values, vectors = np.linalg.eigh(cov)
    x, y = vectors[:, np.argmax(values)]
    angle = np.degrees(np.arctan2(-y, x)) % 180.0  # y points down: counter-clockwise on screen is positive
    return float(hue), float(angle)


def _held_out_split(work: Path, sizes: dict[str, int]) -> Path:
    """A KALIE dataset of toy scenes with a splits.json: train = 'seen' colours and poses, val/test = unseen."""
    from affordvla.data.kalie import (
        load_kalie_sample,
        read_kalie_index,
        write_kalie_dataset,
    )
    from affordvla.offline.toy_kalie import ensure_toy_kalie

    pool = ensure_toy_kalie(work / f"toy_pool{sizes['pool']}", seed=21, image_size=128, splits={"pool": sizes["pool"]})
    seen, unseen = [], []
    for entry in read_kalie_index(pool)[0]:
        hue, angle = _appearance(pool, entry)
        if hue < 0.5 and angle < 90.0:
            seen.append(entry)
        elif hue >= 0.5 and angle >= 90.0:
            unseen.append(entry)
    need_unseen = sizes["val"] + sizes["test"]
    if len(seen) < sizes["train"] or len(unseen) < need_unseen:
        raise RuntimeError(f"pool of {sizes['pool']} gives {len(seen)} seen / {len(unseen)} unseen scenes; "
                           f"need {sizes['train']} / {need_unseen}")
    chosen = seen[: sizes["train"]] + unseen[:need_unseen]
    root = work / "held_out"
    shutil.rmtree(root, ignore_errors=True)
    (root / "masks").mkdir(parents=True)
    for entry in chosen:  # the masks keep their paths relative to the root, so other.masks stays valid
        for rel in entry.other["masks"].values():
            shutil.copyfile(pool / rel, root / rel)
    keys = write_kalie_dataset(root, ((load_kalie_sample(e).image, e.points, e.other) for e in chosen))
    n_train, n_val = sizes["train"], sizes["val"]
    splits = {"train": keys[:n_train], "val": keys[n_train: n_train + n_val], "test": keys[n_train + n_val:]}
    (root / "splits.json").write_text(json.dumps(splits, indent=4))
    return root


def _unseen_coverage(root: Path) -> dict[str, float]:
    """Shares of the synthetic training variants whose grasped object has an unseen hue / an unseen pose."""
    from affordvla.data.kalie import read_kalie_index

    train = set(json.loads((root / "splits.json").read_text())["train"])
    looks = [_appearance(root, e) for e in read_kalie_index(root)[0] if e.key in train and "synthesis" in e.other]
    return {"synthesis.variants_unseen_hue_share": float(np.mean([h >= 0.5 for h, _ in looks])),
            "synthesis.variants_unseen_pose_share": float(np.mean([a >= 90.0 for _, a in looks]))}


def _train(work: Path, name: str, overrides: list[str], steps: int, batch_size: int) -> dict[str, float]:
    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "affordvla.train", f"task_name=bench_synthesis_{name}",
               f"hydra.run.dir={run_dir}", "logger=none", "export_dir=null", f"trainer.max_steps={steps}",
               f"trainer.val_check_interval={steps}", f"callbacks.model_checkpoint.every_n_train_steps={steps}",
               "callbacks.progress_bar.refresh_rate=0", f"dataset.batch_size={batch_size}",
               "module.callbacks.keypoint_overlays=null", *overrides]
    subprocess.run(command, check=True)
    return json.loads((run_dir / "metrics.json").read_text())


def _learning(work: Path, sizes: dict[str, int] = LEARNING) -> dict[str, float]:
    data = [f"dataset.root={_held_out_split(work, sizes)}", "dataset.generate=null"]
    steps, batch = sizes["steps"], sizes["batch_size"]
    started = time.perf_counter()
    without = _train(work, "without", data, steps, batch)
    with_ = _train(work, "with", [*data, "synthesis=kalie_compositing", f"synthesis.output_root={work / 'synth'}",
                                  f"synthesis.recipe.num_variants={sizes['variants']}", "synthesis.progress=false"],
                   steps, batch)
    # how far the variants reach into the held-out region the originals never show
    run_info = json.loads((work / "runs" / "with" / "run_info.json").read_text())
    coverage = _unseen_coverage(Path(run_info["dataset"]["root"]))
    return {
        **coverage,
        "synthesis.keypoint_error_with": with_["test/keypoint_error"],
        "synthesis.keypoint_error_without": without["test/keypoint_error"],
        "synthesis.keypoint_error_parsed_with": with_["test/keypoint_error_parsed"],
        "synthesis.keypoint_error_parsed_without": without["test/keypoint_error_parsed"],
        "synthesis.test_loss_with": with_["test/loss"],
        "synthesis.test_loss_without": without["test/loss"],
        "synthesis.parse_failure_rate_with": with_["test/parse_failure_rate"],
        "synthesis.parse_failure_rate_without": without["test/parse_failure_rate"],
        "synthesis.mean_baseline_error": without["test/mean_baseline_error"],
        "synthesis.learning_wall_seconds": time.perf_counter() - started,
    }


def run(work: str | Path = "outputs/bench/work/synthesis", *, learning: bool = True) -> dict[str, float]:
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    figures = _throughput(work)
    figures.update(_diffusion_share(work))
    if learning:
        figures.update(_learning(work))
    return figures
