"""Action normalisation for policy heads, with the exact inverse.

The arm dimensions are mapped into [-1, 1], where the heads' tanh outputs live:
- `clip`: clip to [-bound, bound] and divide by bound (RoboVLMs' CALVIN configs, bound 0.65);
- `bounds`: `clip(2 (x - q01) / (q99 - q01 + eps) - 1, -1, 1)` from the dataset's statistics (OpenVLA / OXE);
  dimensions whose q01 == q99 never vary and map to 0;
- `identity`: the data already did it (an OXE mixture normalises each dataset with its own bounds, as OpenVLA
  does); the per-dataset q01/q99 are kept under the dataset names (OpenVLA's `unnorm_key`) so `unnormalize`
  brings a prediction back to one dataset's units.
The gripper is a binary target: {-1, +1} (CALVIN) or {0, 1} (OXE) becomes {0, 1} = closed / open for the BCE
loss, and predictions come back in the dataset's own convention.

The normaliser is built from dataset metadata and saved with the checkpoint (`to_dict` / `from_dict`), so a
released policy acts in the right units without its training data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

MODES = ("clip", "bounds", "identity")
EPS = 1e-8


class ActionNormalizer:
    """Maps a dataset's actions to the range the heads predict in and back (clip or quantile bounds per
    dimension, per dataset in a mixture); the gripper becomes a binary target."""

    def __init__(self, action_dim: int, mode: str = "clip", clip_bound: float = 0.65,
                 q01: list[float] | None = None, q99: list[float] | None = None, gripper_low: float = -1.0,
                 datasets: dict[str, dict[str, list[float]]] | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown action normalisation {mode!r}; valid: {list(MODES)}")
        if action_dim < 2:
            raise ValueError(f"actions need at least one arm dimension and the gripper, got action_dim={action_dim}")
        if gripper_low not in (-1.0, 0.0):
            raise ValueError(f"the closed gripper must be -1 or 0 in the dataset, got {gripper_low}")
        self.action_dim, self.mode, self.clip_bound, self.gripper_low = action_dim, mode, float(clip_bound), gripper_low
        arm = action_dim - 1
        if mode == "bounds":
            if q01 is None or q99 is None:
                raise ValueError("bounds normalisation needs the dataset's q01 and q99 action statistics")
            self.q01 = np.asarray(q01, np.float64)[:arm]
            self.q99 = np.asarray(q99, np.float64)[:arm]
            if self.q01.shape != (arm,) or self.q99.shape != (arm,):
                raise ValueError(f"q01/q99 must give at least {arm} arm dimensions, got {len(q01)} / {len(q99)}")
        else:
            self.q01 = self.q99 = None
        # identity: {dataset name: {"q01": [...], "q99": [...]}}, the bounds each dataset was normalised with
        self.datasets = {name: {"q01": list(b["q01"]), "q99": list(b["q99"])} for name, b in (datasets or {}).items()}

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], mode: str = "clip", clip_bound: float = 0.65) -> ActionNormalizer:
        """From `datamodule.metadata()`: the action dimension and, for `bounds`, q01/q99; the gripper convention
        is read off the statistics (a negative minimum means -1/+1)."""
        stats = metadata.get("action_statistics") or {}
        gripper_min = stats.get("min", [-1.0])[-1] if stats else -1.0
        if (metadata.get("action_normalization") or {}).get("per_dataset"):  # the data normalised its actions
            datasets = {name: {"q01": s["q01"], "q99": s["q99"]}
                        for name, s in (metadata.get("dataset_statistics") or {}).items()}
            return cls(int(metadata["action_dim"]), mode="identity", gripper_low=-1.0 if gripper_min < 0 else 0.0,
                       datasets=datasets)
        return cls(int(metadata["action_dim"]), mode=mode, clip_bound=clip_bound, q01=stats.get("q01"),
                   q99=stats.get("q99"), gripper_low=-1.0 if gripper_min < 0 else 0.0)

    # --- dataset units -> head targets --------------------------------------------------------------------
    def normalize_arm(self, actions: torch.Tensor) -> torch.Tensor:
        arm = actions[..., :-1]
        if self.mode == "clip":
            return arm.clamp(-self.clip_bound, self.clip_bound) / self.clip_bound
        if self.mode == "identity":
            return arm
        q01, q99 = self._bounds(arm)
        scaled = (2 * (arm - q01) / (q99 - q01 + EPS) - 1).clamp(-1, 1)
        return torch.where(q99 == q01, torch.zeros_like(scaled), scaled)

    def gripper_target(self, actions: torch.Tensor) -> torch.Tensor:
        """{0, 1} (1 = open) from the dataset's convention."""
        return (actions[..., -1] > (self.gripper_low + 1) / 2).to(actions.dtype)

    # --- head outputs -> dataset units --------------------------------------------------------------------
    def denormalize(self, arm: torch.Tensor, gripper_open: torch.Tensor) -> torch.Tensor:
        """Normalised arm (..., D-1) and a boolean open/closed (...) -> actions (..., D) in dataset units."""
        if self.mode == "clip":
            arm = arm * self.clip_bound
        elif self.mode == "bounds":
            q01, q99 = self._bounds(arm)
            arm = torch.where(q99 == q01, q01.expand_as(arm), (arm + 1) / 2 * (q99 - q01 + EPS) + q01)
        gripper = torch.where(gripper_open.bool(), torch.ones_like(arm[..., 0]),
                              torch.full_like(arm[..., 0], self.gripper_low))
        return torch.cat([arm, gripper[..., None]], dim=-1)

    def unnormalize(self, actions: torch.Tensor, unnorm_key: str | None = None) -> torch.Tensor:
        """Actions (..., D) as `denormalize` gives them -> one dataset's units. Only per-dataset (identity)
        normalisers change them; `unnorm_key` names the dataset, and may be left out when there is one."""
        if not self.datasets:
            return actions
        if unnorm_key is None:
            if len(self.datasets) != 1:
                raise ValueError(f"the policy was trained on {len(self.datasets)} datasets, each normalised with its "
                                 f"own statistics: give unnorm_key, one of {sorted(self.datasets)}")
            unnorm_key = next(iter(self.datasets))
        if unnorm_key not in self.datasets:
            raise ValueError(f"unnorm_key {unnorm_key!r} is not among the datasets {sorted(self.datasets)}")
        bounds = self.datasets[unnorm_key]
        dataset = ActionNormalizer(self.action_dim, "bounds", q01=bounds["q01"], q99=bounds["q99"],
                                   gripper_low=self.gripper_low)
        return dataset.denormalize(actions[..., :-1], actions[..., -1] > (self.gripper_low + 1) / 2)

    def _bounds(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.as_tensor(self.q01, dtype=like.dtype, device=like.device),
                torch.as_tensor(self.q99, dtype=like.dtype, device=like.device))

    # --- persistence --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"action_dim": self.action_dim, "mode": self.mode, "clip_bound": self.clip_bound,
                "q01": None if self.q01 is None else self.q01.tolist(),
                "q99": None if self.q99 is None else self.q99.tolist(), "gripper_low": self.gripper_low,
                "datasets": self.datasets}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ActionNormalizer:
        return cls(**data)
