"""A Hydra sweeper on Optuna >= 4 with a persistent study.

hydra-optuna-sweeper pins optuna < 3, whose RDB storage fails under the SQLAlchemy 2 that MLflow needs, so the
project carries its own. Hydra only instantiates sweepers that live in the `hydra_plugins` namespace: the
plugin class is `hydra_plugins.affordvla_sweepers.optuna_sweeper.OptunaSweeper`, a thin shell around
`OptunaSweep` here (selected with `hydra/sweeper=optuna`, conf/hydra/sweeper/optuna.yaml).

The search space is written in Hydra's override grammar, in `hydra.sweeper.params` or on the command line:

    interval(a, b)               float uniform in [a, b]
    tag(log, interval(a, b))     float log-uniform
    tag(int, interval(a, b))     integer in [a, b] (add `log` for log-uniform integers)
    range(a, b[, step])          the values range() gives: integers, or floats on a grid
    choice(x, y, ...) / x,y,...  categorical
    anything else                fixed: passed to every trial unchanged

Trials run in batches of `n_jobs` through the configured launcher (basic: one after another; joblib: in
parallel), are told to the study as they return, and the study lives in `storage` under `study_name`: rerunning
with the same name continues it (the sampler sees every earlier trial) and adds `n_trials` more.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
)

log = logging.getLogger(__name__)

DIRECTIONS = ("minimize", "maximize")
_PRIMITIVE = (str, int, float, bool, type(None))


@dataclass
class Dimension:
    """One searched parameter: its Optuna distribution and how a sampled value is written as an override."""

    name: str
    distribution: Any  # optuna.distributions.BaseDistribution
    encoded: dict[Any, str] | None = None  # categorical value -> its override text (quoting as the user wrote)

    def override(self, value: Any) -> str:
        if self.encoded is not None:
            return f"{self.name}={self.encoded[value]}"
        return f"{self.name}={value!r}" if isinstance(value, float) else f"{self.name}={value}"


class SearchSpaceError(ValueError):
    """A parameter of the search space cannot be searched as written."""


def dimension(override: Override) -> Dimension:
    """The Optuna dimension a sweep override describes."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    name, value = override.get_key_element(), override.value()  # keeps a +/++ prefix
    if isinstance(value, IntervalSweep):
        unknown = set(value.tags) - {"log", "int"}
        if unknown:
            raise SearchSpaceError(f"{name}: unknown tags {sorted(unknown)} on interval(); use log and/or int")
        log_scale = "log" in value.tags
        if value.start is None or value.end is None or value.start >= value.end:
            raise SearchSpaceError(f"{name}: interval({value.start}, {value.end}) is empty")
        if log_scale and value.start <= 0:
            raise SearchSpaceError(f"{name}: a log interval must start above 0, not at {value.start}")
        if "int" in value.tags:
            if value.start != int(value.start) or value.end != int(value.end):
                raise SearchSpaceError(f"{name}: tag(int, interval({value.start}, {value.end})) needs whole bounds")
            return Dimension(name, IntDistribution(int(value.start), int(value.end), log=log_scale))
        return Dimension(name, FloatDistribution(float(value.start), float(value.end), log=log_scale))
    if isinstance(value, RangeSweep):
        values = list(override.sweep_iterator())
        if not values:
            raise SearchSpaceError(f"{name}: range({value.start}, {value.stop}, {value.step}) is empty")
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return Dimension(name, IntDistribution(values[0], values[-1], step=value.step))
        high = value.start + value.step * (len(values) - 1)  # the last grid point, not the exclusive stop
        return Dimension(name, FloatDistribution(float(value.start), float(high), step=float(value.step)))
    if isinstance(value, ChoiceSweep):
        # Hydra writes booleans back as True/False, which its own grammar reads as strings
        texts = [("true" if v else "false") if isinstance(v, bool) else text
                 for v, text in zip(value.list, override.sweep_string_iterator())]
        choices = list(value.list) if all(isinstance(v, _PRIMITIVE) for v in value.list) else texts
        if len(set(map(repr, choices))) != len(choices):
            raise SearchSpaceError(f"{name}: choice() lists a value twice: {texts}")
        return Dimension(name, CategoricalDistribution(choices), encoded=dict(zip(choices, texts)))
    raise SearchSpaceError(f"{name}: {type(value).__name__} sweeps cannot be searched; use interval(), range() or "
                           "choice()")


def search_space(params: dict[str, Any] | None,
                 arguments: Sequence[str] = ()) -> tuple[list[str], dict[str, Dimension]]:
    """(fixed overrides, searched dimensions by name) from the config's `params` (key -> override text) and the
    command line's overrides; the command line wins for a key given in both."""
    parser = OverridesParser.create()
    merged: dict[str, Override] = {}
    written = [f"{key}={value}" for key, value in (params or {}).items()]
    for override in parser.parse_overrides(written) + parser.parse_overrides(list(arguments)):
        merged[override.get_key_element().lstrip("+~")] = override  # `+a=...` replaces a written `a`
    fixed, space = [], {}
    for override in merged.values():
        key = override.get_key_element()
        if override.is_sweep_override():
            space[key] = dimension(override)
        else:
            fixed.append(override.input_line or f"{key}={override.get_value_element_as_str()}")
    return fixed, space


