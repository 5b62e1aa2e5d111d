"""A stand-in policy for the HTTP-layer tests of the server (bad requests, limits, keys), which need a server
but not a trained model: it answers deterministically from the image's mean colour. The end-to-end tests use real
exports (test_serve_e2e.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from affordvla.policies.base import ActionPrediction, KeypointPrediction, Observation, Policy, Session

NAMES = ("Grasp Point", "Function Point", "Target Point", "Pre-contact Point", "Post-contact Point")


def write_double(folder: Path, kind: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "double.json").write_text(json.dumps({"kind": kind}))
    return folder


class _Module(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))


class _Session(Session):
    def __init__(self):
        self.steps = 0

    def reset(self):
        self.steps = 0

    def act(self, observation):
        self.steps += 1
        frame = Observation.coerce(observation).image_for(None)
        return ActionPrediction(actions=np.full((2, 3), float(frame.mean()) + self.steps, dtype=np.float32))


class DoublePolicy(Policy):
    def __init__(self, kind: str, source: Path):
        super().__init__(_Module(), {"kind": kind, "format_version": 1}, source)
        self.kind = kind

    def predict(self, observations):
        out = []
        for obs in map(Observation.coerce, observations):
            mean = float(obs.image_for(None).mean()) / 255.0
            if self.kind == "keypoints":
                out.append(KeypointPrediction(NAMES, np.full((5, 2), mean, dtype=np.float32), text=f"{mean:.3f}"))
            else:
                out.append(ActionPrediction(actions=np.full((2, 3), mean, dtype=np.float32)))
        return out

    def session(self, **options):
        return _Session()

    def info(self):
        return {"kind": self.kind, "head": "double"}


def load(export_dir, device=None) -> Policy:
    path = Path(export_dir) / "double.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no double here")
    return DoublePolicy(json.loads(path.read_text())["kind"], Path(export_dir))


if __name__ == "__main__":  # python serve_double.py <root> <port> [limits as JSON]: a server of two doubles
    import sys

    from affordvla.serve.protocol import Limits
    from affordvla.serve.server import ServeSettings, serve

    root, port = Path(sys.argv[1]), int(sys.argv[2])
    limits = Limits(**json.loads(sys.argv[3])) if len(sys.argv) > 3 else Limits()
    models = {"kp": str(write_double(root / "kp", "keypoints")), "lstm": str(write_double(root / "act", "actions"))}
    serve(ServeSettings(models=models, port=port, accelerator="cpu", limits=limits, max_batch_size=4,
                        demo=True), loader="serve_double:load")
