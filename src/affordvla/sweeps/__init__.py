"""Hyper-parameter sweeps: the Optuna sweeper's search-space and study logic, and the Hydra callbacks that
prepare the shared MLflow store before a sweep and chart its runs after it."""
