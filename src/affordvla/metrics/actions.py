"""Action metrics: masked MSE / L1 per dimension and gripper accuracy, the offline figures of RoboVLMs and LLARVA."""

from __future__ import annotations

import numpy as np


def action_metrics(predicted: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None, *,
                   gripper_dim: int | None = -1, gripper_threshold: float = 0.0) -> dict[str, float]:
    """`predicted` and `target` are (..., D); `mask` (...) marks the steps that count (chunk steps past an
    episode end do not). The gripper dimension is scored as open/closed on each side of `gripper_threshold`
    (0 for CALVIN's -1/+1, 0.5 for 0/1 grippers) and left out of the arm MSE/L1."""
    predicted, target = np.asarray(predicted, np.float64), np.asarray(target, np.float64)
    if predicted.shape != target.shape:
        raise ValueError(f"predicted {predicted.shape} and target {target.shape} differ")
    mask = np.ones(predicted.shape[:-1], bool) if mask is None else np.asarray(mask, bool)
    if mask.shape != predicted.shape[:-1]:
        raise ValueError(f"mask {mask.shape} does not match the actions' leading shape {predicted.shape[:-1]}")
    if not mask.any():
        raise ValueError("the mask selects no step")
    p, t = predicted[mask], target[mask]  # (N, D)
    dims = list(range(p.shape[1]))
    if gripper_dim is not None:
        gripper = dims.pop(gripper_dim)
    error = p[:, dims] - t[:, dims]
    out = {"action_mse": float((error**2).mean()), "action_l1": float(np.abs(error).mean()), "count": len(p)}
    out.update({f"action_mse_dim{d}": float(v) for d, v in zip(dims, (error**2).mean(0))})
    if gripper_dim is not None:
        closed_predicted, closed_true = p[:, gripper] > gripper_threshold, t[:, gripper] > gripper_threshold
        out["gripper_accuracy"] = float((closed_predicted == closed_true).mean())
    return out


def mean_baseline_mse(train_actions: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None,
                      gripper_dim: int | None = -1) -> float:
    """MSE of always predicting the training actions' mean: the baseline every action figure is shown against."""
    mean = np.asarray(train_actions, np.float64).reshape(-1, np.shape(target)[-1]).mean(0)
    return action_metrics(np.broadcast_to(mean, np.shape(target)), target, mask, gripper_dim=gripper_dim)["action_mse"]
