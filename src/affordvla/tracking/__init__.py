"""Experiment tracking: MLflow setup, run records and the pictures logged with them."""
