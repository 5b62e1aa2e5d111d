"""KeypointPolicyModule: a backbone and a keypoint head (text or regression, heads/keypoint_head.py) trained and
evaluated as one policy on KeypointSample batches, under the same metric keys whichever head it holds."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch

from affordvla.backbones.base import VLMBackbone
from affordvla.data.kalie_augment import centre_crop_box
from affordvla.heads.keypoint_head import KeypointHead
from affordvla.heads.keypoint_regression import KeypointRegressionHead
from affordvla.heads.keypoint_text import KeypointTextHead
from affordvla.metrics.keypoints import KeypointEvaluator
from affordvla.policies.base import (
    KeypointPrediction,
    Observation,
    PolicyFormatError,
    PolicyModule,
)
from affordvla.policies.keypoints.processing import KeypointBatchCollator

# the heads an export may name: policy.json says which by class name, never by import path
KEYPOINT_HEADS: dict[str, type[KeypointHead]] = {cls.__name__: cls for cls in (KeypointTextHead,
                                                                                KeypointRegressionHead)}


def head_class(name: Any, where: str) -> type[KeypointHead]:
    if name not in KEYPOINT_HEADS:
        raise PolicyFormatError(f"{where}: head class {name!r} is not a keypoint head; expected one of "
                                f"{sorted(KEYPOINT_HEADS)}")
    return KEYPOINT_HEADS[name]


class KeypointPolicyModule(PolicyModule):
    """Backbone + KeypointHead. Validation and test score both heads with the same KeypointEvaluator, so
    keypoint_error, kalie_corrected/avg_mse etc. compare directly across heads. `centre_crop` is the evaluation
    view of the run's data (KALIE's centred crop), which inference applies to a user's full frames."""

    kind = "keypoints"
    sample_kind = "keypoints"
    head_part = "keypoint_head"

    def __init__(self, backbone: VLMBackbone, head: KeypointHead,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., Any] | None = None,
                 part_lr: dict[str, float] | None = None, freeze: list[str] | None = None,
                 head_lr: float | None = None, callbacks: Mapping[str, L.Callback | None] | None = None):
        if not isinstance(head, KeypointHead):
            raise TypeError(f"a keypoint policy needs a keypoint head (head=keypoint_text or keypoint_regression), "
                            f"got {type(head).__name__}")
        super().__init__(backbone, optimizer, scheduler, part_lr, freeze, head_lr, callbacks)
        self.head = head
        self.head.bind(backbone)
        self.evaluators: dict[str, KeypointEvaluator] = {}
        self.mean_keypoints: np.ndarray | None = None
        self.centre_crop: float | None = None

    # --- data ---------------------------------------------------------------------------------------------
    def make_collate(self) -> KeypointBatchCollator:
        return KeypointBatchCollator(self.backbone, self.head)

    def configure_from_metadata(self, metadata: dict[str, Any]) -> None:
        super().configure_from_metadata(metadata)
        self.centre_crop = metadata.get("eval_centre_crop")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            self.mean_keypoints = datamodule.train_keypoint_mean()
            self.head.match_point_count(datamodule.points_per_sample)

    # --- training -----------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        losses = self.head.losses(self.backbone, batch)
        batch_size = len(batch["samples"])
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=batch_size)
        every = self.trainer.log_every_n_steps  # type: ignore[attr-defined]  # set by Lightning's connector
        if self.trainer.global_step % every == 0:  # logging costs ~2% of a tiny step
            for name, value in losses.items():
                if name != "loss":
                    self.log(f"train/{name}", value, batch_size=batch_size)
        return losses["loss"]

    def head_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.head.parameters())

    # --- evaluation ---------------------------------------------------------------------------------------
    def _evaluate_batch(self, batch, split: str) -> None:
        losses, texts, points = self.head.evaluate(self.backbone, batch)
        self.log(f"{split}/loss", losses["loss"], batch_size=len(batch["samples"]), sync_dist=True)
        self.evaluators[split].add(batch["samples"], texts, points)

    def _start_eval(self, split: str) -> None:
        self.evaluators[split] = KeypointEvaluator(self.mean_keypoints, kalie_answers=self.head.kalie_answers)

    def _end_eval(self, split: str) -> None:
        metrics = self.evaluators[split].compute()
        self.last_metrics[split] = metrics
        for name, value in metrics.items():
            self.log(f"{split}/{name}", value, prog_bar=name == "keypoint_error", sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        self._start_eval("val")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate_batch(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval("test")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate_batch(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    # --- inference ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_observations(self, observations: Sequence[Observation], *, centre_crop: bool = True
                             ) -> list[KeypointPrediction]:
        """Points normalised to each observation's own frame. With `centre_crop` (and a run that evaluated on a
        centred crop) the head sees the crop, as in evaluation, and its points are mapped back to the frame;
        without, the frames are taken as the head's view already (an evaluation whose data crops them)."""
        observations = [Observation.coerce(o) for o in observations]
        if not observations:
            return []
        frames = [o.image_for(None) for o in observations]
        fraction = self.centre_crop if centre_crop else None
        boxes = [centre_crop_box(f.shape[1], f.shape[0], fraction) if fraction else (0, 0, f.shape[1], f.shape[0])
                 for f in frames]
        samples = [self.head.query_sample(np.ascontiguousarray(f[top:bottom, left:right]), o.instruction, o.task,
                                          o.objects)
                   for f, o, (left, top, right, bottom) in zip(frames, observations, boxes)]
        pixel_values = self.backbone.preprocess_images([s.image for s in samples]).to(self.device)
        texts, points = self.head.predict(self.backbone, pixel_values, samples)
        predictions = []
        for frame, text, found, (left, top, right, bottom) in zip(frames, texts, points, boxes):
            if found is None:
                predictions.append(KeypointPrediction((), np.zeros((0, 2), np.float32), text, parsed=False))
                continue
            found = np.asarray(found, np.float64)
            if fraction:  # from the crop's frame back to the observation's
                height, width = frame.shape[:2]
                found = (found * [right - left, bottom - top] + [left, top]) / [width, height]
            predictions.append(KeypointPrediction(self.head.names_for(len(found)), found.astype(np.float32),
                                                  text if self.head.writes_text else ""))
        return predictions

    @torch.no_grad()
    def answer_questions(self, images: list[np.ndarray], prompts: list[str], max_new_tokens: int | None = None
                         ) -> list[str]:
        """Greedy answers to a benchmark's ready-made questions (its own prompt text, e.g. Where2Place's), decoded
        as the head decodes (under the codec's grammar when constrained); `max_new_tokens` defaults to the head's
        answer budget. Only a head that writes its points as text can answer."""
        answer = getattr(self.head, "answer", None)
        if answer is None:
            raise ValueError(f"benchmark questions need a head that writes points as text (head=keypoint_text), "
                             f"not {type(self.head).__name__}")
        budget = max_new_tokens if max_new_tokens is not None else self.head.answer_budget
        if budget is None:
            raise ValueError("answering free-form questions needs max_new_tokens (or head.max_new_tokens) to bound "
                             "the answers")
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            pixel_values = self.backbone.preprocess_images(images).to(self.device)
            return answer(self.backbone, pixel_values, prompts, budget)
        finally:
            self.backbone.train(was_training)

    def readable(self, text: str) -> bool:
        """Whether the head's codec reads points out of an answer of `answer_questions`."""
        codec: Any = self.head.codec
        return codec.try_decode(text) is not None

    def describe(self) -> dict[str, Any]:
        return {"point_names": list(self.head.point_names), "centre_crop": self.centre_crop,
                "head_settings": self.head.settings()}

    # --- export -------------------------------------------------------------------------------------------
    def head_record(self) -> dict[str, Any]:
        return {"class": type(self.head).__name__, "settings": self.head.settings(),
                "point_names": list(self.head.point_names), "centre_crop": self.centre_crop}

    def head_state(self) -> dict[str, torch.Tensor]:
        return dict(self.head.state_dict())

    def load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        mine = self.head.state_dict()
        if set(state) != set(mine) or any(state[k].shape != v.shape for k, v in mine.items()):
            found = {k: tuple(v.shape) for k, v in state.items()}
            raise PolicyFormatError(f"the exported head weights {found} do not fit this {type(self.head).__name__} "
                                    f"({ {k: tuple(v.shape) for k, v in mine.items()} })")
        self.head.load_state_dict(state, strict=True)
