"""The VLA formulation of RoboVLMs as one LightningModule over episode
windows (`ActionWindowSample` batches from `ActionWindowDataModule`).

Continuous heads (MLP / LSTM / GPT, heads/policy_heads.py) read learnable action token(s) appended after each
frame's prompt:
- `policy_head`: every frame of the window is its own sequence `[image][prompt][LRN x latent]` (batch B*T); the
  head fuses the T action-token features over time;
- `interleaved`: the T blocks are concatenated into one causal sequence, the language model itself carries the
  history, and the head reads each block's action token.
Language heads (discrete action tokens, LLARVA text actions; heads/language_actions.py) are one-step: each
frame is an (image, prompt, answer) sample.

Shapes come from the dataset metadata (action dimension, window, chunk, cameras, statistics) when the
datamodule is attached, and travel with the checkpoint and the export, so a policy can act without its data.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from affordvla.backbones.base import VLMBackbone
from affordvla.heads.action_normalization import ActionNormalizer
from affordvla.heads.language_actions import LanguageActionHead
from affordvla.heads.policy_heads import PolicyHead, policy_loss
from affordvla.metrics.actions import action_metrics

log = logging.getLogger(__name__)
FORMULATIONS = ("policy_head", "interleaved")
POLICY_WEIGHTS, POLICY_CONFIG = "policy_head.safetensors", "policy.json"


class ActionPolicyModule(L.LightningModule):
    sample_kind = "action_window"

    def __init__(self, backbone: VLMBackbone, head: Callable[..., PolicyHead] | LanguageActionHead,
                 optimizer: Callable[..., torch.optim.Optimizer], scheduler: Callable[..., Any] | None = None,
                 part_lr: dict[str, float] | None = None, freeze: list[str] | None = None,
                 formulation: str = "policy_head", latent_tokens: int = 1, camera: str | None = None,
                 normalization: dict | None = None, gripper_loss_weight: float = 0.01, head_lr: float | None = None):
        super().__init__()
        if formulation not in FORMULATIONS:
            raise ValueError(f"unknown formulation {formulation!r}; valid: {list(FORMULATIONS)}")
        self.backbone = backbone
        self.is_language_head = isinstance(head, LanguageActionHead)
        self.head_factory = None if self.is_language_head else head
        self.language_head = head if self.is_language_head else None
        self.policy_head: PolicyHead | None = None
        self.action_token: nn.Parameter | None = None
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.part_lr, self.head_lr = dict(part_lr or {}), head_lr
        if freeze:
            backbone.freeze(list(freeze))
        self.formulation, self.latent_tokens, self.camera = formulation, latent_tokens, camera
        self.normalization = dict(normalization or {"mode": "clip", "clip_bound": 0.65})
        self.gripper_loss_weight = gripper_loss_weight
        self.normalizer: ActionNormalizer | None = None
        self.dataset_metadata: dict[str, Any] = {}
        self.last_metrics: dict[str, dict[str, float]] = {}
        self.last_predictions: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._eval: dict[str, list] = {}

    # --- construction from dataset metadata ---------------------------------------------------------------
    def configure_from_metadata(self, metadata: dict[str, Any]) -> None:
        """Size the head, the normaliser and the camera from what the dataset says (once)."""
        if self.normalizer is not None:
            return
        self.dataset_metadata = metadata
        self.normalizer = ActionNormalizer.from_metadata(metadata, **self.normalization)
        cameras = list(metadata.get("cameras") or {})
        if self.camera is None:
            if not cameras:
                raise ValueError("the dataset metadata names no camera; set module.camera")
            self.camera = cameras[0]
        elif cameras and self.camera not in cameras:
            raise ValueError(f"camera {self.camera!r} is not in the dataset; it has {cameras}")
        chunk, window = int(metadata["chunk_size"]), int(metadata["window_size"])
        if self.is_language_head:
            self.language_head.bind(self.backbone, self.normalizer, chunk)
            return
        hidden = self.backbone.hidden_size
        self.policy_head = self.head_factory(in_features=hidden, action_dim=self.normalizer.action_dim,
                                             chunk_size=chunk, window_size=window)
        device = self.backbone.model.device
        self.policy_head.to(device)
        # RoboVLMs starts the learnable action token at zero
        self.action_token = nn.Parameter(torch.zeros(self.latent_tokens, hidden, device=device))

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            datamodule.setup(stage)
            self.configure_from_metadata(datamodule.metadata())

    def on_fit_start(self) -> None:
        self.backbone.train()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["dataset_metadata"] = json.loads(json.dumps(self.dataset_metadata))
        checkpoint["action_normalizer"] = self.normalizer.to_dict()

    # --- inputs -------------------------------------------------------------------------------------------
    def pixel_values(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 frames -> the backbone's pixel tensor."""
        frames = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        return self.backbone.preprocess_images(list(frames)).to(self.backbone.model.device)

    def _prompt(self, instruction: str, states: np.ndarray | None = None) -> str:
        if self.is_language_head:
            return self.language_head.prompt(instruction, states)
        return f"What action should the robot take to {instruction.rstrip('. ')}?"

    # --- continuous heads ---------------------------------------------------------------------------------
    def action_features(self, pixel_values: torch.Tensor, prompts: list[str], batch: int, window: int
                        ) -> torch.Tensor:
        """Hidden states at the action tokens, (batch, window, latent, hidden); frames ordered batch-major."""
        latent = self.latent_tokens
        inputs = self.backbone.append_positions(self.backbone.build_inputs(prompts), latent)
        inputs = {k: v.to(pixel_values.device) for k, v in inputs.items()}
        embeds = self.backbone.embed_inputs(pixel_values, inputs)
        token = self.action_token.to(embeds.dtype).expand(len(prompts), latent, -1)
        embeds = torch.cat([embeds[:, :-latent], token], dim=1)
        length = embeds.shape[1]
        if self.formulation == "interleaved":  # one causal sequence of `window` blocks per sample
            embeds = embeds.reshape(batch, window * length, -1)
            inputs = self._interleave(inputs, batch, window)
        hidden = self.backbone.hidden_states(embeds, inputs)
        hidden = hidden.reshape(batch, window, length, -1)
        return hidden[:, :, -latent:]

    @staticmethod
    def _interleave(inputs: dict[str, torch.Tensor], batch: int, window: int) -> dict[str, torch.Tensor]:
        """Concatenate per-frame rows into per-sample sequences; block k's positions continue after block k-1's
        (identical prompts within a sample make every block equally long)."""
        out = {}
        for key, value in inputs.items():
            blocks = value.reshape(batch, window, -1)
            if key == "position_ids":
                valid = inputs["attention_mask"].reshape(batch, window, -1).bool()
                first = torch.where(valid, blocks, torch.full_like(blocks, 1 << 30)).amin(dim=-1, keepdim=True)
                span = blocks[..., -1:] - first + 1
                blocks = blocks + torch.arange(window, device=value.device)[None, :, None] * span
            out[key] = blocks.reshape(batch, -1)
        return out

    def continuous_outputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["images"][self.camera]
        b, t = images.shape[:2]
        pixel_values = self.pixel_values(images.reshape(b * t, *images.shape[2:]))
        prompts = [self._prompt(instruction) for instruction in batch["instructions"] for _ in range(t)]
        return self.policy_head(self.action_features(pixel_values, prompts, b, t))

    # --- language heads -----------------------------------------------------------------------------------
    def _language_samples(self, batch: dict[str, Any], with_answers: bool):
        """Every valid frame of every window as a one-step sample: (frames, prompts, answers, targets, masks)."""
        images = batch["images"][self.camera]
        actions, action_mask, frame_mask = batch["actions"], batch["action_mask"], batch["frame_mask"]
        states = batch.get("state")
        frames, prompts, answers, rows = [], [], [], []
        head = self.language_head
        for i, instruction in enumerate(batch["instructions"]):
            for t in range(images.shape[1]):
                if not (frame_mask[i, t] and action_mask[i, t, 0]):
                    continue
                history = None if states is None else states[i, : t + 1].numpy()
                frames.append(images[i, t].numpy())
                prompts.append(head.prompt(instruction, history))
                rows.append((i, t))
                if with_answers:
                    trace = (head.trace_from_states(states[i, t + 1 :].numpy())
                             if getattr(head, "visual_trace", False) and states is not None else None)
                    chunk = actions[i, t, : head.steps_predicted].numpy()
                    answers.append(head.target_text(chunk, trace=trace))
        index = torch.tensor(rows, dtype=torch.long).reshape(-1, 2)
        targets = actions[index[:, 0], index[:, 1]]
        masks = action_mask[index[:, 0], index[:, 1]]
        return np.stack(frames), prompts, answers, targets, masks

    def _language_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        frames, prompts, answers, _, _ = self._language_samples(batch, with_answers=True)
        inputs = {k: v.to(self.device) for k, v in self.backbone.build_inputs(prompts, answers).items()}
        labels = inputs["labels"]
        first_answer = int((labels != -100).float().argmax(dim=1).min())
        output = self.backbone(self.pixel_values(frames), inputs, logits_to_keep=labels.shape[1] - first_answer + 1)
        return self.language_head.loss(output.logits, labels)

    # --- training -----------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.is_language_head:
            return self._language_loss(batch)
        arm, gripper = self.continuous_outputs(batch)
        mask = batch["action_mask"] & batch["frame_mask"][..., None]
        return policy_loss(arm, gripper, batch["actions"].to(arm.device), mask.to(arm.device), self.normalizer,
                           self.gripper_loss_weight)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        losses = self.compute_loss(batch)
        size = len(batch["instructions"])
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=size)
        for name in ("arm_loss", "gripper_loss", "gripper_accuracy", "token_accuracy"):
            if name in losses:
                self.log(f"train/{name}", losses[name], batch_size=size)
        return losses["loss"]

    # --- evaluation: the first action of each chunk (the one a rollout executes) --------------------------
    @torch.no_grad()
    def predict_first_actions(self, batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(predicted, target, mask) of every frame's first chunk action, in dataset units."""
        if self.is_language_head:
            frames, prompts, _, targets, masks = self._language_samples(batch, with_answers=False)
            _, predicted = self.language_head.predict(self.backbone, self.pixel_values(frames), prompts)
            return predicted[:, 0], targets[:, 0].numpy(), masks[:, 0].numpy()
        arm, gripper = self.continuous_outputs(batch)
        actions = self.normalizer.denormalize(arm[:, :, 0], gripper[:, :, 0] > 0)
        mask = batch["action_mask"][:, :, 0] & batch["frame_mask"]
        return (actions.reshape(-1, actions.shape[-1]).cpu().numpy(),
                batch["actions"][:, :, 0].reshape(-1, actions.shape[-1]).numpy(), mask.reshape(-1).numpy())

    def _evaluate_batch(self, batch, split: str) -> None:
        losses = self.compute_loss(batch)
        self.log(f"{split}/loss", losses["loss"], batch_size=len(batch["instructions"]), sync_dist=True)
        self._eval[split].append(self.predict_first_actions(batch))

    def _end_eval(self, split: str) -> None:
        predicted, target, mask = (np.concatenate(parts) for parts in zip(*self._eval.pop(split)))
        window = 1 if self.is_language_head else int(self.dataset_metadata["window_size"])
        # each window's first frame, in loader order: consecutive frames of the episodes, for the trace plots
        self.last_predictions[split] = tuple(a.reshape(-1, window, *a.shape[1:])[:, 0] for a in (predicted, target, mask))
        low = self.normalizer.gripper_low
        metrics = action_metrics(predicted, target, mask, gripper_threshold=(low + 1) / 2)
        mean = self.dataset_metadata.get("action_statistics", {}).get("mean")
        if mean is not None:
            baseline = action_metrics(np.broadcast_to(np.asarray(mean), target.shape), target, mask,
                                      gripper_threshold=(low + 1) / 2)
            metrics["mean_baseline_mse"] = baseline["action_mse"]
        if self.is_language_head:
            head = self.language_head
            total = head.n_parsed + head.n_failed
            metrics["parse_failure_rate"] = head.n_failed / total if total else 0.0
            head.reset_counts()
        metrics = {k: float(v) for k, v in metrics.items() if not k.startswith("action_mse_dim")}
        self.last_metrics[split] = metrics
        for name, value in metrics.items():
            self.log(f"{split}/{name}", value, prog_bar=name == "action_mse", sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        self._eval["val"] = []

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate_batch(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_start(self) -> None:
        self._eval["test"] = []

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate_batch(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    # --- optimisation -------------------------------------------------------------------------------------
    def configure_optimizers(self):
        groups = [{"params": params, "name": part, **({"lr": self.part_lr[part]} if part in self.part_lr else {})}
                  for part, params in self.backbone.parameter_parts().items() if params]
        if not self.is_language_head:
            head_params = list(self.policy_head.parameters()) + [self.action_token]
            groups.append({"params": head_params, "name": "policy_head",
                           **({"lr": self.head_lr} if self.head_lr is not None else {})})
        optimizer = self.optimizer_factory(params=groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer, total_steps=self.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- export -------------------------------------------------------------------------------------------
    def export_policy(self, out_dir: str | Path, build: dict[str, Any] | None = None) -> Path:
        """Beside the exported backbone: the head's weights and what is needed to rebuild it (normaliser,
        formulation, window and chunk sizes, camera, dataset metadata). `build` (the resolved head config and the
        backbone's `prefix_lm`, as affordvla-train passes them) makes the export load on its own."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        config = {"formulation": self.formulation, "latent_tokens": self.latent_tokens, "camera": self.camera,
                  "normalizer": self.normalizer.to_dict(), "dataset_metadata": self.dataset_metadata,
                  **(build or {})}
        if not self.is_language_head:
            state = {f"head.{k}": v.detach().contiguous() for k, v in self.policy_head.state_dict().items()}
            state["action_token"] = self.action_token.detach().contiguous()
            save_file(state, str(out_dir / POLICY_WEIGHTS))
        (out_dir / POLICY_CONFIG).write_text(json.dumps(config, indent=2))
        return out_dir

    def load_exported_head(self, export_dir: str | Path) -> None:
        """Restore what `export_policy` wrote into a module built from the same configs."""
        export_dir = Path(export_dir)
        config = json.loads((export_dir / POLICY_CONFIG).read_text())
        self.normalization = {k: v for k, v in config["normalizer"].items() if k in ("mode", "clip_bound")}
        self.camera = config["camera"]
        self.configure_from_metadata(config["dataset_metadata"])
        self.normalizer = ActionNormalizer.from_dict(config["normalizer"])
        if not self.is_language_head:
            state = load_file(str(export_dir / POLICY_WEIGHTS))
            self.action_token.data.copy_(state.pop("action_token"))
            self.policy_head.load_state_dict({k.removeprefix("head."): v for k, v in state.items()}, strict=True)