def open_study(storage: str | None, study_name: str, direction: str, sampler=None):
    """The study `study_name` in `storage` (a SQLAlchemy URL; None keeps it in memory), created on first use and
    continued afterwards. A stored study optimised the other way round is refused rather than mixed."""
    import optuna

    if direction not in DIRECTIONS:
        raise ValueError(f"hydra.sweeper.direction must be one of {DIRECTIONS}, not {direction!r}")
    if storage and storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        from affordvla.tracking.mlflow_setup import install_sqlite_busy_timeout

        install_sqlite_busy_timeout()  # several sweeps may share one study file
    study = optuna.create_study(storage=storage, study_name=study_name, sampler=sampler, direction=direction,
                                load_if_exists=True)
    stored = study.direction.name.lower()
    if stored != direction:
        raise ValueError(f"study {study_name!r} in {storage} was created to {stored}; this sweep asks to "
                         f"{direction} (choose another hydra.sweeper.study_name)")
    return study


def trial_value(job_return) -> float | None:
    """The number a finished job returned, None when it failed or returned nothing usable (the trial fails)."""
    try:
        value = job_return.return_value  # re-raises the job's exception
    except Exception as exc:
        log.warning("trial failed: %s: %s", type(exc).__name__, exc)
        return None
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        log.warning("trial returned %r, not a number: recorded as failed (is optimized_metric logged?)", value)
        return None
    return float(value)


class OptunaSweep:
    """The sweep loop: ask a batch of trials, launch them as Hydra jobs, tell the study what they returned."""

    def __init__(self, *, storage: str | None, study_name: str, direction: str, n_trials: int, n_jobs: int,
                 sampler=None, params: dict[str, Any] | None = None):
        if n_trials < 1 or n_jobs < 1:
            raise ValueError(f"n_trials ({n_trials}) and n_jobs ({n_jobs}) must be at least 1")
        self.storage, self.study_name, self.direction = storage, study_name, str(direction).lower()
        self.n_trials, self.n_jobs, self.sampler, self.params = n_trials, n_jobs, sampler, params

    def run(self, arguments: Sequence[str], launch: Callable[[list[list[str]], int], Sequence[Any]],
            sweep_dir: Path | None = None) -> Any:
        """`launch(overrides per job, first job number)` runs one batch and returns its JobReturns."""
        from optuna.trial import TrialState

        fixed, space = search_space(self.params, arguments)
        if not space:
            raise SearchSpaceError("the Optuna sweeper has nothing to search: give hydra.sweeper.params or "
                                   "command-line overrides such as "
                                   "'module.optimizer.lr=tag(log, interval(1e-5, 1e-3))'")
        study = open_study(self.storage, self.study_name, self.direction, self.sampler)
        before = len(study.trials)
        log.info("study %s (%s): %d earlier trials; searching %s", self.study_name, self.storage, before,
                 {k: type(d.distribution).__name__ for k, d in space.items()})
        distributions = {name: dim.distribution for name, dim in space.items()}
        job_index, completed = 0, 0
        while job_index < self.n_trials:
            batch = [study.ask(distributions) for _ in range(min(self.n_jobs, self.n_trials - job_index))]
            overrides = [fixed + [space[k].override(v) for k, v in trial.params.items()] for trial in batch]
            returns = launch(overrides, job_index)
            for trial, job_overrides, job_return in zip(batch, overrides, returns):
                trial.set_user_attr("overrides", job_overrides)
                if sweep_dir is not None:
                    trial.set_user_attr("job_dir", str(Path(sweep_dir) / str(job_index)))
                value = trial_value(job_return)
                if value is None:
                    study.tell(trial, state=TrialState.FAIL)
                else:
                    study.tell(trial, value)
                    completed += 1
                job_index += 1
        if completed == 0:
            raise RuntimeError(f"all {self.n_trials} trials of this sweep failed; see the job logs"
                               + (f" under {sweep_dir}" if sweep_dir else ""))
        best = study.best_trial
        summary = {"study_name": self.study_name, "storage": self.storage, "direction": self.direction,
                   "trials_before": before, "trials_after": len(study.trials), "best_value": best.value,
                   "best_params": best.params, "best_trial": best.number}
        if sweep_dir is not None:
            import yaml

            Path(sweep_dir).mkdir(parents=True, exist_ok=True)
            (Path(sweep_dir) / "optuna_results.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
        log.info("best trial #%d: %s = %s", best.number, best.params, best.value)
        return summary
