"""train_step.overhead_ratio: the framework's training step against a hand-written PyTorch loop doing the same
forward / backward / optimiser step on the same tiny model and batch, measured side by side in one process.

Both loops use the same module objects, the same collated batch (so data loading is excluded from both) and
alternate in rounds, so machine noise hits both equally; the figure is the ratio of medians.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from affordvla.backbones.paligemma.modeling import PaliGemmaBackbone
from affordvla.formats.kalie_tasks import TASKS
from affordvla.formats.sample import KeypointSample
from affordvla.heads.keypoint_text import KeypointTextHead
from affordvla.offline.tabletop import make_scenes
from affordvla.optim import warmup_cosine
from affordvla.policies.base import answer_logits
from affordvla.policies.keypoints import KeypointPolicyModule


class _SameBatch(Dataset):
    """Returns the one pre-collated batch again and again (batch_size=None loader)."""

    def __init__(self, batch, length: int):
        self.batch, self.length = batch, length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return self.batch


class _StepTimer(L.Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)


def _module(backbone_dir: Path) -> KeypointPolicyModule:
    backbone = PaliGemmaBackbone.from_pretrained(backbone_dir)
    head = KeypointTextHead(location_sigma=8.0)
    module = KeypointPolicyModule(backbone, head, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4),
                                  scheduler=lambda optimizer, total_steps: warmup_cosine(optimizer, total_steps))
    return module


def _batch(module: KeypointPolicyModule, batch_size: int):
    samples = [KeypointSample(s.image, TASKS[s.task].instruction, s.keypoints, task=s.task,
                              meta={"source": "bench", "entry": str(i)})
               for i, s in enumerate(make_scenes(123, batch_size))]
    return module.make_collate()(samples)


def _framework_times(backbone_dir: Path, batch, steps: int) -> list[float]:
    module = _module(backbone_dir)
    timer = _StepTimer()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                        gradient_clip_val=1.0, num_sanity_val_steps=0, limit_val_batches=0)
    loader = DataLoader(_SameBatch(batch, steps), batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    return timer.times


def _hand_written_times(backbone_dir: Path, batch, steps: int) -> list[float]:
    module = _module(backbone_dir)
    module.backbone.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    scheduler = warmup_cosine(optimizer, steps)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits, labels = answer_logits(module.backbone, batch["pixel_values"], batch["inputs"])
        loss = module.head.loss(logits, labels)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        times.append(time.perf_counter() - start)
    return times


def run(backbone_dir: Path, batch_size: int = 32, steps: int = 30, rounds: int = 3, warmup: int = 5) -> dict:
    torch.manual_seed(0)
    batch = _batch(_module(backbone_dir), batch_size)
    framework, hand = [], []
    for _ in range(rounds):
        framework += _framework_times(backbone_dir, batch, steps + warmup)[warmup:]
        hand += _hand_written_times(backbone_dir, batch, steps + warmup)[warmup:]
    f, h = statistics.median(framework), statistics.median(hand)
    return {
        "train_step.framework_seconds": f,
        "train_step.hand_written_seconds": h,
        "train_step.overhead_ratio": f / h,
    }
