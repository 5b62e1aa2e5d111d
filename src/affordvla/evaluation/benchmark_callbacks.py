"""Benchmarks scored at the end of a training run's test stage, as Lightning callbacks named in a config's
`callbacks` group, so a paper-table cell is one `affordvla-train` run that ends with the paper's figures.

`Where2PlaceCallback` answers every question of a Where2Place folder with
the trained backbone and keypoint-text head and scores the answers with evaluation/where2place.py:
`test/where2place` over all questions, `test/where2place_h` over the "unseen" category (Where2Place (h)), both
x100 like the paper, plus `test/where2place_parse_failure_rate` (answers the head's codec cannot read). The
answers are written as JSON lines beside the run and logged to MLflow, so any scorer can reread them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image

from affordvla.callbacks import log_artifact

log = logging.getLogger(__name__)


@torch.no_grad()
def answer_where2place(backbone, head, questions, max_new_tokens: int, batch_size: int = 8,
                       device: torch.device | str = "cpu") -> list[dict]:
    """The head's greedy answers (its own decoding, constrained when it is) to Where2Place questions, in file
    order, each with its question_id and category: what `affordvla-eval where2place` and the callback score."""
    answers = []
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        images = []
        for question in batch:
            with Image.open(question.image_path) as im:
                images.append(np.asarray(im.convert("RGB")))
        pixels = backbone.preprocess_images(images).to(device)
        texts = head.answer(backbone, pixels, [q.text for q in batch], max_new_tokens)
        answers.extend({"question_id": q.question_id, "text": t, "category": q.category}
                       for q, t in zip(batch, texts))
    return answers


class Where2PlaceCallback(L.Callback):
    """After testing, answers the Where2Place questions and scores them (compat or corrected rules), writing
    the answers and metrics to the output folder and the run."""

    def __init__(self, root: str, output_dir: str, mode: str = "compat", batch_size: int = 8,
                 max_new_tokens: int | None = None, metric_prefix: str = "test/where2place"):
        if mode not in ("compat", "corrected"):
            raise ValueError(f"Where2Place mode must be 'compat' or 'corrected', got {mode!r}")
        self.root = Path(root)
        self.output_dir = Path(output_dir)
        self.mode = mode
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.metric_prefix = metric_prefix

    def _max_new_tokens(self, head) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        configured = head.answer_budget  # the text head's setting, or its size derived during validation
        if configured is None:
            raise ValueError("Where2PlaceCallback needs max_new_tokens (or head.max_new_tokens) to bound answers")
        return configured

    @torch.no_grad()
    def answer(self, module) -> list[dict]:
        """Greedy answers of the module's backbone to every question, in file order, each with its question_id."""
        from affordvla.data.robopoint import read_where2place

        questions = read_where2place(self.root)
        backbone, head = module.backbone, module.head
        if not hasattr(head, "answer"):
            raise TypeError(f"Where2Place needs a head that writes points as text (head=keypoint_text), got "
                            f"{type(head).__name__}")
        max_new_tokens = self._max_new_tokens(head)
        was_training = backbone.training
        backbone.eval()
        try:
            return answer_where2place(backbone, head, questions, max_new_tokens, self.batch_size, module.device)
        finally:
            backbone.train(was_training)

    def score(self, answers: list[dict], head) -> dict[str, float]:
        from affordvla.evaluation.where2place import score_where2place

        result = score_where2place(self.root, answers, mode=self.mode)
        unreadable = sum(head.codec.try_decode(a["text"]) is None for a in answers)
        metrics = {self.metric_prefix: 100 * result.score,
                   f"{self.metric_prefix}_parse_failure_rate": unreadable / len(answers) if answers else 0.0,
                   f"{self.metric_prefix}_scored": float(result.scored),
                   f"{self.metric_prefix}_skipped": float(len(result.skipped))}  # compat: questions left out
        if "unseen" in result.by_category:
            metrics[f"{self.metric_prefix}_h"] = 100 * result.by_category["unseen"]
        return metrics

    def on_test_end(self, trainer: L.Trainer, module) -> None:
        if not trainer.is_global_zero:
            return
        answers = self.answer(module)
        metrics = self.score(answers, module.head)
        path = self.output_dir / "benchmarks" / "where2place_answers.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(a) + "\n" for a in answers), encoding="utf-8")
        # on_test_end may not call module.log: write to the loggers directly, and into callback_metrics, where
        # affordvla-train collects a run's metrics after trainer.test
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        log_artifact(trainer, path, "benchmarks")
        log.info("Where2Place (%s, %s): %s", self.root, self.mode,
                 json.dumps({k: round(v, 3) for k, v in metrics.items()}))
