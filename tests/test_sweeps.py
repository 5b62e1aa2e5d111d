"""Sweeps: parallel joblib jobs on one MLflow sqlite store, the sweep comparison chart, the Optuna sweeper
(search space, persistent study), and the SLURM launcher config."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_train
from mlflow import MlflowClient

SMOKE = ["debug=smoke", "test=false", "export_dir=null", "callbacks.progress_bar.refresh_rate=0",
         "dataset.generate.image_size=64", "backbone.build=null"]


def _train_command(tmp_path: Path, backbone: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ, AFFORDVLA_ROOT=str(tmp_path), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    return [sys.executable, "-m", "affordvla.train", *args, *SMOKE, f"backbone.pretrained={backbone}"], env


def _run(command: list[str], env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


# --------------------------------------------------------------------------------------------------- joblib


@pytest.mark.slow
def test_parallel_joblib_sweep_records_every_run_in_one_store_and_charts_them(tmp_path, tiny_backbone_dir):
    """4 jobs, 2 at a time, on a store that does not exist yet: every run is recorded complete (no lost run,
    no 'database is locked', one experiment), and the sweep's comparison is logged as a run of its own."""
    command, env = _train_command(tmp_path, tiny_backbone_dir, "-m", "hydra/launcher=joblib",
                                  "hydra.launcher.n_jobs=2", "seed=1,2", "module.optimizer.lr=1e-3,3e-4")
    result = _run(command, env)
    assert "database is locked" not in result.stderr

    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    experiments = [e for e in client.search_experiments() if e.name.startswith("affordvla-train")]
    assert sorted(e.name for e in experiments) == ["affordvla-train", "affordvla-train-sweeps"]
    experiment_id = client.get_experiment_by_name("affordvla-train").experiment_id
    (sweep_dir,) = (tmp_path / "outputs" / "multirun" / "train").iterdir()
    jobs = client.search_runs([experiment_id], filter_string=f"tags.sweep_dir = '{sweep_dir.resolve()}'")
    assert len(jobs) == 4
    assert sorted(r.data.tags["sweep_job"] for r in jobs) == ["0", "1", "2", "3"]
    assert sorted((r.data.params["seed"], r.data.params["module.optimizer.lr"]) for r in jobs) == [
        ("1", "0.0003"), ("1", "0.001"), ("2", "0.0003"), ("2", "0.001")]
    for run in jobs:
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 4
        assert "val/keypoint_error" in run.data.metrics
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "run")}
        assert {"run/config_resolved.yaml", "run/metrics.json"} <= artifacts
        # each job wrote into its own numbered folder of the sweep
        assert (sweep_dir / run.data.tags["sweep_job"] / "metrics.json").is_file()

    # the comparison is a run of its own, beside (not among) the training runs
    assert not client.search_runs([experiment_id], filter_string="tags.sweep_summary_of LIKE '%'")
    sweeps = client.get_experiment_by_name("affordvla-train-sweeps")
    (summary,) = client.search_runs([sweeps.experiment_id])
    assert summary.data.tags["sweep_summary_of"] == str(sweep_dir.resolve())
    assert summary.info.run_name == f"sweep-train-{sweep_dir.name}"
    assert summary.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(summary.info.run_id, "sweep")} == {
        "sweep/sweep_summary.png", "sweep/sweep_summary.csv"}
    rows = list(csv.DictReader(open(client.download_artifacts(summary.info.run_id, "sweep/sweep_summary.csv",
                                                              str(tmp_path / "dl")))))
    assert [row["job"] for row in rows] == ["0", "1", "2", "3"]
    # labels name only what varies between the jobs
    assert rows[0]["label"] == "module.optimizer.lr=0.001 seed=1"
    by_run = {r.info.run_id: r.data.metrics["val/keypoint_error"] for r in jobs}
    for row in rows:
        assert float(row["val/keypoint_error"]) == pytest.approx(by_run[row["run_id"]])
    best = min(by_run.values())
    assert summary.data.metrics["best/val/keypoint_error"] == pytest.approx(best)
    png = Path(client.download_artifacts(summary.info.run_id, "sweep/sweep_summary.png", str(tmp_path / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_logger_and_store_preparation_survive_racing_processes(tmp_path):
    """Four processes create the store and the experiment at the same moment: one experiment, no error."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    script = ("import sys; from affordvla.tracking.mlflow_setup import prepare_experiment; "
              "print(prepare_experiment(sys.argv[1], 'racing'))")
    processes = [subprocess.Popen([sys.executable, "-c", script, uri], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err[-1500:] for _, err in outputs]
    ids = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(ids) == 1
    client = MlflowClient(uri)
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "racing"]
    assert client.get_experiment_by_name("racing").artifact_location == str(tmp_path / "mlartifacts" / "racing")


def test_the_default_logger_is_the_shared_store_logger(tmp_path):
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import MLFlowLogger

    from affordvla.tracking.mlflow_logger import SharedStoreMLFlowLogger

    cfg = compose_train([f"paths.root_dir={tmp_path}"], tmp_path / "run")
    logger = instantiate(cfg.logger.mlflow)
    assert isinstance(logger, SharedStoreMLFlowLogger) and isinstance(logger, MLFlowLogger)
    # the experiment exists before the first run is created: the store was prepared under the lock
    client = MlflowClient(cfg.paths.mlflow_uri)
    assert client.get_experiment_by_name("affordvla-train").experiment_id == logger._experiment_id
    logger.log_metrics({"x": 1.0}, step=0)
    assert client.get_run(logger.run_id).data.metrics["x"] == 1.0


def test_varying_overrides_label_only_what_changes():
    from affordvla.sweeps.report import varying_overrides

    jobs = [["debug=smoke", "seed=1", "lr=1"], ["debug=smoke", "seed=2", "lr=1"], ["debug=smoke", "seed=3", "lr=2"]]
    assert varying_overrides(jobs) == ["lr=1 seed=1", "lr=1 seed=2", "lr=2 seed=3"]
    assert varying_overrides([["a=1"], ["a=1"]]) == ["a=1", "a=1"]


# --------------------------------------------------------------------------------------------------- Optuna


def test_search_space_parses_the_override_grammar_exactly():
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    from affordvla.sweeps.optuna_sweeper import search_space

    params = {
        "module.optimizer.lr": "tag(log, interval(1e-5, 1e-3))",
        "module.optimizer.weight_decay": "interval(0.0, 0.1)",
        "dataset.batch_size": "tag(int, interval(2, 8))",
        "head.max_new_tokens": "tag(int, log, interval(1, 64))",
        "trainer.max_steps": "range(100, 1000, 300)",
        "module.dropout": "range(0.1, 0.5, 0.1)",
        "backbone": "choice(paligemma_tiny, llava_tiny)",
        "seed": "3",
    }
    fixed, space = search_space(params, ["head.prompt_style=instruction,kalie", "+extra.flag=choice(true, false)",
                                         "seed=5", "debug=smoke"])
    assert fixed == ["seed=5", "debug=smoke"]  # the command line wins over params for the same key
    dist = {name: dim.distribution for name, dim in space.items()}
    assert dist["module.optimizer.lr"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert dist["module.optimizer.weight_decay"] == FloatDistribution(0.0, 0.1)
    assert dist["dataset.batch_size"] == IntDistribution(2, 8)
    assert dist["head.max_new_tokens"] == IntDistribution(1, 64, log=True)
    assert dist["trainer.max_steps"] == IntDistribution(100, 700, step=300)  # range's values: 100, 400, 700
    lr = dist["module.dropout"]
    assert (lr.low, lr.high, lr.step, lr.log) == (0.1, pytest.approx(0.4), 0.1, False)
    assert dist["backbone"] == CategoricalDistribution(["paligemma_tiny", "llava_tiny"])
    assert dist["head.prompt_style"] == CategoricalDistribution(["instruction", "kalie"])
    assert dist["+extra.flag"] == CategoricalDistribution([True, False])
    # sampled values are written back as overrides Hydra reads as the same values
    assert space["module.optimizer.lr"].override(1.5e-05) == "module.optimizer.lr=1.5e-05"
    assert space["dataset.batch_size"].override(4) == "dataset.batch_size=4"
    assert space["+extra.flag"].override(False) == "+extra.flag=false"


def test_choice_values_round_trip_through_overrides():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from affordvla.sweeps.optuna_sweeper import search_space

    _, space = search_space({"a": "choice('x y', 'z', 1.5)"})
    assert space["a"].distribution.choices == ("x y", "z", 1.5)
    parser = OverridesParser.create()
    for value in space["a"].distribution.choices:
        assert parser.parse_override(space["a"].override(value)).value() == value


@pytest.mark.parametrize("text,message", [
    ("glob(*)", "cannot be searched"),
    ("tag(log, interval(0, 1))", "must start above 0"),
    ("tag(step, interval(0, 1))", "unknown tags"),
    ("tag(int, interval(0.5, 3))", "needs whole bounds"),
    ("interval(2, 1)", "is empty"),
])
def test_search_space_errors_name_the_parameter(text, message):
    from affordvla.sweeps.optuna_sweeper import SearchSpaceError, search_space

    with pytest.raises(SearchSpaceError, match=rf"^x: .*{message}"):
        search_space({"x": text})


def _job_return(value):
    from hydra.core.utils import JobReturn, JobStatus

    job = JobReturn()
    if isinstance(value, Exception):
        job.status, job._return_value = JobStatus.FAILED, value
    else:
        job.status, job._return_value = JobStatus.COMPLETED, value
    return job


def test_optuna_sweep_runs_batches_records_failures_and_continues_a_stored_study(tmp_path):
    import optuna

    from affordvla.sweeps.optuna_sweeper import OptunaSweep

    storage = f"sqlite:///{tmp_path}/studies/optuna.db"
    launched: list[tuple[int, list[list[str]]]] = []

    def launch(overrides, first_job):
        launched.append((first_job, overrides))
        values = []
        for job in overrides:
            x = float(next(o for o in job if o.startswith("x=")).split("=")[1])
            values.append(RuntimeError("diverged") if x > 0.9 else (x - 0.3) ** 2)
        return [_job_return(v) for v in values]

    def sweep(n_trials):
        return OptunaSweep(storage=storage, study_name="s", direction="minimize", n_trials=n_trials, n_jobs=2,
                           sampler=optuna.samplers.TPESampler(seed=0), params={"x": "interval(0, 1)"})

    first = sweep(5).run(["seed=1"], launch, tmp_path / "sweep")
    assert [(first_job, len(batch)) for first_job, batch in launched] == [(0, 2), (2, 2), (4, 1)]
    assert all(job[0] == "seed=1" for _, batch in launched for job in batch)
    assert (first["trials_before"], first["trials_after"]) == (0, 5)
    study = optuna.load_study(study_name="s", storage=storage)
    for trial in study.trials:
        x = trial.params["x"]
        if x > 0.9:
            assert trial.state == optuna.trial.TrialState.FAIL
        else:
            assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == pytest.approx((x - 0.3) ** 2)
        assert trial.user_attrs["overrides"][0] == "seed=1"
    assert (tmp_path / "sweep" / "optuna_results.yaml").is_file()
    second = sweep(3).run(["seed=1"], launch, None)
    assert (second["trials_before"], second["trials_after"]) == (5, 8)
    with pytest.raises(ValueError, match="was created to minimize"):
        OptunaSweep(storage=storage, study_name="s", direction="maximize", n_trials=1, n_jobs=1,
                    params={"x": "interval(0, 1)"}).run([], launch)


def test_a_sweep_whose_trials_all_fail_stops_with_an_error(tmp_path):
    from affordvla.sweeps.optuna_sweeper import OptunaSweep

    sweep = OptunaSweep(storage=None, study_name="s", direction="minimize", n_trials=2, n_jobs=1,
                        params={"x": "interval(0, 1)"})
    with pytest.raises(RuntimeError, match="all 2 trials of this sweep failed"):
        sweep.run([], lambda overrides, first: [_job_return(None) for _ in overrides])


@pytest.mark.slow
def test_optuna_sweeper_end_to_end_persists_and_continues_the_study(tmp_path, tiny_backbone_dir):
    """`-m hydra/sweeper=optuna`: trials run the real entrypoint, land in the sqlite study, a rerun adds more."""
    import optuna

    def sweep(n_trials: int) -> None:
        command, env = _train_command(
            tmp_path, tiny_backbone_dir, "-m", "hydra/sweeper=optuna", f"hydra.sweeper.n_trials={n_trials}",
            "hydra.sweeper.n_jobs=2", "hydra.sweeper.study_name=e2e",
            "module.optimizer.lr=tag(log, interval(1e-4, 1e-2))", "logger=none", "trainer.max_steps=2",
            "trainer.val_check_interval=2")
        _run(command, env)

    sweep(2)
    storage = f"sqlite:///{tmp_path}/outputs/optuna.db"
    trials = optuna.load_study(study_name="e2e", storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for trial in trials:  # the value told is the job's val/keypoint_error, from the job's own folder
        metrics = json.loads((Path(trial.user_attrs["job_dir"]) / "metrics.json").read_text())
        assert trial.value == pytest.approx(metrics["val/keypoint_error"])
        assert 1e-4 <= trial.params["module.optimizer.lr"] <= 1e-2
        assert f"module.optimizer.lr={trial.params['module.optimizer.lr']!r}" in trial.user_attrs["overrides"]
    sweep(1)
    trials = optuna.load_study(study_name="e2e", storage=storage).trials
    assert len(trials) == 3 and trials[2].state == optuna.trial.TrialState.COMPLETE


def test_the_optuna_sweeper_is_a_discoverable_hydra_plugin(tmp_path):
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    cfg = compose_train(["hydra/sweeper=optuna", f"paths.root_dir={tmp_path}"], tmp_path / "run")
    assert cfg.hydra.sweeper.storage == f"sqlite:///{tmp_path}/outputs/optuna.db"
    assert cfg.hydra.sweeper.study_name == "affordvla-train"
    names = {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Sweeper)}
    assert cfg.hydra.sweeper._target_ in names


# --------------------------------------------------------------------------------------------------- SLURM


def test_slurm_launcher_ties_tasks_and_gpus_to_the_trainer(tmp_path, monkeypatch):
    import submitit
    from omegaconf import OmegaConf

    monkeypatch.setenv("AFFORDVLA_SLURM_PARTITION", "gpu-long")
    monkeypatch.setenv("AFFORDVLA_SLURM_ACCOUNT", "robots")
    cfg = compose_train(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                         "hydra.launcher.timeout_min=600", f"paths.root_dir={tmp_path}"], tmp_path / "run")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["nodes"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == (2, 4, 4)
    assert (launcher["partition"], launcher["account"], launcher["timeout_min"]) == ("gpu-long", "robots", 600)
    # the parameters are ones submitit's SLURM executor accepts, and give the sbatch lines SLURM needs
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # no srun here
    # hand them to submitit the way the launcher plugin does: its shared keys as they are, the rest slurm_-prefixed
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in launcher.items()
                                  if k not in ("_target_", "submitit_folder", "max_num_timeout")})
    script = executor._executor._make_submission_file_text("python -c pass", "uid")
    for line in ("--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4", "--partition=gpu-long",
                 "--account=robots", "--time=600"):
        assert f"#SBATCH {line}" in script
