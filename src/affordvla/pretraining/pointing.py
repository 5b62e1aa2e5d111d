"""Dense pointing pre-training that turns a freshly initialised tiny VLM (any family) into a 'pretrained' one.

A tiny transformer trained from scratch does not discover, through attention pooling, which few patches of an
image hold the answer. A dense per-patch objective teaches the vision
tower where things are within a minute. This stage trains the vision tower of a tiny PaliGemma, LLaVA or CogVLM
on procedural tabletop scenes (a seed stream disjoint from every dataset split) to predict, for every patch of the
features its projector reads (`VLMBackbone.vision_patch_features`): which object it shows (segmentation), which
patch holds each kind of keypoint and where (a heatmap, plus each patch's vote for where every keypoint lies
relative to it). Optionally a small CNN learns the same targets first (in minutes, where the tower needs much
longer) and the tower also learns to reproduce its per-patch features (and, with `distill_subcells`, those of each
patch's sub-cells: what lies where inside a patch). The temporary heads are discarded; the checkpoint keeps the
family's exact layout. The stage is an MLflow run of its own, so the "pretrained" checkpoint is as traceable as
any fine-tuning run.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from affordvla.backbones.base import IGNORE_INDEX
from affordvla.backbones.factory import FAMILIES
from affordvla.formats.codecs import make_codec
from affordvla.formats.kalie_tasks import TASKS
from affordvla.offline.tabletop import Scene, make_scenes
from affordvla.optim import warmup_cosine
from affordvla.tracking.mlflow_setup import ensure_experiment

log = logging.getLogger(__name__)
PRETRAIN_SEED = 10_007  # scene stream of the pre-training corpus; dataset splits use other streams
OBJECT_NAMES = sorted({name for task in TASKS.values() for name in task.objects})
TASK_NAMES = sorted(TASKS)
# Each family's answer format for points, as its anchor project writes them (and the text stage trains).
NATIVE_CODECS = {"paligemma": "paligemma_loc", "llava": "robopoint", "cogvlm": "kalie_json"}
# Checkpoints this stage built with long recipes (half an hour of CPU), shipped with the package. A build whose
# directory name (which records the recipe) matches one of them copies it instead of training.
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "assets" / "checkpoints"
RECORD_FILE = "pointing_pretraining.json"  # the recipe and figures of the stage, written into the checkpoint


def shipped_checkpoint(name: str) -> Path | None:
    path = SHIPPED_DIR / name
    return path if (path / "config.json").is_file() else None


@dataclass
class DenseTargets:
    """The dense pointing targets of a batch of scenes, per patch; indexing takes rows of every field."""

    patch_index: torch.Tensor  # (N, K) patch holding each keypoint
    votes: torch.Tensor  # (N, P, K, 2) displacement from each patch centre to each keypoint (normalised units)
    vote_weight: torch.Tensor  # (N, P, K) how much each patch's vote counts: patches near the keypoint
    segmentation: torch.Tensor  # (N, P) object class per patch (0 = table or clutter)
    task: torch.Tensor  # (N,) index into TASK_NAMES: which keypoint set the scene's points belong to

    def __getitem__(self, rows) -> DenseTargets:
        return DenseTargets(self.patch_index[rows], self.votes[rows], self.vote_weight[rows], self.segmentation[rows],
                            self.task[rows])


def patch_centres(grid: int) -> torch.Tensor:
    """(P, 2) normalised (x, y) centre of every patch, row-major like SigLIP's patch order."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return (torch.stack([xs.reshape(-1), ys.reshape(-1)], -1).float() + 0.5) / grid


