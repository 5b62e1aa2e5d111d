"""Learning-rate schedules, built from config as partials that receive the optimizer and the run length."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_fraction: float = 0.05,
                  min_lr_ratio: float = 0.0, warmup_steps: int | None = None,
                  cosine_from_start: bool = False) -> LambdaLR:
    """Linear warm-up over `warmup_fraction` of the run (or `warmup_steps`), then cosine decay to `min_lr_ratio` x
    the peak. With `cosine_from_start` the cosine spans the whole run and the warm-up scales its first steps (the
    pointing pre-training's shape, kept so its recorded recipes rebuild the shipped weights exactly)."""
    if total_steps is None or total_steps <= 0:
        raise ValueError("warmup_cosine needs trainer.max_steps > 0 to know the run length")
    warmup = warmup_steps if warmup_steps is not None else max(1, int(round(warmup_fraction * total_steps)))
    if warmup < 1:
        raise ValueError(f"warmup_cosine: warmup_steps must be >= 1, got {warmup}")

    def factor(step: int) -> float:
        if cosine_from_start:
            return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
