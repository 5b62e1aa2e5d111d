"""Keypoints by regression instead of text (KALIE's "text coordinate output vs a regression head" ablation).

A learnable readout token is appended after each prompt, at the position an answer would start; the language
model's final hidden state there goes through an MLP to 2K numbers, squashed by a sigmoid into normalised (x, y)
image coordinates. The loss (L1 or MSE) is in those normalised units. Nothing is decoded, so nothing fails to
parse, and the same `KeypointEvaluator` scores the predictions under the same metric keys as the text head.

The head reaches the backbone only through the embedding-level interface of `backbones/base.py`
(`build_inputs`, `append_positions`, `embed_inputs`, `hidden_states`), as the policy heads' action token does, so
it works with every backbone family.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from affordvla.backbones.base import VLMBackbone
from affordvla.formats.sample import KALIE_POINT_NAMES, KeypointSample, numbered_point_names
from affordvla.heads.keypoint_head import PROMPT_STYLES, KeypointHead, Points

LOSSES = ("l1", "mse")


class KeypointRegressionHead(KeypointHead):
    """Readout token + MLP -> (K, 2) normalised keypoints. Sized for its backbone by `bind` (the readout token and
    the MLP input need the backbone's hidden size), which the LightningModule calls before any step."""

    writes_text = False

    def __init__(self, num_points: int = len(KALIE_POINT_NAMES), mlp_hidden_size: int = 256, loss: str = "l1",
                 prompt_style: str = "instruction"):
        super().__init__()
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"unknown prompt_style {prompt_style!r}; valid: {PROMPT_STYLES}")
        if loss not in LOSSES:
            raise ValueError(f"unknown regression loss {loss!r}; valid: {LOSSES}")
        if num_points < 1:
            raise ValueError(f"num_points must be positive, got {num_points}")
        self.num_points = num_points
        self.mlp_hidden_size = mlp_hidden_size
        self.loss_name = loss
        self.prompt_style = prompt_style
        self.readout: nn.Parameter | None = None
        self.mlp: nn.Sequential | None = None

    # --- construction -------------------------------------------------------------------------------------
    def bind(self, backbone: VLMBackbone) -> None:
        """Create the readout token and MLP for `backbone`'s hidden size (once; a later bind must match)."""
        hidden = backbone.hidden_size
        if self.readout is not None:
            if self.readout.shape[-1] != hidden:
                raise ValueError(f"this regression head was built for hidden size {self.readout.shape[-1]}, the "
                                 f"backbone has {hidden}")
            return
        device = next(backbone.parameters()).device
        # zero start, like RoboVLMs' action token: the readout begins as "no token" and learns what to ask
        self.readout = nn.Parameter(torch.zeros(hidden, device=device))
        self.mlp = nn.Sequential(nn.Linear(hidden, self.mlp_hidden_size), nn.GELU(),
                                 nn.Linear(self.mlp_hidden_size, 2 * self.num_points)).to(device)

    # --- text ---------------------------------------------------------------------------------------------
    @property
    def point_names(self) -> tuple[str, ...]:
        return KALIE_POINT_NAMES if self.num_points == len(KALIE_POINT_NAMES) else numbered_point_names(self.num_points)

    def settings(self) -> dict[str, Any]:
        return {"num_points": self.num_points, "mlp_hidden_size": self.mlp_hidden_size, "loss": self.loss_name,
                "prompt_style": self.prompt_style}

    def batch_inputs(self, backbone: VLMBackbone, samples: list[KeypointSample]) -> dict[str, Any]:
        return {"prompts": [self.prompt(s) for s in samples], "targets": self.target(samples)}

    def target(self, samples: list[KeypointSample]) -> torch.Tensor:
        """(B, K, 2) normalised targets; every sample must carry exactly `num_points` points."""
        for sample in samples:
            if sample.keypoints.shape != (self.num_points, 2):
                where = sample.meta.get("entry", "?")
                raise ValueError(f"the regression head predicts {self.num_points} points, sample {where!r} of "
                                 f"{sample.meta.get('source', '?')} has {sample.keypoints.shape[0]}; a dataset of "
                                 "variable point counts (RoboPoint) needs the text head")
        return torch.stack([torch.as_tensor(s.keypoints, dtype=torch.float32) for s in samples])

    # --- model --------------------------------------------------------------------------------------------
    def forward(self, backbone: VLMBackbone, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(B, K, 2) keypoints in [0, 1] for the images and prompts."""
        if self.readout is None:
            raise RuntimeError("KeypointRegressionHead.bind(backbone) must be called before use")
        inputs = backbone.append_positions(backbone.build_inputs(prompts), 1)
        inputs = {k: v.to(pixel_values.device) for k, v in inputs.items()}
        embeds = backbone.embed_inputs(pixel_values, inputs)
        token = self.readout.to(embeds.dtype).expand(len(prompts), 1, -1)
        embeds = torch.cat([embeds[:, :-1], token], dim=1)  # the appended position holds the readout token
        hidden = backbone.hidden_states(embeds, inputs)[:, -1]
        return torch.sigmoid(self.mlp(hidden.float())).view(len(prompts), self.num_points, 2)

    def loss(self, predicted: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        target = target.to(predicted.device)
        value = F.l1_loss(predicted, target) if self.loss_name == "l1" else F.mse_loss(predicted, target)
        with torch.no_grad():
            error = torch.linalg.vector_norm(predicted - target, dim=-1).mean()
        return {"loss": value, "keypoint_error": error}

    def losses(self, backbone: VLMBackbone, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.loss(self(backbone, batch["pixel_values"], batch["prompts"]), batch["targets"])

    def evaluate(self, backbone: VLMBackbone, batch: dict[str, Any]
                 ) -> tuple[dict[str, torch.Tensor], list[str], Points]:
        predicted = self(backbone, batch["pixel_values"], batch["prompts"])
        points = predicted.detach().float().cpu().numpy()  # one forward serves the loss and the prediction
        return self.loss(predicted, batch["targets"]), self.as_text(points), list(points)

    @torch.no_grad()
    def predict(self, backbone: VLMBackbone, pixel_values: torch.Tensor, samples: list[KeypointSample]):
        """(texts, (K, 2) arrays): the text is the prediction written as RoboPoint's tuple list, for overlays and
        logs; regression never fails to parse."""
        points = self(backbone, pixel_values, [self.prompt(s) for s in samples]).cpu().numpy()
        return self.as_text(points), list(points)

    @staticmethod
    def as_text(points: np.ndarray) -> list[str]:
        """Each sample's (K, 2) prediction as RoboPoint's tuple list, for overlays and logs."""
        return ["[" + ", ".join(f"({x:.3f}, {y:.3f})" for x, y in p) + "]" for p in points]
