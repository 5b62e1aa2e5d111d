"""What every action policy shares, whatever its head: the action normaliser, the camera it reads, pixel values,
evaluation on the first action of each chunk (the one a rollout executes) beside the mean-action baseline, and the
normaliser, camera and dataset metadata in its export.

Shapes come from the dataset metadata (action dimension, window, chunk, cameras, statistics) when the datamodule
is attached, and travel with the checkpoint and the export, so a policy can act without its data.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from affordvla.backbones.base import VLMBackbone
from affordvla.data.action_datamodule import collate_action_windows
from affordvla.heads.action_normalization import ActionNormalizer
from affordvla.metrics.actions import action_metrics
from affordvla.policies.base import ActionPrediction, Observation, PolicyModule

# how many recent proprio states a session keeps for a prompt that quotes them
STATE_HISTORY = 16


def plain_settings(function: Callable[..., Any], given: Mapping[str, Any], skip: tuple[str, ...] = (),
                   attributes: object | None = None, aliases: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A head's constructor arguments as JSON values: its signature's defaults, then what `attributes` (the built
    head) holds under each name (or its alias), then what was `given` explicitly."""
    settings: dict[str, Any] = {}
    for name, parameter in inspect.signature(function).parameters.items():
        if name in skip or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.default is not parameter.empty:
            settings[name] = parameter.default
        held = (aliases or {}).get(name, name)
        if attributes is not None and hasattr(attributes, held):
            settings[name] = getattr(attributes, held)
    settings.update({k: v for k, v in given.items() if k not in skip})
    return {k: _plain(v) for k, v in settings.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


class ActionPolicyModuleBase(PolicyModule):
    """A policy predicting action chunks from episode windows (`ActionWindowSample` batches). Subclasses build the
    head (`build_head`), its loss (`compute_loss`), the first actions of a batch for evaluation, and the step-wise
    inference a session runs (`step`)."""

    normalizer: ActionNormalizer  # set by configure_from_metadata, before any step uses it

    kind = "actions"
    sample_kind = "action_window"

    def __init__(self, backbone: VLMBackbone, optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., Any] | None = None, part_lr: dict[str, float] | None = None,
                 freeze: list[str] | None = None, camera: str | None = None, normalization: dict | None = None,
                 head_lr: float | None = None, callbacks: Mapping[str, L.Callback | None] | None = None):
        super().__init__(backbone, optimizer, scheduler, part_lr, freeze, head_lr, callbacks)
        self.camera = camera
        self.normalization = dict(normalization or {"mode": "clip", "clip_bound": 0.65})
        self.normalizer = None  # type: ignore[assignment]  # sized by configure_from_metadata
        # each split's (predicted, target, mask) first actions of each window's first frame, for the trace callback
        self.last_predictions: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._eval: dict[str, list] = {}

    # --- construction from dataset metadata ---------------------------------------------------------------
    def make_collate(self) -> Callable[[list[Any]], Any]:
        return collate_action_windows

    def configure_from_metadata(self, metadata: dict[str, Any]) -> None:
        """Size the head, the normaliser and the camera from what the dataset says (once)."""
        if self.normalizer is None:
            self.configure(metadata, ActionNormalizer.from_metadata(metadata, **self.normalization))

    def configure(self, metadata: dict[str, Any], normalizer: ActionNormalizer) -> None:
        """Build the head for `metadata` with a given normaliser (an export's recorded one, exactly)."""
        super().configure_from_metadata(metadata)
        self.normalizer = normalizer
        cameras = list(metadata.get("cameras") or {})
        if self.camera is None:
            if not cameras:
                raise ValueError("the dataset metadata names no camera; set module.camera")
            self.camera = cameras[0]
        elif cameras and self.camera not in cameras:
            raise ValueError(f"module.camera {self.camera!r} is not in the dataset; it has {cameras}")
        self.build_head(int(metadata["chunk_size"]), int(metadata["window_size"]))

    @abc.abstractmethod
    def build_head(self, chunk_size: int, window_size: int) -> None:
        """Size the head for the dataset (the normaliser is set)."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["action_normalizer"] = self.normalizer.to_dict()

    @property
    def window_size(self) -> int:
        return int(self.dataset_metadata["window_size"])

    # --- inputs -------------------------------------------------------------------------------------------
    def pixel_values(self, frames: np.ndarray | torch.Tensor | list[np.ndarray]) -> torch.Tensor:
        """(N, H, W, 3) uint8 frames -> the backbone's pixel tensor."""
        if isinstance(frames, torch.Tensor):
            frames = frames.numpy()
        return self.backbone.preprocess_images(list(frames)).to(self.backbone.model.device)

    # --- training -----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def compute_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{"loss", and the parts logged beside it} of a collated batch of windows."""

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        losses = self.compute_loss(batch)
        size = len(batch["instructions"])
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=size)
        for name in ("arm_loss", "gripper_loss", "gripper_accuracy", "token_accuracy"):
            if name in losses:
                self.log(f"train/{name}", losses[name], batch_size=size)
        return losses["loss"]

    # --- evaluation: the first action of each chunk (the one a rollout executes) --------------------------
    @abc.abstractmethod
    def predict_first_actions(self, batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(predicted, target, mask) of every evaluated frame's first chunk action, in dataset units."""

    def frames_per_window(self) -> int:
        """How many rows of `predict_first_actions` one window gives (for the trace plots' first frames)."""
        return self.window_size

    def extra_metrics(self) -> dict[str, float]:
        """Head-specific evaluation figures, collected since the last call."""
        return {}

    def _evaluate_batch(self, batch, split: str) -> None:
        losses = self.compute_loss(batch)
        self.log(f"{split}/loss", losses["loss"], batch_size=len(batch["instructions"]), sync_dist=True)
        self._eval[split].append(self.predict_first_actions(batch))

    def _end_eval(self, split: str) -> None:
        predicted, target, mask = (np.concatenate(parts) for parts in zip(*self._eval.pop(split)))
        window = self.frames_per_window()
        # each window's first frame, in loader order: consecutive frames of the episodes, for the trace plots
        first = [a.reshape(-1, window, *a.shape[1:])[:, 0] for a in (predicted, target, mask)]
        self.last_predictions[split] = (first[0], first[1], first[2])
        threshold = (self.normalizer.gripper_low + 1) / 2
        metrics = action_metrics(predicted, target, mask, gripper_threshold=threshold)
        mean = self.dataset_metadata.get("action_statistics", {}).get("mean")
        if mean is not None:
            baseline = action_metrics(np.broadcast_to(np.asarray(mean), target.shape), target, mask,
                                      gripper_threshold=threshold)
            metrics["mean_baseline_mse"] = baseline["action_mse"]
        metrics.update(self.extra_metrics())
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

    # --- inference ----------------------------------------------------------------------------------------
    def check_ready(self, unnorm_key: str | None = None) -> None:
        """Refuse to act before the head is built, or with an `unnorm_key` the normaliser does not know (checked
        now, not mid-episode)."""
        if self.normalizer is None:
            raise ValueError("the policy has no dataset metadata yet: train it, or load its export (load_policy)")
        if self.normalizer.datasets:
            self.normalizer.unnormalize(torch.zeros(1, self.normalizer.action_dim), unnorm_key)

    def unnormalize(self, actions: torch.Tensor | np.ndarray, unnorm_key: str | None) -> np.ndarray:
        """Actions in the training data's units -> the units of dataset `unnorm_key` (a mixture's member)."""
        return self.normalizer.unnormalize(torch.as_tensor(actions), unnorm_key).cpu().numpy()

    @torch.no_grad()
    def predict_observations(self, observations: Sequence[Observation], unnorm_key: str | None = None
                             ) -> list[ActionPrediction]:
        """Each observation's action chunk (n, D) in dataset units, from its frame alone (a window of one)."""
        self.check_ready(unnorm_key)
        predictions = self.predict_frames(observations)
        for prediction in predictions:
            prediction.actions = self.unnormalize(prediction.actions, unnorm_key)
        return predictions

    @abc.abstractmethod
    def predict_frames(self, observations: Sequence[Observation]) -> list[ActionPrediction]:
        """Batched, stateless chunks in the training data's units."""

    def new_history(self) -> dict[str, Any]:
        """A session's per-episode memory (frames, states, and what a head keeps between steps)."""
        return {"frames": [], "states": []}

    @abc.abstractmethod
    def step(self, observation: Observation, history: dict[str, Any], previous_gripper: float
             ) -> ActionPrediction:
        """This step's chunk in the training data's units, updating `history`; `previous_gripper` is the last
        executed gripper command (a text answer that does not parse keeps it)."""

    def describe(self) -> dict[str, Any]:
        metadata = self.dataset_metadata
        return {"camera": self.camera, "action_dim": None if self.normalizer is None else self.normalizer.action_dim,
                "window_size": metadata.get("window_size"), "chunk_size": metadata.get("chunk_size"),
                "normalization": None if self.normalizer is None else self.normalizer.mode,
                "unnorm_keys": [] if self.normalizer is None else sorted(self.normalizer.datasets)}

    # --- export -------------------------------------------------------------------------------------------
    def head_record(self) -> dict[str, Any]:
        """What every action head records besides its class and settings: the camera and the exact normaliser."""
        return {"camera": self.camera, "normalization": dict(self.normalization),
                "normalizer": self.normalizer.to_dict()}
