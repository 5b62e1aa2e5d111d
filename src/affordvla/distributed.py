"""Multi-GPU and multi-node strategies, built from config.

The trainer configs (`conf/trainer/{ddp,ddp_cpu,fsdp,deepspeed}.yaml`) name a factory here as
`trainer.strategy._target_`. Factories that take a `backbone` argument receive the built backbone from
`affordvla.train` (FSDP's wrap units are the backbone's own block classes, known only once it is loaded).

Data under DDP: the keypoint datamodules' `StepResumableSampler` shards each epoch across ranks itself (and is
left in place by Lightning, see data/sampling.py); the OXE stream shards by rank x loader worker (data/oxe/stream.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from hydra.types import RunMode

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


def _dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; valid: {sorted(_DTYPES)}") from None


def wants_backbone(target: Callable) -> bool:
    """Whether a strategy factory needs the built backbone (it has a `backbone` parameter)."""
    try:
        return "backbone" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def fsdp_strategy(backbone, *, sharding_strategy: str = "FULL_SHARD", param_dtype: str = "bfloat16",
                  reduce_dtype: str = "float32", buffer_dtype: str = "float32", activation_checkpointing: bool = True,
                  wrap_vision_layers: bool = True, cpu_offload: bool = False, state_dict_type: str = "full",
                  use_orig_params: bool = True, **kwargs: Any):
    """Lightning's FSDPStrategy for `backbone`: parameters in `param_dtype`, gradients reduced in `reduce_dtype`
    (bf16 compute, fp32 reduction), one FSDP unit per transformer block of the language model (and of the vision
    tower with `wrap_vision_layers`), activation checkpointing on the language model's blocks.

    `use_orig_params` keeps parameter names and lets frozen and trainable parameters share a unit (the frozen
    vision tower, per-part learning rates). An HF gradient checkpointing already on the backbone
    (`backbone.gradient_checkpointing=true`) replaces FSDP's, rather than recomputing twice."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import MixedPrecision

    if state_dict_type != "full":  # the export and the checkpoint IO expect the gathered weights on rank 0
        raise ValueError(f"fsdp state_dict_type={state_dict_type!r}: only 'full' is supported (checkpoints and the "
                         "export hold the gathered weights)")
    decoder = set(backbone.decoder_layer_classes)
    if not decoder:
        raise ValueError(f"backbone {type(backbone).__name__} has no decoder block among "
                         f"{backbone.decoder_layer_names}: FSDP would wrap the whole model as one unit")
    wrap = decoder | (set(backbone.vision_layer_classes) if wrap_vision_layers else set())
    checkpointing = decoder if activation_checkpointing else None
    model = backbone.model
    already = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x name
    if already is None:
        already = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing and already:
        log.info("backbone already uses gradient checkpointing: FSDP activation checkpointing left off")
        checkpointing = None
    precision = MixedPrecision(param_dtype=_dtype(param_dtype), reduce_dtype=_dtype(reduce_dtype),
                               buffer_dtype=_dtype(buffer_dtype))
    return FSDPStrategy(sharding_strategy=sharding_strategy, mixed_precision=precision, auto_wrap_policy=wrap,
                        activation_checkpointing_policy=checkpointing, cpu_offload=cpu_offload,
                        state_dict_type=state_dict_type, use_orig_params=use_orig_params, **kwargs)


def deepspeed_strategy(stage: int = 2, offload_optimizer: bool = False, allgather_bucket_size: float = 2e8,
                       reduce_bucket_size: float = 2e8, **kwargs: Any):
    """Lightning's DeepSpeedStrategy (ZeRO stage 2 by default: optimizer states and gradients sharded, parameters
    replicated). DeepSpeed is an optional dependency: without it this fails here, naming the fix."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ImportError("trainer=deepspeed needs the deepspeed package, which is not installed: "
                          "`pip install deepspeed` on a machine with CUDA, or use trainer=fsdp or trainer=ddp")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(stage=stage, offload_optimizer=offload_optimizer,
                             allgather_bucket_size=allgather_bucket_size, reduce_bucket_size=reduce_bucket_size,
                             **kwargs)


def check_launch_under_hydra(trainer, mode: RunMode | None) -> None:
    """Refuse what cannot work: inside a Hydra multirun, Lightning's subprocess launcher would re-execute the
    whole sweep command for every extra rank. A sweep of multi-GPU jobs needs its processes started from outside
    (SLURM through `hydra/launcher=slurm`, or torchrun) so Lightning launches none."""
    from lightning.pytorch.strategies.launchers.subprocess_script import (
        _SubprocessScriptLauncher,
    )

    relaunches = isinstance(getattr(trainer.strategy, "launcher", None), _SubprocessScriptLauncher)
    if mode == RunMode.MULTIRUN and relaunches and trainer.num_devices > 1:
        raise ValueError(f"trainer.devices={trainer.num_devices} starts extra processes by re-running the command, "
                         "which inside a multirun (-m) would re-run the whole sweep. Sweep multi-GPU jobs with "
                         "hydra/launcher=slurm (one task per GPU), or run each job on its own without -m.")


def check_resumable(trainer, ckpt_path: str | None) -> None:
    """Checkpoints are written as a folder (`model.safetensors` + `training_state.pt`) through the project's
    checkpoint IO. FSDP reads back only its own shard folders or a single file, and DeepSpeed writes and reads its
    engine's format, so resuming from `ckpt_path` under either would fail deep inside Lightning: refuse at once."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if ckpt_path and isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
        name = type(trainer.strategy).__name__
        raise ValueError(f"ckpt_path={ckpt_path}: resuming is supported with the single-device and DDP strategies; "
                         f"{name} cannot read the checkpoint folder. Start a new run from the exported weights "
                         "(backbone.pretrained=<run>/model) instead.")


def is_sharded(trainer) -> bool:
    """Whether the trained weights are split across ranks (FSDP): an export must gather them first."""
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy) and trainer.world_size > 1


@contextlib.contextmanager
def module_for_export(trainer, module, rebuild: Callable[[], Any]) -> Iterator[Any]:
    """The module holding the full trained weights, for global rank 0 to export; None on other ranks.

    Every rank must enter: under multi-process FSDP the full state dict is gathered (a collective) and loaded into
    a fresh, unwrapped module from `rebuild()` on rank 0. Otherwise (one process, DDP, DeepSpeed ZeRO-2, whose
    parameters are whole on every rank) it is the trained module itself."""
    if not is_sharded(trainer):
        yield module if trainer.is_global_zero else None
        return
    state = trainer.strategy.lightning_module_state_dict()  # full weights on rank 0 only, on CPU
    if not trainer.is_global_zero:
        yield None
        return
    fresh = rebuild()
    fresh.load_state_dict(state)  # strict: a mismatch names the keys
    yield fresh
