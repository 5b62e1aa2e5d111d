"""AffordVLAModule: one LightningModule for backbone + keypoint-text head; KeypointRegressionModule: its sibling
for the regression head (heads/keypoint_regression.py), trained and scored on the same batches and metric keys.

Objects are injected from config: the backbone (built by its factory), the head, the optimiser and scheduler
as partials, and per-part learning rates. The module owns the batch layout (`collate`) because it is the
place where the backbone's processor and the head's codec meet.
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

from affordvla.backbones.base import VLMBackbone
from affordvla.formats.sample import KeypointSample
from affordvla.heads.keypoint_regression import KeypointRegressionHead
from affordvla.heads.keypoint_text import KeypointTextHead
from affordvla.metrics.keypoints import KeypointEvaluator

log = logging.getLogger(__name__)


class KeypointBatchCollator:
    """Samples -> model inputs. Pixel tensors are cached per image (the toy datasets fit in memory, and
    preprocessing is the slowest part of a tiny model's step)."""

    def __init__(self, backbone: VLMBackbone, head: KeypointTextHead, cache_pixels: bool = True):
        self.backbone = backbone
        self.head = head
        self.cache_pixels = cache_pixels
        self._pixels: dict[tuple[str, str, str], torch.Tensor] = {}

    def _pixel_values(self, samples: list[KeypointSample]) -> torch.Tensor:
        if not self.cache_pixels:
            return self.backbone.preprocess_images([s.image for s in samples])
        keys = [(s.meta.get("source"), s.meta.get("entry"), s.meta.get("view", "full")) for s in samples]
        # samples that cannot name their image, and randomly augmented ones, are never cached
        if any(None in key or key[2] == "augmented" for key in keys):
            return self.backbone.preprocess_images([s.image for s in samples])
        missing = [i for i, k in enumerate(keys) if k not in self._pixels]
        if missing:
            fresh = self.backbone.preprocess_images([samples[i].image for i in missing])
            for i, tensor in zip(missing, fresh):
                self._pixels[keys[i]] = tensor
        return torch.stack([self._pixels[k] for k in keys])

    def __call__(self, samples: list[KeypointSample]) -> dict[str, Any]:
        prompts = [self.head.prompt(s) for s in samples]
        answers = [self.head.target_text(s) for s in samples]
        return {
            "pixel_values": self._pixel_values(samples),
            "inputs": self.backbone.build_inputs(prompts, answers),
            "samples": samples,
        }


class AffordVLAModule(L.LightningModule):
    def __init__(
        self,
        backbone: VLMBackbone,
        head: KeypointTextHead,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        part_lr: dict[str, float] | None = None,
        freeze: list[str] | None = None,
        num_overlays: int = 8,
    ):
        super().__init__()
        if isinstance(head, KeypointRegressionHead) and not isinstance(self, KeypointRegressionModule):
            raise TypeError("head=keypoint_regression needs module=keypoint_regression")
        self.backbone = backbone
        self.head = head
        self.head.bind(backbone)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.part_lr = dict(part_lr or {})
        if freeze:
            backbone.freeze(list(freeze))
        self.num_overlays = num_overlays
        self.evaluators: dict[str, KeypointEvaluator] = {}
        self.mean_keypoints: np.ndarray | None = None
        self.last_metrics: dict[str, dict[str, float]] = {}

    # --- data plumbing ------------------------------------------------------------------------------------
    def make_collate(self) -> KeypointBatchCollator:
        return KeypointBatchCollator(self.backbone, self.head)

    def on_fit_start(self) -> None:
        self.backbone.train()  # from_pretrained leaves models in eval mode

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            if datamodule.collate is None:
                datamodule.collate = self.make_collate()
            datamodule.setup(stage)
            self.mean_keypoints = datamodule.train_keypoint_mean()
            if isinstance(self.head, KeypointTextHead):
                self.head.match_point_count(datamodule.points_per_sample)
            self.dataset_metadata = datamodule.metadata()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # what the data looked like (sizes, statistics) travels with the weights, as plain JSON-able values
        checkpoint["dataset_metadata"] = json.loads(json.dumps(getattr(self, "dataset_metadata", {})))

    # --- training -----------------------------------------------------------------------------------------
    def _answer_logits(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["inputs"]["labels"]
        # Answers are right-aligned after a left-padded prefix: only the last columns need LM logits.
        first_answer = int((labels != -100).float().argmax(dim=1).min())
        keep = labels.shape[1] - first_answer + 1
        output = self.backbone(batch["pixel_values"], batch["inputs"], logits_to_keep=keep)
        return output.logits, labels

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        logits, labels = self._answer_logits(batch)
        losses = self.head.loss(logits, labels)
        batch_size = len(batch["samples"])
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=batch_size)
        if self.trainer.global_step % self.trainer.log_every_n_steps == 0:  # logging costs ~2% of a tiny step
            self.log("train/token_accuracy", losses["token_accuracy"], batch_size=batch_size)
        return losses["loss"]

    # --- evaluation ---------------------------------------------------------------------------------------
    def _evaluate_batch(self, batch, split: str) -> None:
        logits, labels = self._answer_logits(batch)
        losses = self.head.loss(logits, labels)
        self.log(f"{split}/loss", losses["loss"], batch_size=len(batch["samples"]), sync_dist=True)
        texts, predictions = self.head.predict(self.backbone, batch["pixel_values"], batch["samples"])
        self.evaluators[split].add(batch["samples"], texts, predictions)

    def _start_eval(self, split: str) -> None:
        codec = getattr(self.head, "codec", None)  # the regression head writes no answer text
        self.evaluators[split] = KeypointEvaluator(self.mean_keypoints,
                                                   kalie_answers=getattr(codec, "name", None) == "kalie_json")

    def _end_eval(self, split: str) -> None:
        metrics = self.evaluators[split].compute()
        self.last_metrics[split] = metrics
        for name, value in metrics.items():
            self.log(f"{split}/{name}", value, prog_bar=name == "keypoint_error", sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        self._start_eval("val")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate_batch(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval("test")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate_batch(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    # --- optimisation -------------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups: one per backbone part (with its `part_lr`); subclasses add their head's."""
        groups = []
        for part, params in self.backbone.parameter_parts().items():
            if params:
                group = {"params": params, "name": part}
                if part in self.part_lr:
                    group["lr"] = self.part_lr[part]
                groups.append(group)
        unknown = sorted(set(self.part_lr) - {g["name"] for g in groups} - set(self.backbone.part_prefixes))
        if unknown:
            raise ValueError(f"part_lr names unknown parts {unknown}; valid: {sorted(self.backbone.part_prefixes)}")
        return groups

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer, total_steps=self.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# ---------------------------------------------------------------------------------------------- regression


class KeypointRegressionCollator(KeypointBatchCollator):
    """Samples -> pixels, prompts and (B, K, 2) targets: the regression head needs no answer tokens."""

    def __call__(self, samples: list[KeypointSample]) -> dict[str, Any]:
        return {"pixel_values": self._pixel_values(samples), "prompts": [self.head.prompt(s) for s in samples],
                "targets": self.head.target(samples), "samples": samples}


REGRESSION_WEIGHTS, REGRESSION_CONFIG = "keypoint_head.safetensors", "keypoint_head.json"


class KeypointRegressionModule(AffordVLAModule):
    """Backbone + KeypointRegressionHead on the keypoint datamodules. Validation and test go through the same
    KeypointEvaluator as the text head, so keypoint_error, kalie_corrected/avg_mse etc. are directly comparable."""

    def __init__(self, backbone: VLMBackbone, head: KeypointRegressionHead, optimizer, scheduler=None,
                 part_lr: dict[str, float] | None = None, freeze: list[str] | None = None, num_overlays: int = 8,
                 head_lr: float | None = None):
        if not isinstance(head, KeypointRegressionHead):
            raise TypeError(f"module=keypoint_regression needs head=keypoint_regression, got {type(head).__name__}")
        super().__init__(backbone, head, optimizer, scheduler, part_lr, freeze, num_overlays)
        self.head_lr = head_lr

    def make_collate(self) -> KeypointRegressionCollator:
        return KeypointRegressionCollator(self.backbone, self.head)

    def _predict_batch(self, batch) -> torch.Tensor:
        pixel_values = batch["pixel_values"].to(self.device)
        return self.head(self.backbone, pixel_values, batch["prompts"])

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        losses = self.head.loss(self._predict_batch(batch), batch["targets"])
        batch_size = len(batch["samples"])
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=batch_size)
        self.log("train/keypoint_error", losses["keypoint_error"], batch_size=batch_size)
        return losses["loss"]

    def _evaluate_batch(self, batch, split: str) -> None:
        predicted = self._predict_batch(batch)
        losses = self.head.loss(predicted, batch["targets"])
        self.log(f"{split}/loss", losses["loss"], batch_size=len(batch["samples"]), sync_dist=True)
        points = predicted.detach().float().cpu().numpy()  # one forward serves the loss and the prediction
        self.evaluators[split].add(batch["samples"], self.head.as_text(points), list(points))

    def parameter_groups(self) -> list[dict[str, Any]]:
        group = {"params": list(self.head.parameters()), "name": "keypoint_head"}
        if self.head_lr is not None:
            group["lr"] = self.head_lr
        return [*super().parameter_groups(), group]

    # --- export: the head beside the exported backbone --------------------------------------------------------
    def export_policy(self, out_dir: str | Path) -> Path:
        """Write the head's weights (safetensors) and settings beside the exported backbone (`affordvla-train`
        calls this after `export_backbone`)."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
        save_file(state, str(out_dir / REGRESSION_WEIGHTS))
        settings = {"num_points": self.head.num_points, "mlp_hidden_size": self.head.mlp_hidden_size,
                    "loss": self.head.loss_name, "prompt_style": self.head.prompt_style}
        (out_dir / REGRESSION_CONFIG).write_text(json.dumps(settings, indent=2))
        return out_dir

    def load_exported_head(self, export_dir: str | Path) -> None:
        """Restore what `export_policy` wrote into a module built from the same configs (strict: every tensor)."""
        from safetensors.torch import load_file

        export_dir = Path(export_dir)
        weights = export_dir / REGRESSION_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} does not exist: {export_dir} holds no exported regression head")
        settings = json.loads((export_dir / REGRESSION_CONFIG).read_text())
        mine = {"num_points": self.head.num_points, "mlp_hidden_size": self.head.mlp_hidden_size}
        if any(settings[k] != v for k, v in mine.items()):
            raise ValueError(f"{export_dir / REGRESSION_CONFIG}: head {settings} does not match this module's {mine}")
        self.head.load_state_dict(load_file(str(weights)), strict=True)