def dense_targets(scenes: list[Scene], grid: int, vote_radius: float = 0.2) -> DenseTargets:
    keypoints = torch.tensor(np.stack([s.keypoints for s in scenes])).float()
    cell = (keypoints * grid).clamp(0, grid - 1e-4)
    index = cell[..., 1].long() * grid + cell[..., 0].long()
    votes = keypoints[:, None, :, :] - patch_centres(grid)[None, :, None, :]
    vote_weight = torch.exp(-(votes**2).sum(-1) / (2 * vote_radius**2))
    segmentation = torch.zeros(len(scenes), grid * grid, dtype=torch.long)
    for row, scene in enumerate(scenes):
        for name, mask in scene.masks.items():
            centres = ((np.arange(grid) + 0.5) * mask.shape[0] / grid).astype(int)
            hit = torch.from_numpy(mask[np.ix_(centres, centres)].reshape(-1))
            segmentation[row][hit] = OBJECT_NAMES.index(name) + 1
    task = torch.tensor([TASK_NAMES.index(s.task) for s in scenes])
    return DenseTargets(index, votes, vote_weight, segmentation, task)


class DensePointingHead(nn.Module):
    """Per patch: a heatmap logit per keypoint, a vote (displacement to each keypoint) and an object class.

    Votes are local evidence: a patch on the USB stick sees the stick's end and direction, so it can say where the
    free-space target point lies relative to itself, which a 'which patch holds the point' heatmap alone cannot
    teach a patch of empty table. A keypoint is read out as the heatmap-weighted mean of the voted positions.

    With `num_tasks` > 1 every task has its own heatmaps and votes, chosen by the scene's task: "Target Point"
    is the trash in one task and the bowl in another, and the fine-tuned VLM is told the task in its prompt. The
    tower then need not also classify the scene, and points markedly better for it.
    """

    centres: torch.Tensor  # a registered buffer: (P, 2) patch centres

    def __init__(self, hidden: int, num_points: int, grid: int, num_tasks: int = 1):
        super().__init__()
        self.num_points, self.num_tasks = num_points, num_tasks
        self.proj = nn.Linear(hidden, num_tasks * num_points * 3 + len(OBJECT_NAMES) + 1)
        self.register_buffer("centres", patch_centres(grid), persistent=False)

    def forward(self, tokens: torch.Tensor, task: torch.Tensor):
        out = self.proj(tokens)  # (B, P, ...)
        batch, patches = tokens.shape[:2]
        k, split = self.num_points, self.num_tasks * self.num_points * 3
        per_task = out[..., :split].reshape(batch, patches, self.num_tasks, 3 * k)
        points = per_task[torch.arange(batch), :, task if self.num_tasks > 1 else torch.zeros_like(task)]
        heat = points[..., :k].transpose(1, 2)  # (B, K, P)
        votes = points[..., k:].reshape(batch, patches, k, 2)
        return heat, votes, out[..., split:]

    def losses(self, tokens: torch.Tensor, targets: DenseTargets) -> dict[str, torch.Tensor]:
        heat, votes, segmentation = self(tokens, targets.task)
        vote_error = (votes - targets.votes).abs().sum(-1)
        return {
            "heatmap": F.cross_entropy(heat.flatten(0, 1), targets.patch_index.flatten()),
            "vote": (vote_error * targets.vote_weight).sum() / targets.vote_weight.sum(),
            "segmentation": F.cross_entropy(segmentation.flatten(0, 1), targets.segmentation.flatten()),
        }

    @torch.no_grad()
    def predict(self, tokens: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        heat, votes, _ = self(tokens, task)
        weights = heat.softmax(-1)  # (B, K, P)
        voted = self.centres[None, :, None, :] + votes  # (B, P, K, 2)
        return torch.einsum("bkp,bpkc->bkc", weights, voted)


class ConvPointingTeacher(nn.Module):
    """A small CNN (four stages of two 3x3 convolutions with BatchNorm, each halving the image until the tower's
    patch grid is reached: four times at 128 px, patch 16) giving one feature vector per cell of that grid, trained
    first with the same dense head and targets as the tower.

    Convolutions learn this dense localisation far faster than the tiny ViT: in a fraction of the tower's steps
    they point more accurately than the tower ever does on its own. The tower is then
    also trained to reproduce the teacher's per-cell features through a linear adapter (feature distillation);
    teacher and adapter are discarded, the checkpoint keeps the family's exact layout."""

    def __init__(self, grid: int, image_size: int, width: int = 128, channels: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        stages, previous, size = [], 3, image_size
        for out in (*channels, width):
            stride = 2 if size // 2 >= grid else 1  # halve down to the grid (128 px -> 8 cells: four times)
            size = -(-size // stride)
            stages.append(nn.Sequential(
                nn.Conv2d(previous, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(),
                nn.Conv2d(out, out, 3, 1, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU()))
            previous = out
        self.body, self.grid, self.width = nn.Sequential(*stages), grid, width

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, grid * grid, width), row-major like the tower
        return F.adaptive_avg_pool2d(self.body(pixels), self.grid).flatten(2).transpose(1, 2)

    def subcell_features(self, pixels: torch.Tensor, subcells: int) -> torch.Tensor:
        """(B, grid * grid, C * subcells**2): for every cell, the feature map of its `subcells` x `subcells`
        sub-cells (channel-major), read from the last stage at least that fine (128 px, grid 8, 2 sub-cells: the
        third stage's 16x16 map). Row-major cells like `forward`."""
        fine, finest, out = self.grid * subcells, None, pixels
        for stage in self.body:
            out = stage(out)
            if out.shape[-1] >= fine:
                finest = out
        if finest is None:
            raise ValueError(f"no stage of the teacher is {fine} cells wide ({subcells} sub-cells per cell of "
                             f"{self.grid}); the image is too small for that")
        maps = F.adaptive_avg_pool2d(finest, fine)
        batch, width, g, s = maps.shape[0], maps.shape[1], self.grid, subcells
        return maps.reshape(batch, width, g, s, g, s).permute(0, 2, 4, 1, 3, 5).reshape(batch, g * g, width * s * s)


class FeatureDistillation(nn.Module):
    """`weight` x the mean squared error between a linear map of the tower's patch features and the teacher's
    features of the same scenes (computed once for the whole corpus, standardised so every channel counts), summed
    over the teacher's feature sets: per cell, and optionally each cell's sub-cells.

    The sub-cells carry what lies where inside a patch. A USB stick 6 to 10 px long sits inside one 16 px patch;
    matching the per-cell features alone left the tower missing it on scenes where the teacher never does, and
    adding the 2x2 sub-cells lowers the tower's dense error clearly."""

    def __init__(self, teacher_features: list[torch.Tensor], width: int, weight: float):
        super().__init__()
        self.targets = [(f - f.mean((0, 1))) / (f.std((0, 1)) + 1e-3) for f in teacher_features]
        self.adapters = nn.ModuleList(nn.Linear(width, f.shape[-1]) for f in teacher_features)
        self.weight = weight

    def forward(self, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # a sum over at least one feature set: a tensor
        return cast(torch.Tensor, self.weight * sum(F.mse_loss(adapter(tokens), targets[rows])
                                                    for adapter, targets in zip(self.adapters, self.targets)))


def _pixels(backbone, scenes: list[Scene], chunk: int = 512) -> torch.Tensor:
    """The scenes through the backbone's own image processor (as fine-tuning will see them)."""
    return torch.cat([backbone.preprocess_images([s.image for s in scenes[i : i + chunk]])
                      for i in range(0, len(scenes), chunk)])


def object_centres(scene: Scene) -> dict[str, np.ndarray]:
    """Normalised (x, y) centroid of every object mask of a scene."""
    centres = {}
    for name, mask in scene.masks.items():
        rows, cols = np.nonzero(mask)
        if len(rows):
            centres[name] = np.array([(cols.mean() + 0.5) / mask.shape[1], (rows.mean() + 0.5) / mask.shape[0]])
    return centres


def _text_pointing_stage(backbone, train: list[Scene], held_out: list[Scene], pixels: torch.Tensor,
                         eval_pixels: torch.Tensor, *, steps: int, batch_size: int, lr: float, tower_lr: float,
                         seed: int) -> tuple[list[dict], float]:
    """Teach the whole VLM to answer 'point to the <object>' with the object's centre, in the family's own answer
    format (PaliGemma `<locY><locX>`, LLaVA/RoboPoint `[(x, y)]`, CogVLM/KALIE JSON).

    This is the generic referring/pointing skill a real VLM brings from pre-training; the KALIE keypoints
    themselves (task-specific contact points and waypoints) are left for fine-tuning."""
    codec = make_codec(NATIVE_CODECS[backbone.family], point_names=("point",))
    if hasattr(backbone, "prefix_lm"):
        backbone.prefix_lm = False  # causal, as the tiny PaliGemma is fine-tuned (paligemma_tiny.yaml)
    rng = np.random.default_rng(seed)

    def queries(scenes: list[Scene]) -> list[tuple[str, np.ndarray]]:
        out = []
        for scene in scenes:
            centres = object_centres(scene)
            name = sorted(centres)[rng.integers(len(centres))]
            out.append((f"point to the {name}", centres[name]))
        return out

    parts = backbone.parameter_parts()
    optimizer = torch.optim.AdamW([{"params": parts["projector"] + parts["language_model"], "lr": lr},
                                   {"params": parts["vision_tower"], "lr": tower_lr}], weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps, warmup_steps=max(1, steps // 20), cosine_from_start=True)
    history = []
    backbone.train()
    for step in tqdm(range(steps), desc="text pointing pre-training", unit="step"):
        rows = rng.integers(0, len(train), batch_size)
        asked = queries([train[r] for r in rows])
        inputs = backbone.build_inputs([q for q, _ in asked], [codec.encode(c[None]) for _, c in asked])
        output = backbone.forward(pixels[torch.from_numpy(rows)], inputs)
        logits, labels = output.logits[:, :-1], inputs["labels"][:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            history.append({"step": step, "text_loss": loss.item()})
    backbone.eval()
    asked = queries(held_out)
    budget = len(backbone.tokenizer(codec.encode(asked[0][1][None]), add_special_tokens=False)["input_ids"]) + 4
    answers = backbone.generate(eval_pixels, [q for q, _ in asked], max_new_tokens=budget)
    errors = []
    for answer, (_, centre) in zip(answers, asked):
        decoded = codec.try_decode(answer)
        errors.append(math.sqrt(2) if decoded is None else float(np.linalg.norm(decoded[0] - centre)))
    return history, float(np.mean(errors))


def _train_dense(module: nn.Module, encode, params: list[nn.Parameter], head: DensePointingHead, *, steps: int,
                 name: str, pixels: torch.Tensor, targets: DenseTargets, eval_pixels: torch.Tensor,
                 eval_truth: np.ndarray, eval_task: torch.Tensor, batch_size: int, lr: float, seed: int,
                 eval_every: int, extra_loss: nn.Module | None = None) -> tuple[list[dict], float]:
    """Train `params` of `module` (whose `encode` maps pixels to per-patch features) and `head` on the dense targets;
    returns the loss history and the final held-out keypoint error, leaving `module` in eval mode.
    `extra_loss(features, rows)` is added to the loss and trained with it."""
    params = params + list(head.parameters()) + (list(extra_loss.parameters()) if extra_loss is not None else [])
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps, warmup_steps=max(1, steps // 40), cosine_from_start=True)
    generator = torch.Generator().manual_seed(seed)
    history = []

    def held_out_error() -> float:
        module.eval()
        with torch.no_grad():
            features = torch.cat([encode(eval_pixels[i : i + 256]) for i in range(0, len(eval_pixels), 256)])
            predicted = head.predict(features, eval_task).numpy()
        module.train()
        return float(np.linalg.norm(predicted - eval_truth, axis=-1).mean())

    module.train()
    for step in tqdm(range(steps), desc=f"{name} pointing pre-training", unit="step"):
        rows = torch.randint(0, len(pixels), (batch_size,), generator=generator)
        features = encode(pixels[rows])
        losses = head.losses(features, targets[rows])
        loss = losses["heatmap"] + 10.0 * losses["vote"] + losses["segmentation"]
        if extra_loss is not None:
            losses["distillation"] = extra_loss(features, rows)
            loss = loss + losses["distillation"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            history.append({"step": step, **{k: v.item() for k, v in losses.items()}})
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            history.append({"step": step, "held_out_keypoint_error": held_out_error()})
            log.info("%s pointing pre-training: held-out keypoint error %.4f at step %d", name,
                     history[-1]["held_out_keypoint_error"], step + 1)
    error = held_out_error()
    module.eval()
    return history, error


def tiny_writer(family: str):
    """The family's offline tiny checkpoint writer (imported on use: each pulls in its own model classes)."""
    if family == "paligemma":
        from affordvla.offline.tiny_paligemma import write_tiny_paligemma as writer
    elif family == "llava":
        from affordvla.offline.tiny_llava import write_tiny_llava as writer
    elif family == "cogvlm":
        from affordvla.offline.tiny_cogvlm import write_tiny_cogvlm as writer
    else:
        raise ValueError(f"no tiny {family!r} checkpoint; valid families: {sorted(NATIVE_CODECS)}")
    return writer


def build_pointing_backbone(
    out_dir: str | Path,
    *,
    family: str = "paligemma",
    steps: int = 1500,
    corpus_size: int = 4000,
    eval_size: int = 200,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    scene_size: int = 128,
    tracking_uri: str | None = None,
    eval_every: int = 0,
    text_steps: int = 0,
    text_lr: float = 1e-3,
    text_tower_lr: float = 2e-4,
    task_conditioned: bool = True,
    teacher_steps: int = 0,
    distill_weight: float = 10.0,
    distill_subcells: int = 1,
    use_shipped: bool = True,
    **tiny_config,
) -> Path:
    """Write a tiny `family` checkpoint to `out_dir` after `steps` of dense pointing pre-training of its vision
    tower, then `text_steps` of 'point to the <object>' training of the language model. With `teacher_steps`, a
    `ConvPointingTeacher` is trained first and the tower also learns to reproduce its features (`distill_weight`),
    with `distill_subcells` > 1 also those of each cell's sub-cells.
    `tiny_config` goes to the family's writer (image and patch size, widths, layers, ...). With `use_shipped`, a
    shipped checkpoint of the same name built with exactly these settings is copied instead."""
    out_dir = Path(out_dir)
    recipe = {"family": family, "steps": steps, "corpus_size": corpus_size, "eval_size": eval_size,
              "scene_size": scene_size, "batch_size": batch_size, "lr": lr, "seed": seed, "text_steps": text_steps,
              "text_lr": text_lr, "text_tower_lr": text_tower_lr, "task_conditioned": task_conditioned, **tiny_config}
    if teacher_steps > 0:  # recorded only when used, so records written before the teacher existed still match
        recipe.update(teacher_steps=teacher_steps, distill_weight=distill_weight)
        if distill_subcells > 1:  # likewise: records of per-cell distillation alone still match
            recipe.update(distill_subcells=distill_subcells)
    shipped = shipped_checkpoint(out_dir.name) if use_shipped else None
    record = json.loads((shipped / RECORD_FILE).read_text()) if shipped else None
    if shipped and record and record["params"] != recipe:  # the name records only part of the recipe
        log.info("the shipped checkpoint %s was built with another recipe; training this one", shipped.name)
    elif shipped and record:
        log.info("copying the shipped pre-trained checkpoint %s (built in %.0f s; held-out dense error %.4f, "
                 "pointing error %.4f); rebuild it with: %s", shipped.name, record["seconds"], record["dense_error"],
                 record["text_error"] if record["text_error"] is not None else float("nan"), record["command"])
        shutil.copytree(shipped, out_dir, dirs_exist_ok=True)
        return out_dir
    staging = out_dir.with_name(out_dir.name + ".building")
    tiny_writer(family)(staging, seed=seed, **tiny_config)
    backbone = FAMILIES[family].from_pretrained(staging)

    torch.manual_seed(seed)  # the teacher's initialisation
    corpus = list(tqdm(make_scenes(PRETRAIN_SEED + seed, corpus_size + eval_size, scene_size),
                       total=corpus_size + eval_size, desc="pre-training scenes", unit="scene"))
    train, held_out = corpus[:corpus_size], corpus[corpus_size:]
    pixels, eval_pixels = _pixels(backbone, train), _pixels(backbone, held_out)
    with torch.no_grad():
        patches, width = backbone.vision_patch_features(pixels[:1]).shape[1:]
    grid = math.isqrt(patches)
    targets = dense_targets(train, grid)
    eval_truth = np.stack([s.keypoints for s in held_out])
    eval_task = torch.tensor([TASK_NAMES.index(s.task) for s in held_out])
    num_tasks = len(TASK_NAMES) if task_conditioned else 1
    started = time.perf_counter()
    stage: dict[str, Any] = {"pixels": pixels, "targets": targets, "eval_pixels": eval_pixels, "eval_truth": eval_truth,
             "eval_task": eval_task, "batch_size": batch_size, "lr": lr, "seed": seed, "eval_every": eval_every}
    history, distillation, teacher_error = [], None, None
    if teacher_steps > 0:
        teacher = ConvPointingTeacher(grid, pixels.shape[-1])
        teacher_head = DensePointingHead(teacher.width, eval_truth.shape[1], grid, num_tasks=num_tasks)
        teacher_history, teacher_error = _train_dense(teacher, teacher, list(teacher.parameters()), teacher_head,
                                                      steps=teacher_steps, name="teacher", **stage)
        history += [{f"teacher_{key}" if key != "step" else key: value for key, value in row.items()}
                    for row in teacher_history]
        log.info("teacher pointing pre-training: held-out keypoint error %.4f after %d steps", teacher_error,
                 teacher_steps)
        with torch.no_grad():
            taught = [torch.cat([teacher(pixels[i : i + 512]) for i in range(0, len(pixels), 512)])]
            if distill_subcells > 1:
                taught.append(torch.cat([teacher.subcell_features(pixels[i : i + 512], distill_subcells)
                                         for i in range(0, len(pixels), 512)]))
        distillation = FeatureDistillation(taught, width, distill_weight)
    head = DensePointingHead(width, eval_truth.shape[1], grid, num_tasks=num_tasks)
    tower = backbone.parameter_parts()["vision_tower"]
    tower_history, dense_error = _train_dense(backbone, backbone.vision_patch_features, tower, head, steps=steps,
                                              name="dense", extra_loss=distillation, **stage)
    history += [{**row, "step": teacher_steps + row["step"]} for row in tower_history]
    seconds = time.perf_counter() - started
    log.info("dense pointing pre-training: held-out keypoint error %.4f after %d steps (%.0f s)",
             dense_error, steps, seconds)
    text_error = None
    if text_steps > 0:
        text_history, text_error = _text_pointing_stage(
            backbone, train, held_out, pixels, eval_pixels, steps=text_steps, batch_size=batch_size, lr=text_lr,
            tower_lr=text_tower_lr, seed=seed)
        history += [{**row, "step": teacher_steps + steps + row["step"]} for row in text_history]
        seconds = time.perf_counter() - started
        log.info("text pointing pre-training: held-out object-centre error %.4f after %d steps (%.0f s total)",
                 text_error, text_steps, seconds)

    backbone.model.save_pretrained(staging)  # the writer already saved the tokenizer and processor files
    record = {"params": recipe, "dense_error": dense_error, "text_error": text_error, "teacher_error": teacher_error,
              "seconds": seconds, "command": rebuild_command(out_dir.name, recipe), "torch": torch.__version__}
    (staging / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    if tracking_uri:
        _record_run(tracking_uri, out_dir, history, record)
    return out_dir


def rebuild_command(name: str, params: dict) -> str:
    """The CLI line that builds a checkpoint with these settings (for the record shipped inside it)."""
    def literal(value) -> str:  # as YAML reads it back: 1e-05 needs a dot to be a float there
        text = repr(value)
        return text.replace("e", ".0e", 1) if isinstance(value, float) and "e" in text and "." not in text else text

    flags = {"family", "steps", "corpus_size", "text_steps", "seed", "text_tower_lr"}
    tiny = " ".join(f"--tiny {key}={literal(value)}" for key, value in params.items() if key not in flags)
    return (f"python -m affordvla.pretraining.pointing {name} --family {params['family']} --steps {params['steps']} "
            f"--corpus-size {params['corpus_size']} --text-steps {params['text_steps']} "
            f"--text-tower-lr {params['text_tower_lr']} --seed {params['seed']} {tiny}").strip()


def _record_run(tracking_uri: str, out_dir: Path, history: list[dict], record: dict) -> None:
    """The stage as an MLflow run: `record` (what the checkpoint's RECORD_FILE holds) and the loss history."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(client, "affordvla-pretrain")
    family = record["params"]["family"]
    run = client.create_run(experiment_id, run_name=f"tiny-{family}-pointing-{out_dir.name}",
                            tags={"backbone": f"{family}_tiny", "stage": "dense_pointing_pretraining",
                                  "checkpoint": str(out_dir)})
    for key, value in record["params"].items():
        client.log_param(run.info.run_id, key, value)
    for row in history:  # losses of every stage (the teacher's prefixed teacher_), held-out errors along the way
        for key, value in row.items():
            if key != "step":
                client.log_metric(run.info.run_id, f"pretrain/{key}", value, step=row["step"])
    for key, metric in (("dense_error", "held_out_keypoint_error"), ("text_error", "held_out_pointing_error"),
                        ("teacher_error", "teacher_held_out_keypoint_error"), ("seconds", "seconds")):
        if record[key] is not None:  # the text and teacher stages are optional
            client.log_metric(run.info.run_id, f"pretrain/{metric}", record[key])
    client.log_artifact(run.info.run_id, str(out_dir / "config.json"), "checkpoint")
    client.set_terminated(run.info.run_id)


def main(argv: list[str] | None = None) -> None:
    """`python -m affordvla.pretraining.pointing OUT [--family F --steps N ...]`: (re)build a pre-trained tiny
    checkpoint directory of one family, e.g. a longer pre-training than `make train` runs. It always trains, even
    where a shipped checkpoint has the same name: this is how the shipped ones are regenerated."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", help="checkpoint directory to write")
    parser.add_argument("--family", default="paligemma", choices=sorted(NATIVE_CODECS))
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--corpus-size", type=int, default=20000)
    parser.add_argument("--text-steps", type=int, default=0)
    parser.add_argument("--text-tower-lr", type=float, default=2e-4,
                        help="vision tower learning rate in the text stage (0: it stays as the dense stage left it)")
    parser.add_argument("--eval-every", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow URI to record the pre-training run in")
    parser.add_argument("--tiny", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting of the family's tiny writer or of the stage, as the backbone config's "
                             "build gives it (e.g. --tiny kv_heads=4 for paligemma_tiny.yaml's decoder); repeatable")
    args = parser.parse_args(argv)
    import yaml

    tiny_config = {}
    for item in args.tiny:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--tiny expects KEY=VALUE, got {item!r}")
        tiny_config[key] = yaml.safe_load(value)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    build_pointing_backbone(args.out, family=args.family, steps=args.steps, corpus_size=args.corpus_size,
                            text_steps=args.text_steps, text_tower_lr=args.text_tower_lr,
                            eval_every=args.eval_every, seed=args.seed, use_shipped=False,
                            tracking_uri=args.tracking_uri, **tiny_config)


if __name__ == "__main__":
    main()
