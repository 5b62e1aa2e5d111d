"""`hydra/sweeper=optuna`: the Hydra face of affordvla.sweeps.optuna_sweeper (where the logic and docs are)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


class OptunaSweeper(Sweeper):
    def __init__(self, storage: str | None, study_name: str, direction: str = "minimize", n_trials: int = 20,
                 n_jobs: int = 1, sampler: Any = None, params: Any = None):
        from affordvla.sweeps.optuna_sweeper import OptunaSweep

        if isinstance(params, DictConfig):
            params = OmegaConf.to_container(params, resolve=True)
        self.optuna = OptunaSweep(storage=storage, study_name=study_name, direction=direction, n_trials=n_trials,
                                 n_jobs=n_jobs, sampler=sampler, params=params)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None, "setup() first"
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        def launch(overrides: list[list[str]], first_job: int):
            self.validate_batch_is_legal(overrides)  # a bad override fails here, before any job starts
            return self.launcher.launch(overrides, initial_job_idx=first_job)

        return self.optuna.run(arguments, launch, sweep_dir)
