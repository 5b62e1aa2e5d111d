"""`affordvla-eval`: evaluate a model directory, an MLflow run, or recorded results.

    affordvla-eval keypoints --model DIR --data KALIE_ROOT [--split test] [--codec paligemma_loc]
    affordvla-eval keypoints --run-id ID [--tracking-uri URI]      (the run's exported model and dataset)
    affordvla-eval where2place --data W2P_ROOT (--model DIR | --answers answers.jsonl) [--mode compat|corrected]
    affordvla-eval calvin --results results.json

Every command prints one JSON object of metrics (and writes it to --out when given).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def _family(model_dir: Path) -> str:
    from affordvla.backbones.factory import FAMILIES
    from affordvla.backbones.llava.convert import is_original_llava

    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{model_dir} has no config.json: not a model directory")
    config = json.loads(config_file.read_text())
    family = "llava" if is_original_llava(config) else config.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"{config_file}: model_type {family!r} is not one of {sorted(FAMILIES)}")
    return family


def load_model(model_dir: str | Path, **kwargs):
    from affordvla.backbones.factory import load_backbone

    model_dir = Path(model_dir)
    backbone = load_backbone(_family(model_dir), str(model_dir), **kwargs)
    backbone.eval()
    return backbone


def evaluate_keypoints(model_dir: str | Path, data_root: str | Path, *, split: str = "test",
                       codec: str = "paligemma_loc", prompt_style: str = "instruction", batch_size: int = 16,
                       centre_crop: float | None = None, prefix_lm: bool | None = None) -> dict[str, float]:
    """KALIE keypoint metrics of a model on a KALIE-format dataset split, beside the mean-keypoint baseline."""
    from affordvla.data.datamodule import KalieDataModule
    from affordvla.evaluation.keypoints import KeypointEvaluator
    from affordvla.heads.keypoint_text import KeypointTextHead

    extra = {"prefix_lm": prefix_lm} if prefix_lm is not None else {}
    backbone = load_model(model_dir, **extra)
    head = KeypointTextHead(codec=codec, prompt_style=prompt_style)
    head.bind(backbone)
    data = KalieDataModule(str(data_root), generate=None, eval_centre_crop=centre_crop)
    data.setup()
    if split not in data.splits:
        raise ValueError(f"{data_root} has no split {split!r}; it has {sorted(data.splits)}")
    evaluator = KeypointEvaluator(mean_keypoints=data.train_keypoint_mean())
    samples = [data.splits[split][i] for i in range(len(data.splits[split]))]
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            pixels = backbone.preprocess_images([s.image for s in batch])
            texts, predictions = head.predict(backbone, pixels, batch)
            evaluator.add(batch, texts, predictions)
    return evaluator.compute()


def run_locations(run_id: str, tracking_uri: str) -> dict[str, Any]:
    """The exported model, dataset root and head settings recorded by a training run."""
    from mlflow import MlflowClient
    from omegaconf import OmegaConf

    client = MlflowClient(tracking_uri)
    local = client.download_artifacts(run_id, "run/config_resolved.yaml")
    config = OmegaConf.to_container(OmegaConf.load(local))
    export_dir = config.get("export_dir")
    if not export_dir or not Path(export_dir).is_dir():
        raise ValueError(f"run {run_id} exported no model directory (export_dir={export_dir!r})")
    return {"model": export_dir, "data": config["dataset"]["root"], "codec": config["head"]["codec"],
            "prompt_style": config["head"].get("prompt_style", "instruction"),
            "prefix_lm": config["backbone"].get("prefix_lm")}


def evaluate_where2place(data_root: str | Path, *, model_dir: str | Path | None = None,
                         answers_file: str | Path | None = None, mode: str = "compat",
                         max_new_tokens: int = 128) -> tuple[dict[str, Any], list[dict]]:
    """Score recorded answers, or generate them with the model first (answers are returned for saving)."""
    from PIL import Image

    from affordvla.data.robopoint import read_where2place
    from affordvla.evaluation.where2place import score_where2place

    questions = read_where2place(data_root)
    if answers_file is not None:
        lines = Path(answers_file).read_text(encoding="utf-8").splitlines()
        answers = [json.loads(line) for line in lines if line.strip()]
    elif model_dir is not None:
        backbone = load_model(model_dir)
        answers = []
        for question in questions:
            with Image.open(question.image_path) as im:
                pixels = backbone.preprocess_images([np.asarray(im.convert("RGB"))])
            (text,) = backbone.generate(pixels, [question.text], max_new_tokens=max_new_tokens)
            answers.append({"question_id": question.question_id, "text": text})
    else:
        raise ValueError("where2place needs --model (generate answers) or --answers (score recorded ones)")
    result = score_where2place(questions, answers, mode=mode)
    metrics = {"where2place_score": 100 * result.score, "scored": result.scored, "skipped": len(result.skipped),
               **{f"where2place_{c}": 100 * v for c, v in result.by_category.items()}}
    return metrics, answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="affordvla-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the metrics JSON here")
    commands = parser.add_subparsers(dest="command", required=True)
    keypoints = commands.add_parser("keypoints", help="KALIE keypoint errors of a model on a KALIE dataset")
    keypoints.add_argument("--model")
    keypoints.add_argument("--data")
    keypoints.add_argument("--run-id", help="an affordvla-train MLflow run: its exported model and dataset")
    keypoints.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    keypoints.add_argument("--split", default="test")
    keypoints.add_argument("--codec", default="paligemma_loc", choices=("paligemma_loc", "kalie_json", "robopoint"))
    keypoints.add_argument("--prompt-style", default="instruction", choices=("instruction", "kalie"))
    keypoints.add_argument("--centre-crop", type=float, help="evaluate on KALIE's centre crop (e.g. 0.642857)")
    where = commands.add_parser("where2place", help="Where2Place accuracy (compat: the original scorer's numbers)")
    where.add_argument("--data", required=True)
    where.add_argument("--model")
    where.add_argument("--answers", help="answers JSON lines ({question_id, text}) to score instead of generating")
    where.add_argument("--mode", default="compat", choices=("compat", "corrected"))
    where.add_argument("--save-answers", help="write the generated answers here (JSON lines)")
    calvin = commands.add_parser("calvin", help="CALVIN long-horizon metrics from recorded rollout results")
    calvin.add_argument("--results", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "keypoints":
            settings = {"codec": args.codec, "prompt_style": args.prompt_style, "prefix_lm": None}
            model, data = args.model, args.data
            if args.run_id:
                found = run_locations(args.run_id, args.tracking_uri)
                model, data = model or found["model"], data or found["data"]
                settings = {k: found[k] for k in ("codec", "prompt_style", "prefix_lm")}
            if not model or not data:
                raise ValueError("keypoints needs --model and --data, or --run-id")
            metrics = evaluate_keypoints(model, data, split=args.split, centre_crop=args.centre_crop, **settings)
        elif args.command == "where2place":
            metrics, answers = evaluate_where2place(args.data, model_dir=args.model, answers_file=args.answers,
                                                    mode=args.mode)
            if args.save_answers:
                Path(args.save_answers).write_text("".join(json.dumps(a) + "\n" for a in answers))
        else:
            from affordvla.evaluation.calvin import load_results, long_horizon_metrics

            metrics = long_horizon_metrics(load_results(args.results))
    except (ValueError, FileNotFoundError) as exc:
        print(f"affordvla-eval: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(metrics, indent=2, sort_keys=True)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
