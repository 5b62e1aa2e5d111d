"""A loaded keypoint policy: batched `predict` and a stateless session (each step predicted on its own)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from affordvla.policies.base import KeypointPrediction, Observation, Policy, Session
from affordvla.policies.keypoints.modeling import KeypointPolicyModule


class KeypointPolicy(Policy):
    """Named points of an observation's image, normalised to that image. `decoding` holds the settings it decodes
    with (the run's, or the overrides it was loaded with)."""

    kind = "keypoints"
    module: KeypointPolicyModule

    def __init__(self, module: KeypointPolicyModule, record: dict[str, Any], source: Path | None = None,
                 decoding: dict[str, Any] | None = None):
        super().__init__(module, record, source)
        self.decoding = dict(decoding or {})

    def predict(self, observations: Sequence[Observation | Mapping[str, Any]], *,
                centre_crop: bool = True) -> list[KeypointPrediction]:
        """One prediction per observation. `centre_crop=False`: the images are the run's evaluation view already
        (an evaluation whose dataset crops them), so the recorded crop is not applied again."""
        with torch.inference_mode():
            return self.module.predict_observations([Observation.coerce(o) for o in observations],
                                                    centre_crop=centre_crop)

    def session(self, **options: Any) -> KeypointSession:
        if options:
            raise ValueError(f"a keypoint policy's session takes no options, got {sorted(options)}")
        return KeypointSession(self)


class KeypointSession(Session):
    """Closed-loop use of a keypoint policy: it keeps no history, so each act is a prediction of one."""

    def __init__(self, policy: KeypointPolicy):
        self.policy = policy

    def reset(self) -> None:
        """Nothing to forget: the head reads no earlier step."""

    def act(self, observation: Observation | Mapping[str, Any]) -> KeypointPrediction:
        return self.policy.predict([observation])[0]
