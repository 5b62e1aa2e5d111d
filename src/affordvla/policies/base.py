"""The policy contract: what every trained policy offers, for training and for inference.

A policy is a backbone plus a head that predicts keypoints or actions. Callers (the training entrypoint, the
export command, evaluation, rollouts, table callbacks, the server) use only what this file declares; none of them
asks a module which head it holds.

Training side: `PolicyModule`, a LightningModule per policy kind. It declares the samples it trains on
(`sample_kind`), builds its batch layout (`make_collate`), sizes itself from the dataset (`configure_from_metadata`)
and writes one self-describing export (`export(out_dir)`):

    <export>/policy.json              kind, format version, head class and settings, prompt and codec,
                                      normalisation, dataset metadata, backbone load settings
    <export>/config.json, *.safetensors, tokenizer and processor files
                                      the backbone, a plain transformers checkpoint where the family allows
    <export>/head.safetensors         the head's own weights, when it has any

Inference side: `load_policy(export_dir)` (policies/loading.py) returns a `Policy`: batched `predict(observations)`
and `session()` for closed-loop use, whose `act(observation)` keeps the history the head needs.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from safetensors.torch import load_file, save_file

# answer_logits lives with the backbone so that heads (a layer below policies) can use it too; re-exported here
from affordvla.backbones.base import VLMBackbone, answer_logits  # noqa: F401
from affordvla.backbones.finetuning import export_backbone

POLICY_FILE = "policy.json"
HEAD_WEIGHTS = "head.safetensors"
# 1: policy.json with kind and format_version. Exports before it (version 0) hold policy.json without a version
# (action policies), keypoint_head.json (keypoint regression) or decoding.json (keypoint text).
FORMAT_VERSION = 1
POLICY_KINDS = ("keypoints", "actions")


class PolicyFormatError(ValueError):
    """An export folder that is not a policy, or one written by a format this version cannot read."""


# ------------------------------------------------------------------------------------------------ observations


@dataclass
class Observation:
    """One input to a policy. `images` maps a camera name to an HxWx3 uint8 frame; a policy trained on one camera
    also takes a single `image`. `task` and `objects` fill KALIE's prompt template; `state` is proprioception
    (LLARVA's prompt quotes its recent history)."""

    instruction: str
    images: dict[str, np.ndarray] = field(default_factory=dict)
    state: np.ndarray | None = None
    task: str = ""
    objects: list[str] = field(default_factory=list)

    @classmethod
    def coerce(cls, value: Observation | Mapping[str, Any]) -> Observation:
        """An Observation, or a mapping with `instruction` and `image` (one frame) or `images` (per camera)."""
        if isinstance(value, Observation):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"an observation is a mapping or an Observation, not {type(value).__name__}")
        if "instruction" not in value:
            raise ValueError("observation has no 'instruction'")
        images = dict(value.get("images") or {})
        if "image" in value and value["image"] is not None:
            images.setdefault("", value["image"])  # "" = the policy's own camera
        if not images:
            raise ValueError("observation has no 'image' (or 'images' per camera)")
        state = value.get("state")
        return cls(instruction=str(value["instruction"]), images=images,
                   state=None if state is None else np.asarray(state, dtype=np.float32),
                   task=str(value.get("task") or ""), objects=list(value.get("objects") or []))

    def image_for(self, camera: str | None) -> np.ndarray:
        """The frame of `camera`, else the single frame given without a camera name."""
        if camera is not None and camera in self.images:
            frame = self.images[camera]
        elif "" in self.images:
            frame = self.images[""]
        elif len(self.images) == 1:
            frame = next(iter(self.images.values()))
        else:
            raise ValueError(f"observation has cameras {sorted(self.images)} but the policy reads {camera!r}")
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"image of camera {camera!r}: expected an HxWx3 uint8 array, got {frame.dtype} "
                             f"{tuple(frame.shape)}")
        return frame


