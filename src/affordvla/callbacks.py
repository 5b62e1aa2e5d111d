"""Lightning callbacks of the framework (checkpoint and RNG callbacks live in affordvla.checkpointing)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger

from affordvla.tracking.overlays import overlay_grid
from affordvla.tracking.run_record import LINEAGE_KEY

log = logging.getLogger(__name__)


def log_artifact(trainer: L.Trainer, path: Path, artifact_path: str | None = None) -> None:
    """Log a file to every MLflow logger of the trainer."""
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path)


class KeypointOverlayCallback(L.Callback):
    """After each validation and test: draw predicted vs true keypoints and log the picture."""

    def __init__(self, output_dir: str, max_images: int = 8, columns: int = 4):
        self.output_dir = Path(output_dir)
        self.max_images = max_images
        self.columns = columns

    def _draw(self, trainer: L.Trainer, module, split: str) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        evaluator = module.evaluators.get(split)
        if evaluator is None or not evaluator.kept:
            return
        kept = evaluator.kept[: self.max_images]
        items = [(p.sample.image, p.sample.keypoints, p.keypoints, p.sample.task) for p in kept]
        grid = overlay_grid(items, kept[0].sample.point_names, columns=self.columns)
        path = self.output_dir / "overlays" / f"{split}_step{trainer.global_step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        log_artifact(trainer, path, "overlays")

    def on_validation_epoch_end(self, trainer, module) -> None:
        self._draw(trainer, module, "val")

    def on_test_epoch_end(self, trainer, module) -> None:
        self._draw(trainer, module, "test")


class ActionTraceCallback(L.Callback):
    """After each validation and test of a policy: plot predicted vs true actions, dimension by dimension, over
    the first `frames` validation frames (consecutive frames of the first episodes), and log the picture."""

    def __init__(self, output_dir: str, frames: int = 96):
        self.output_dir = Path(output_dir)
        self.frames = frames

    def _draw(self, trainer: L.Trainer, module, split: str) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        predictions = getattr(module, "last_predictions", {}).get(split)
        if predictions is None:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        predicted, target, _ = (a[: self.frames] for a in predictions)
        dims = predicted.shape[-1]
        figure, axes = plt.subplots(dims, 1, figsize=(8, 1.4 * dims), sharex=True)
        for d, axis in enumerate(axes):
            axis.plot(target[:, d], color="black", linewidth=1.2, label="true")
            axis.plot(predicted[:, d], color="tab:red", linewidth=1.0, label="predicted")
            axis.set_ylabel("gripper" if d == dims - 1 else f"a{d}", rotation=0, labelpad=18)
        axes[0].legend(loc="upper right", fontsize=7, ncol=2)
        axes[-1].set_xlabel(f"{split} frame")
        figure.tight_layout()
        path = self.output_dir / "action_traces" / f"{split}_step{trainer.global_step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=80)
        plt.close(figure)
        log_artifact(trainer, path, "action_traces")

    # the *_end hooks run after the module's epoch-end hooks, which compute the predictions
    def on_validation_end(self, trainer, module) -> None:
        self._draw(trainer, module, "val")

    def on_test_end(self, trainer, module) -> None:
        self._draw(trainer, module, "test")


class StopAfterSteps(L.Callback):
    """Ends training after `steps` optimiser steps while the schedule still plans for `trainer.max_steps`, as
    when a job is pre-empted: resuming from its last checkpoint must then reproduce the uninterrupted run."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


class RunLineageCallback(L.Callback):
    """Records in every checkpoint which run wrote it: the run folder, the MLflow run (id, store, config hash) and
    the checkpoint that run itself resumed from. A run resumed from the checkpoint reads this back to continue the
    same MLflow run (or a child of it) and to name its parent folder in run_info.json."""

    def __init__(self, run_dir: str):
        self.run_dir = str(run_dir)

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        lineage = {"run_dir": self.run_dir, "resumed_from": str(trainer.ckpt_path) if trainer.ckpt_path else None}
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger) and trainer.is_global_zero:
                lineage.update(mlflow_run_id=logger.run_id, tracking_uri=logger.experiment.tracking_uri,
                               config_hash=(logger.tags or {}).get("config_hash"))
        checkpoint[LINEAGE_KEY] = lineage
