"""`affordvla-eval`: evaluate a model directory, an MLflow run, or recorded results.

    affordvla-eval keypoints --model EXPORT_DIR [--data KALIE_ROOT] [--split test] [--codec ... to override]
    affordvla-eval keypoints --run-id ID [--tracking-uri URI]      (the run's exported model and dataset)
    affordvla-eval where2place --data W2P_ROOT (--model DIR | --answers answers.jsonl) [--mode compat|corrected]
    affordvla-eval kalie --predictions preds.jsonl --labels KALIE_ROOT|labels.json [--formatstyle json|str|array]
    affordvla-eval calvin --results results.json
    affordvla-eval rollout --model EXPORT_DIR --env toy|calvin|rlbench|simpler [--episodes N] [--chains N]
    affordvla-eval rollout --run-id ID [--log-to-run]            (the run's exported policy; log the metrics into it)

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

from affordvla.cli import console_command

log = logging.getLogger(__name__)


def _family(model_dir: Path) -> str:
    from affordvla.backbones.factory import family_of

    return family_of(model_dir)


def load_model(model_dir: str | Path, **kwargs):
    from affordvla.backbones.factory import load_backbone

    model_dir = Path(model_dir)
    backbone = load_backbone(_family(model_dir), str(model_dir), **kwargs)
    backbone.eval()
    return backbone


def _keypoint_settings(model_dir: Path, overrides: dict[str, Any] | None, run_config: dict[str, Any] | None):
    """The keypoint policy's record and settings, read without loading any weights. A folder with no policy
    record at all (a plain model, or an export older than its decoding record) is a version-0 keypoint-text model:
    decoded as the run's config beside it (or `run_config`) says, else as the flags say."""
    from affordvla.policies import keypoints
    from affordvla.policies.loading import LEGACY_FILES, POLICY_FILE, read_policy_record

    recorded = any((model_dir / name).is_file() for name in (POLICY_FILE, *LEGACY_FILES))
    record = read_policy_record(model_dir) if recorded else {"kind": "keypoints", "format_version": 0}
    if record["kind"] != "keypoints":
        raise ValueError(f"{model_dir} holds a policy of kind {record['kind']!r}: `keypoints` scores keypoint "
                         "policies (evaluate it with `affordvla-eval rollout`)")
    return record, keypoints.read_settings(model_dir, record, overrides, run_config)