@dataclass
class KeypointPrediction:
    """Named points, (x, y) normalised to [0, 1] of the image; `text` is the raw answer (empty for a regression
    head) and `parsed` whether it parsed (an unparsed answer has no points)."""

    names: tuple[str, ...]
    points: np.ndarray  # (K, 2) float32, or (0, 2) when the answer did not parse
    text: str = ""
    parsed: bool = True

    def to_dict(self, width: int | None = None, height: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"text": self.text, "parsed": self.parsed,
                               "points": {n: [float(x), float(y)] for n, (x, y) in zip(self.names, self.points)}}
        if width and height:
            out["pixels"] = {n: [float(x) * width, float(y) * height] for n, (x, y) in zip(self.names, self.points)}
        return out


@dataclass
class ActionPrediction:
    """An action chunk (n, D) in the dataset's units; `text` is the raw answer of a language head."""

    actions: np.ndarray
    text: str = ""
    parsed: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"actions": self.actions.tolist(), "text": self.text, "parsed": self.parsed}


Prediction = KeypointPrediction | ActionPrediction


# ------------------------------------------------------------------------------------------------ inference side


class Session(abc.ABC):
    """Closed-loop use of a policy: `reset()` at the start of an episode, then `act(observation)` per step."""

    @abc.abstractmethod
    def reset(self) -> None: ...

    @abc.abstractmethod
    def act(self, observation: Observation | Mapping[str, Any]) -> Prediction: ...


class Policy(abc.ABC):
    """A loaded policy. `predict` is batched and stateless; `session()` keeps history for heads that need it
    (a stateless head's session predicts each step on its own)."""

    kind: ClassVar[str]

    def __init__(self, module: PolicyModule, record: dict[str, Any], source: Path | None = None):
        self.module = module.eval()
        self.record = record
        self.source = source

    @abc.abstractmethod
    def predict(self, observations: Sequence[Observation | Mapping[str, Any]]) -> Sequence[Prediction]:
        """One prediction per observation; kinds may take further keyword options (e.g. `unnorm_key`)."""

    @abc.abstractmethod
    def session(self) -> Session:
        """A closed-loop session; kinds may take options (e.g. an action policy's chunk execution)."""

    def info(self) -> dict[str, Any]:
        """What a client needs to know: kind, head, codec, action dimensions, normalisation, image size, source."""
        return {"kind": self.kind, "format_version": self.record.get("format_version"),
                "head": self.record.get("head", {}).get("class"), "source": self.record.get("source", {}),
                "image_size": self.module.backbone.image_size if hasattr(self.module.backbone, "image_size") else None,
                **self.module.describe()}

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def to(self, device: str | torch.device) -> Policy:
        self.module.to(device)
        return self


# ------------------------------------------------------------------------------------------------- training side


