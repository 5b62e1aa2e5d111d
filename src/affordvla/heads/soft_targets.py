"""Soft targets over an ordered, contiguous range of token ids (PaliGemma's location tokens, action bins): with a
Gaussian over the neighbouring bins as the target, an answer one bin off costs little, where a one-hot target
charges it as much as one on the far side of the image."""

from __future__ import annotations

import torch


def soft_bin_nll(log_probs: torch.Tensor, targets: torch.Tensor, nll: torch.Tensor, first: int, count: int,
                 sigma: float) -> torch.Tensor:
    """`nll` (one value per row of `log_probs`, the one-hot loss of `targets`) with every target inside ids
    [first, first + count) charged instead the cross-entropy against a Gaussian over that range centred on it
    (sigma in bins). Targets outside the range keep their one-hot loss."""
    inside = (targets >= first) & (targets < first + count)
    if not inside.any():
        return nll
    bins = torch.arange(count, device=targets.device, dtype=torch.float32)
    centre = (targets[inside] - first).float()
    weights = torch.softmax(-0.5 * ((bins[None] - centre[:, None]) / sigma) ** 2, dim=-1)
    nll = nll.clone()
    nll[inside] = -(weights * log_probs[inside][:, first : first + count]).sum(-1)
    return nll
