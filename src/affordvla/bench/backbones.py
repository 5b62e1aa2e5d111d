"""Peak memory of one LoRA training step against one full fine-tuning step, per backbone family, on the offline
tiny variants with the keypoint-text head (`backbone.<name>.lora_peak_mb`, `backbone.<name>.full_peak_mb`).

The step is the first one of a fresh optimiser, so its peak includes the optimiser state being created. On CPU the
figure is the peak of live tensor memory (parameters, gradients, optimiser state, activations, temporaries),
counted per tensor storage rather than from process pages, so allocator caching and the Python heap do not blur
it; on a GPU it is `torch.cuda.max_memory_allocated` over the same step.
"""

from __future__ import annotations

import tempfile
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from affordvla.pretraining.pointing import NATIVE_CODECS, tiny_writer

FAMILIES = ("paligemma", "llava", "cogvlm")
LORA = {"rank": 8, "alpha": 16, "dropout": 0.0}


class LiveTensorMemory(TorchDispatchMode):
    """Bytes held by live tensor storages: those existing on entry (`track`) plus every storage an operator creates
    inside the block, each released when its storage is freed. `peak` is the high-water mark.

    (torch's own MemTracker cannot be used here: it hooks the gradient of every parameter, and a LoRA model's frozen
    parameters take no hooks.)"""

    def __init__(self, existing: list[torch.Tensor] = ()):
        super().__init__()
        self._live: dict[int, tuple[int, weakref.ref]] = {}
        self.current = self.peak = 0
        for tensor in existing:
            self._add(tensor)

    def _add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live or storage.device.type == "meta":
            return
        size = storage.nbytes()
        self._live[key] = (size, weakref.ref(storage, lambda _, key=key: self._release(key)))
        self.current += size
        self.peak = max(self.peak, self.current)

    def _release(self, key: int) -> None:
        size, _ = self._live.pop(key, (0, None))
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._add(value)
        return out


def _batch(backbone, head, batch_size: int):
    from affordvla.formats.kalie_tasks import TASKS
    from affordvla.formats.sample import KeypointSample
    from affordvla.offline.tabletop import make_scenes
    from affordvla.policies.keypoints import KeypointBatchCollator

    samples = [KeypointSample(image=s.image, instruction=TASKS[s.task].instruction, keypoints=s.keypoints,
                              task=s.task) for s in make_scenes(7, batch_size, 128)]
    return KeypointBatchCollator(backbone, head)(samples)


def step_peak_mb(family: str, checkpoint: Path, *, lora: bool, batch_size: int = 8) -> dict[str, float]:
    """Peak memory (MB) of one AdamW step; also the trainable parameter count."""
    from affordvla.backbones.factory import load_backbone
    from affordvla.heads.keypoint_text import KeypointTextHead

    torch.manual_seed(0)
    backbone = load_backbone(family, str(checkpoint), lora=LORA if lora else None)
    backbone.train()
    head = KeypointTextHead(codec=NATIVE_CODECS[family])
    head.bind(backbone)
    batch = _batch(backbone, head, batch_size)
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def step() -> None:
        out = backbone(batch["pixel_values"], batch["inputs"])
        loss = head.loss(out.logits, batch["inputs"]["labels"])["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if torch.cuda.is_available():
        backbone.cuda()
        batch = {k: (v.cuda() if torch.is_tensor(v) else {kk: vv.cuda() for kk, vv in v.items()})
                 for k, v in batch.items()}
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated()
    else:
        existing = [*backbone.parameters(), *backbone.buffers(), batch["pixel_values"],
                    *[v for v in batch["inputs"].values() if torch.is_tensor(v)]]
        with LiveTensorMemory(existing) as tracker:
            step()
        peak = tracker.peak
    return {"peak_mb": peak / 2**20, "trainable": float(sum(p.numel() for p in trainable))}


def run(families=FAMILIES) -> dict[str, float]:
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="affordvla-bench-backbones-") as work:
        for family in families:
            checkpoint = tiny_writer(family)(Path(work) / family, seed=0)  # the 128 px default size
            full = step_peak_mb(family, checkpoint, lora=False)
            lora = step_peak_mb(family, checkpoint, lora=True)
            figures[f"backbone.{family}.full_peak_mb"] = full["peak_mb"]
            figures[f"backbone.{family}.lora_peak_mb"] = lora["peak_mb"]
            figures[f"backbone.{family}.lora_to_full_peak_ratio"] = lora["peak_mb"] / full["peak_mb"]
            figures[f"backbone.{family}.lora_trainable_share"] = lora["trainable"] / full["trainable"]
    return figures