class PolicyModule(L.LightningModule, abc.ABC):
    """A backbone and a head trained as one policy. Subclasses say how samples become batches and losses, how a
    batch becomes predictions, and what the head needs to be rebuilt at load time (`head_record`)."""

    kind: ClassVar[str]  # one of POLICY_KINDS
    sample_kind: ClassVar[str]  # what the datamodule must yield: "keypoints" | "action_window"
    head_part: ClassVar[str] = "head"  # the optimiser group name of the head's own parameters

    def __init__(self, backbone: VLMBackbone, optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., Any] | None = None, part_lr: dict[str, float] | None = None,
                 freeze: list[str] | None = None, head_lr: float | None = None,
                 callbacks: Mapping[str, L.Callback | None] | None = None):
        super().__init__()
        self.backbone = backbone
        # the callbacks this kind of policy reports through (overlays, action traces), from its module config
        self.kind_callbacks = {name: cb for name, cb in (callbacks or {}).items() if cb is not None}
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.part_lr, self.head_lr = dict(part_lr or {}), head_lr
        if freeze:
            backbone.freeze(list(freeze))
        self.dataset_metadata: dict[str, Any] = {}
        self.last_metrics: dict[str, dict[str, float]] = {}

    # --- data -----------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def make_collate(self) -> Callable[[list[Any]], Any]:
        """The batch layout: samples -> what training_step receives."""

    def configure_from_metadata(self, metadata: dict[str, Any]) -> None:
        """Size the head and its codec or normaliser from the dataset's metadata (before training, and again when
        an export is loaded: the metadata travels in policy.json)."""
        self.dataset_metadata = json.loads(json.dumps(metadata))

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            if getattr(datamodule, "collate", None) is None:
                datamodule.collate = self.make_collate()
            datamodule.setup(stage)
            self.configure_from_metadata(datamodule.metadata())

    def configure_callbacks(self) -> list[L.Callback]:
        # Lightning adds these to the trainer's own callbacks when the module is fitted or tested
        return list(self.kind_callbacks.values())

    def on_fit_start(self) -> None:
        self.backbone.train()  # from_pretrained leaves models in eval mode

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # what the data looked like (sizes, statistics) travels with the weights, as plain JSON values
        checkpoint["dataset_metadata"] = json.loads(json.dumps(self.dataset_metadata))

    # --- optimisation ---------------------------------------------------------------------------------------
    def head_parameters(self) -> list[torch.nn.Parameter]:
        """The head's own trainable parameters (not the backbone's); empty for heads that only read text."""
        return []

    def parameter_groups(self) -> list[dict[str, Any]]:
        """One optimiser group per backbone part (with its `part_lr`) and one for the head (with `head_lr`)."""
        groups = []
        for part, params in self.backbone.parameter_parts().items():
            if params:
                groups.append({"params": params, "name": part,
                               **({"lr": self.part_lr[part]} if part in self.part_lr else {})})
        unknown = sorted(set(self.part_lr) - {g["name"] for g in groups} - set(self.backbone.part_prefixes))
        if unknown:
            raise ValueError(f"module.part_lr names unknown parts {unknown}; valid: "
                             f"{sorted(self.backbone.part_prefixes)}")
        head = self.head_parameters()
        if head:
            groups.append({"params": head, "name": self.head_part,
                           **({"lr": self.head_lr} if self.head_lr is not None else {})})
        elif self.head_lr is not None:
            raise ValueError(f"module.head_lr={self.head_lr}: this head has no parameters of its own to train "
                             "(it writes its answer as text); drop head_lr")
        return groups

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("this module was built for inference (no optimizer): it cannot be trained")
        optimizer = self.optimizer_factory(params=self.parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer, total_steps=self.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- inference ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def predict_observations(self, observations: Sequence[Observation]) -> Sequence[Prediction]:
        """Batched, stateless prediction in the units a user reads (normalised points, dataset-unit actions)."""

    def describe(self) -> dict[str, Any]:
        """Kind-specific facts for `Policy.info()` (codec and point names, or action dimensions and
        normalisation)."""
        return {}

    # --- export ---------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def head_record(self) -> dict[str, Any]:
        """What rebuilds the head: {"class": a name of the kind's head registry, "settings": its constructor
        arguments} plus the module settings that shape it (formulation, camera, prompt style...)."""

    def head_state(self) -> dict[str, torch.Tensor]:
        """The head's own weights (those `head_parameters` trains), as written to head.safetensors."""
        return {}

    def load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise PolicyFormatError(f"{HEAD_WEIGHTS} holds {len(state)} tensors but this head has no weights")

    def policy_record(self) -> dict[str, Any]:
        return {"kind": self.kind, "format_version": FORMAT_VERSION, "sample_kind": self.sample_kind,
                "head": self.head_record(),
                "backbone": {"family": self.backbone.family, "load": self.backbone_load_settings()},
                "dataset_metadata": self.dataset_metadata}

    def backbone_load_settings(self) -> dict[str, Any]:
        """from_pretrained keyword arguments the weights do not hold (PaliGemma's prefix-LM attention)."""
        prefix_lm = getattr(self.backbone, "prefix_lm", None)
        return {} if prefix_lm is None else {"prefix_lm": bool(prefix_lm)}

    def export(self, out_dir: str | Path, *, merge: bool = True, source: dict[str, Any] | None = None) -> Path:
        """Write the policy for use without training into `out_dir` (which the caller has checked): the backbone
        (LoRA merged, or the adapter alone with merge=False), the head's weights, and policy.json."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        export_backbone(self.backbone, out_dir, merge=merge)
        state = {k: v.detach().contiguous().cpu() for k, v in self.head_state().items()}
        if state:
            save_file(state, str(out_dir / HEAD_WEIGHTS))
        record = self.policy_record() | {"source": dict(source or {})}
        (out_dir / POLICY_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
        return out_dir


def read_head_state(export_dir: Path) -> dict[str, torch.Tensor]:
    path = export_dir / HEAD_WEIGHTS
    return load_file(str(path)) if path.is_file() else {}