def keypoint_settings(model_dir: str | Path, overrides: dict[str, Any] | None = None,
                      run_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """How a keypoint export decodes: as its run did, from the export's record (policy.json, or decoding.json of
    an older export), else from the run's resolved config (`run_config`, or the config_resolved.yaml beside an
    older export); `overrides` that are not None win. A model that records nothing needs `codec`."""
    return _keypoint_settings(Path(model_dir), overrides, run_config)[1].decoding


def evaluate_keypoints(model_dir: str | Path, data_root: str | Path | None = None, *, split: str = "test",
                       batch_size: int = 16, run_config: dict[str, Any] | None = None,
                       **overrides: Any) -> dict[str, float]:
    """KALIE keypoint metrics of an exported keypoint policy on a KALIE-format dataset split, beside the
    mean-keypoint baseline. It decodes as its run did (`keypoint_settings`); keyword arguments that are not None
    (codec, codec_kwargs, prompt_style, constrained, max_new_tokens, prefix_lm, centre_crop) override. The data
    defaults to the run's dataset (the export's dataset_metadata.json)."""
    from affordvla.data.datamodule import KalieDataModule
    from affordvla.metrics.keypoints import KeypointEvaluator
    from affordvla.policies import keypoints

    model_dir = Path(model_dir)
    _family(model_dir)  # a folder that is not a model fails here, before the settings are looked for
    record, settings = _keypoint_settings(model_dir, overrides, run_config)
    given = settings.given
    log.info("decoding settings %s (from %s%s)", json.dumps(settings.decoding, sort_keys=True),
             settings.source or "the flags", f"; flags override {given}" if given and settings.source else "")
    data_root = Path(data_root) if data_root is not None else _recorded_data_root(model_dir)
    if not data_root.is_dir():
        raise FileNotFoundError(f"--data {data_root}: no such dataset folder (a KALIE-format dataset: "
                                "data_jsonformat.json and imgs/)")
    policy = keypoints.build(model_dir, settings, record)
    # the dataset crops the images (and moves the labels) to the run's view, so the policy must not crop again
    data = KalieDataModule(str(data_root), generate=None, eval_centre_crop=settings.centre_crop)
    data.setup()
    if split not in data.splits:
        raise ValueError(f"{data_root} has no split {split!r}; it has {sorted(data.splits)}")
    evaluator = KeypointEvaluator(mean_keypoints=data.train_keypoint_mean(),
                                  kalie_answers=policy.module.head.kalie_answers)
    samples = [data.splits[split][i] for i in range(len(data.splits[split]))]
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        predictions = policy.predict([{"image": s.image, "instruction": s.instruction, "task": s.task,
                                       "objects": s.objects} for s in batch], centre_crop=False)
        evaluator.add(batch, [p.text for p in predictions], [p.points if p.parsed else None for p in predictions])
    return evaluator.compute()


def _recorded_data_root(model_dir: Path) -> Path:
    metadata = model_dir / "dataset_metadata.json"
    root = json.loads(metadata.read_text()).get("root") if metadata.is_file() else None
    if not root:
        raise ValueError(f"{model_dir} records no dataset (no root in {metadata.name}): pass --data")
    return Path(root)


def run_config(run_id: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """The resolved config an affordvla-train run logged (artifact run/config_resolved.yaml), read from the store
    every affordvla command uses unless `tracking_uri` names another; an absent store is refused, not created."""
    import tempfile

    from omegaconf import OmegaConf

    from affordvla.tracking.runs import get_run, open_store

    client = open_store(tracking_uri)
    get_run(client, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, "run/config_resolved.yaml", tmp)
        except Exception as exc:  # MLflow raises several types for a missing artifact
            raise ValueError(f"run {run_id} has no artifact run/config_resolved.yaml (not an affordvla-train run?): "
                             f"{exc}") from None
        return OmegaConf.to_container(OmegaConf.load(local))


def run_locations(run_id: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """The exported model, dataset root and resolved config of a keypoint-text training run."""
    config = run_config(run_id, tracking_uri)
    export_dir = config.get("export_dir")
    if not export_dir or not Path(export_dir).is_dir():
        raise ValueError(f"run {run_id} exported no model directory (export_dir={export_dir!r})")
    head = config.get("head") or {}
    if "codec" not in head:
        raise ValueError(f"run {run_id} trained {head.get('_target_')}, not the keypoint-text head: its test "
                         "metrics are logged in the run; `keypoints` scores text answers only")
    return {"model": export_dir, "data": (config.get("dataset") or {}).get("root"), "config": config}


def evaluate_where2place(data_root: str | Path, *, model_dir: str | Path | None = None,
                         answers_file: str | Path | None = None, mode: str = "compat",
                         max_new_tokens: int = 128, num_questions: int | None = None
                         ) -> tuple[dict[str, Any], list[dict]]:
    """Score recorded answers, or generate them with the model first (answers are returned for saving)."""
    from affordvla.evaluation.where2place import score_where2place

    if answers_file is not None:
        answers = read_answer_lines(answers_file)
    elif model_dir is not None:
        from affordvla.data.robopoint import read_where2place
        from affordvla.evaluation.benchmark_callbacks import answer_where2place
        from affordvla.heads.keypoint_text import KeypointTextHead

        backbone = load_model(model_dir)
        answers = answer_where2place(backbone, KeypointTextHead(codec="robopoint"), read_where2place(data_root),
                                     max_new_tokens)
    else:
        raise ValueError("where2place needs --model (generate answers) or --answers (score recorded ones)")
    result = score_where2place(data_root, answers, mode=mode, num_questions=num_questions)
    metrics = {"where2place_score": 100 * result.score, "scored": result.scored, "skipped": len(result.skipped),
               "skipped_questions": result.skipped,
               **{f"where2place_{c}": 100 * v for c, v in result.by_category.items()}}
    return metrics, answers


def read_answer_lines(path: str | Path) -> list:
    """An answers file as RoboPoint's `model_vqa` writes it: one JSON record per line. A blank line is an error
    naming it: RoboPoint's scorer json-loads every line, so it cannot score such a file either."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: answers file not found")
    answers = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            answers.append(json.loads(line))
        except json.JSONDecodeError as exc:
            what = "a blank line, not" if not line.strip() else "not"
            raise ValueError(f"{path}, line {number}: {what} a JSON record ({exc.msg})") from None
    return answers


def evaluate_kalie_predictions(predictions: str | Path, labels: str | Path, formatstyle: str = "json"
                               ) -> dict[str, Any]:
    """KALIE's offline scores of a predictions file, compat and corrected side by side (formats: the
    docstring of metrics/kalie_compat.py)."""
    from affordvla.metrics.kalie_compat import read_labels, read_predictions, score_predictions

    return score_predictions(read_predictions(predictions), read_labels(labels, formatstyle), formatstyle,
                             source=str(labels))


def load_action_policy(model_dir: str | Path, config: Any = None):
    """The exported action policy in `model_dir` (`load_policy`). `config` (the training run's resolved config:
    a path, or the config a run logged) rebuilds the head of an export written before policy.json recorded it."""
    from omegaconf import DictConfig, OmegaConf

    from affordvla.policies import load_policy, read_policy_record

    model_dir = Path(model_dir)
    record = read_policy_record(model_dir)
    if record["kind"] != "actions":
        raise ValueError(f"{model_dir} holds a {record['kind']} policy: rollouts need an action policy "
                         "(module=action_policy or module=language_actions)")
    if config is None or record["format_version"] != 0:
        return load_policy(model_dir)
    from affordvla.policies.actions import load

    if not isinstance(config, DictConfig):  # a run's config read from its store is passed as it is
        if not Path(config).is_file():
            raise FileNotFoundError(f"--config {config}: no such file (the training run's config_resolved.yaml)")
        config = OmegaConf.load(config)
    return load(model_dir, record, run_config=config)


class _CameraChecked:
    """A session acting for a rollout (the executed action), checking the first observation it gets against the
    cameras the policy was trained on."""

    def __init__(self, policy, execution: str, strict_size: bool):
        self.policy, self.session = policy, policy.session(execution=execution)
        self.strict_size, self.checked = strict_size, False

    def reset(self) -> None:
        self.session.reset()

    def act(self, observation: dict[str, Any]) -> np.ndarray:
        if not self.checked:
            from affordvla.evaluation.rollouts import check_cameras

            cameras = self.policy.module.dataset_metadata.get("cameras") or {}
            check_cameras(cameras if self.strict_size else {}, self.policy.camera, observation)
            self.checked = True
        return self.session.act(observation).executed


def evaluate_rollout(model_dir: str | Path, env_name: str, *, episodes: int = 0, chains: int = 0,
                     max_steps: int | None = None, seed: int = 0, execution: str = "first",
                     frames_dir: str | Path | None = None, config: str | Path | None = None,
                     data: str | None = None, task: str | None = None, subtasks: int = 5,
                     progress: bool = True):
    """Closed-loop rollouts of an exported policy: (metrics, RolloutReport)."""
    from affordvla.evaluation.rollouts import run_chains, run_episodes
    from affordvla.evaluation.simulators import (
        DEFAULT_MAX_STEPS,
        ENVIRONMENTS,
        make_env,
    )

    if env_name not in ENVIRONMENTS:
        raise ValueError(f"unknown environment {env_name!r}; valid: {list(ENVIRONMENTS)}")
    if episodes < 0 or chains < 0 or episodes + chains == 0:
        raise ValueError("rollout needs --episodes N and/or --chains N (N > 0)")
    policy = load_action_policy(model_dir, config=config)
    camera = policy.camera
    env = make_env(env_name, policy_camera=camera, data=data, task=task,
                   camera_size=(policy.module.dataset_metadata.get("cameras") or {}).get(camera))
    agent = _CameraChecked(policy, execution, strict_size=env_name == "toy")  # the toy world renders trained sizes
    steps = max_steps or DEFAULT_MAX_STEPS[env_name]
    try:
        with torch.inference_mode():
            report = run_episodes(agent, env, episodes, steps, seed, progress=progress, frames_dir=frames_dir,
                                  camera=camera) if episodes else None
            if chains:
                report = run_chains(agent, env, chains, steps, seed, subtasks, progress=progress,
                                    frames_dir=frames_dir, camera=camera, report=report)
    finally:
        if hasattr(env, "close"):
            env.close()
    return report.metrics(), report


def log_to_run(run_id: str, tracking_uri: str | None, metrics: dict[str, float], files: list[Path]) -> None:
    """Record rollout metrics (and image strips) in the training run, where affordvla-table reads them."""
    from affordvla.tracking.runs import get_run, open_store

    client = open_store(tracking_uri)
    get_run(client, run_id)
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))
    for path in files:
        client.log_artifact(run_id, str(path), "rollout")


@console_command("affordvla-eval")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="affordvla-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the metrics JSON here")
    commands = parser.add_subparsers(dest="command", required=True)
    keypoints = commands.add_parser("keypoints", help="KALIE keypoint errors of a model on a KALIE dataset")
    keypoints.add_argument("--model", help="an exported model folder (<run>/model); decoded as its run did")
    keypoints.add_argument("--data", help="a KALIE-format dataset (default: the run's dataset)")
    keypoints.add_argument("--run-id", help="an affordvla-train MLflow run: its exported model and dataset")
    keypoints.add_argument("--tracking-uri", help="the store holding --run-id (default: $AFFORDVLA_MLFLOW_URI, "
                           "else outputs/mlflow.db under $AFFORDVLA_ROOT or here, as affordvla-train writes)")
    keypoints.add_argument("--split", default="test")
    # decoding: the run's own settings (recorded in the export) unless given here
    keypoints.add_argument("--codec", choices=("paligemma_loc", "kalie_json", "robopoint"))
    keypoints.add_argument("--prompt-style", choices=("instruction", "kalie"))
    keypoints.add_argument("--constrained", action=argparse.BooleanOptionalAction,
                           help="decode through the codec's answer grammar (every answer parses)")
    keypoints.add_argument("--prefix-lm", action=argparse.BooleanOptionalAction,
                           help="PaliGemma's bidirectional attention over image and prompt")
    keypoints.add_argument("--centre-crop", type=float, help="evaluate on a centre crop of this fraction "
                           "(KALIE's 0.642857; 1 for the full image)")
    where = commands.add_parser("where2place", help="Where2Place accuracy (compat: the original scorer's numbers)")
    where.add_argument("--data", required=True)
    where.add_argument("--model")
    where.add_argument("--answers", help="answers JSON lines ({question_id, text}) to score instead of generating")
    where.add_argument("--mode", default="compat", choices=("compat", "corrected"))
    where.add_argument("--save-answers", help="write the generated answers here (JSON lines)")
    where.add_argument("--num-questions", type=int, help="score the first N questions only (the original's option)")
    kalie = commands.add_parser("kalie", help="KALIE's offline keypoint scores of a predictions file (compat and "
                                "corrected)")
    kalie.add_argument("--predictions", required=True, help='JSON list or JSON lines of {"id", "answer"}')
    kalie.add_argument("--labels", required=True, help='a KALIE dataset root, or a labels file ({id: label} or '
                       'records {"id", "label"})')
    kalie.add_argument("--formatstyle", default="json", choices=("json", "str", "array"),
                       help="how KALIE's calculate_errors reads answers and labels (its evaluation uses json)")
    calvin = commands.add_parser("calvin", help="CALVIN long-horizon metrics from recorded rollout results")
    calvin.add_argument("--results", required=True)
    rollout = commands.add_parser("rollout", help="closed-loop rollouts of an exported policy in a simulator")
    rollout.add_argument("--model", help="an exported policy directory (<run>/model)")
    rollout.add_argument("--run-id", help="an affordvla-train MLflow run: its exported policy and config")
    rollout.add_argument("--tracking-uri", help="the store holding --run-id (default: as affordvla-train writes)")
    rollout.add_argument("--config", help="the run's config_resolved.yaml, for an export older than policy.json's "
                         "format_version (default: the config beside it)")
    rollout.add_argument("--env", required=True, choices=("toy", "calvin", "rlbench", "simpler"))
    rollout.add_argument("--episodes", type=int, default=0, help="single-task episodes (success rate)")
    rollout.add_argument("--chains", type=int, default=0, help="CALVIN-style chains of --subtasks (1..5 in a row)")
    rollout.add_argument("--subtasks", type=int, default=5)
    rollout.add_argument("--max-steps", type=int, help="per episode / subtask (default: toy 40, calvin 360, 120)")
    rollout.add_argument("--seed", type=int, default=0, help="episode / chain i uses seed + i")
    rollout.add_argument("--execution", default="first", choices=("first", "ensemble"))
    rollout.add_argument("--frames", help="write image strips of the first rollouts here")
    rollout.add_argument("--results", help="write per-chain results here (JSON lines; `calvin --results` reads them)")
    rollout.add_argument("--data", help="calvin: the dataset root whose validation/ split the simulator loads")
    rollout.add_argument("--task", help="rlbench / simpler: the task to run")
    rollout.add_argument("--log-to-run", action="store_true", help="log the metrics (and strips) into --run-id")
    rollout.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "keypoints":
            metrics = _keypoints_command(args)
        elif args.command == "where2place":
            metrics, answers = evaluate_where2place(args.data, model_dir=args.model, answers_file=args.answers,
                                                    mode=args.mode, num_questions=args.num_questions)
            if args.save_answers:
                Path(args.save_answers).write_text("".join(json.dumps(a) + "\n" for a in answers))
        elif args.command == "kalie":
            metrics = evaluate_kalie_predictions(args.predictions, args.labels, args.formatstyle)
        elif args.command == "rollout":
            metrics = _rollout_command(args)
        else:
            from affordvla.evaluation.calvin import load_results, long_horizon_metrics

            metrics = long_horizon_metrics(load_results(args.results))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"affordvla-eval: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(metrics, indent=2, sort_keys=True)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


def _keypoints_command(args) -> dict[str, float]:
    if not args.model and not args.run_id:
        raise ValueError("keypoints needs --model (an exported model folder) or --run-id")
    if args.centre_crop is not None and not 0 < args.centre_crop <= 1:
        raise ValueError(f"--centre-crop {args.centre_crop}: expected a fraction in (0, 1]")
    model, data, config = args.model, args.data, None
    if args.run_id:
        found = run_locations(args.run_id, args.tracking_uri)
        model, data, config = model or found["model"], data or found["data"], found["config"]
    return evaluate_keypoints(model, data, split=args.split, run_config=config, codec=args.codec,
                              prompt_style=args.prompt_style, constrained=args.constrained,
                              prefix_lm=args.prefix_lm, centre_crop=args.centre_crop)


def _rollout_command(args) -> dict[str, float]:
    model, config = args.model, args.config
    if args.log_to_run and not args.run_id:
        raise ValueError("--log-to-run needs --run-id")
    if args.run_id:
        from omegaconf import OmegaConf

        recorded = run_config(args.run_id, args.tracking_uri)
        export_dir = recorded.get("export_dir")
        if not model and not (export_dir and Path(export_dir).is_dir()):
            raise ValueError(f"run {args.run_id} exported no policy directory (export_dir={export_dir!r})")
        model, config = model or export_dir, config or OmegaConf.create(recorded)
    if not model:
        raise ValueError("rollout needs --model or --run-id")
    if args.env != "toy":  # before loading the model: a missing simulator should cost nothing
        from affordvla.evaluation.calvin import require_simulator

        require_simulator(args.env)
    episodes = args.episodes if (args.episodes or args.chains) else 100
    metrics, report = evaluate_rollout(model, args.env, episodes=episodes, chains=args.chains,
                                       max_steps=args.max_steps, seed=args.seed, execution=args.execution,
                                       frames_dir=args.frames, config=config, data=args.data, task=args.task,
                                       subtasks=args.subtasks, progress=not args.no_progress)
    if args.results:
        report.write_results(args.results)
    if args.log_to_run:
        log_to_run(args.run_id, args.tracking_uri, metrics, report.strips)
    return metrics


if __name__ == "__main__":
    sys.exit(main())
