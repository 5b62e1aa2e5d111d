"""affordvla's Hydra plugins. Hydra only instantiates sweepers and launchers from the `hydra_plugins` namespace
package, and imports every module in it at start-up: keep these modules light (no optuna import here)."""
