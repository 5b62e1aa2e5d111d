"""The interface of a keypoint head: what the keypoint policy (policies/keypoints) asks of the text head and the
regression head alike, so that it never asks which one it holds.

A head turns samples into the inputs beside the pixels (`batch_inputs`), a batch into losses (`losses`) and into
predictions (`predict`, `evaluate`), and says what rebuilds it (`settings`: its constructor arguments). Its own
weights are its state_dict (empty for a head that only reads the language model's logits).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from affordvla.backbones.base import VLMBackbone
from affordvla.formats.kalie_tasks import TASKS, kalie_prompt
from affordvla.formats.sample import KeypointSample, numbered_point_names

PROMPT_STYLES = ("instruction", "kalie")
# predict's points per sample: a (K, 2) array of normalised (x, y), or None where an answer did not parse
Points = list[np.ndarray | None]


class KeypointHead(nn.Module, abc.ABC):
    """A head that predicts named keypoints of an image from a prompt. `writes_text`: its answer is text a
    codec parses (the raw answer a user may read), rather than numbers it computes."""

    writes_text: ClassVar[bool]
    prompt_style: str

    # --- text ---------------------------------------------------------------------------------------------
    def prompt(self, sample: KeypointSample) -> str:
        if self.prompt_style == "kalie" and sample.task in TASKS:
            return kalie_prompt(TASKS[sample.task])
        return sample.instruction

    @property
    @abc.abstractmethod
    def point_names(self) -> tuple[str, ...]:
        """The names of the points of one answer (a variable-count answer: those of its expected count)."""

    def names_for(self, count: int) -> tuple[str, ...]:
        """Names of `count` predicted points: the head's own, numbered past them."""
        names = self.point_names
        return names[:count] if count <= len(names) else numbered_point_names(count)

    def query_sample(self, image: np.ndarray, instruction: str, task: str = "",
                     objects: Sequence[str] = ()) -> KeypointSample:
        """A sample for a query without labels. Its keypoints are placeholders of an answer's size: they size the
        text head's answer budget when none is configured, and nothing else reads them."""
        names = self.point_names
        return KeypointSample(image=image, instruction=instruction, keypoints=np.full((len(names), 2), 0.5),
                              point_names=names, task=task, objects=list(objects))

    @property
    def kalie_answers(self) -> bool:
        """Whether answers are KALIE's JSON (its offline scorer's figures are reported beside ours)."""
        return False

    def match_point_count(self, count: int | None) -> None:
        """Fit the head to the dataset's points per answer (None: it varies), or refuse a dataset it cannot
        answer. A head whose targets are checked sample by sample as they are collated needs nothing here."""

    # --- model --------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def bind(self, backbone: VLMBackbone) -> None:
        """Size the head for `backbone` (token ids, hidden size); called once before any step."""

    @abc.abstractmethod
    def batch_inputs(self, backbone: VLMBackbone, samples: list[KeypointSample]) -> dict[str, Any]:
        """What a batch holds beside the pixels and the samples: the head's model inputs and targets."""

    @abc.abstractmethod
    def losses(self, backbone: VLMBackbone, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """`loss` (what is trained) and the head's training metrics, for a collated batch."""

    @abc.abstractmethod
    def predict(self, backbone: VLMBackbone, pixel_values: torch.Tensor,
                samples: list[KeypointSample]) -> tuple[list[str], Points]:
        """Answers (text; a regression head writes its points as text for logs) and their points."""

    def evaluate(self, backbone: VLMBackbone, batch: dict[str, Any]
                 ) -> tuple[dict[str, torch.Tensor], list[str], Points]:
        """Losses and predictions of a collated evaluation batch."""
        losses = self.losses(backbone, batch)
        texts, points = self.predict(backbone, batch["pixel_values"], batch["samples"])
        return losses, texts, points

    # --- export -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def settings(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this head as it predicts now (JSON values)."""
