"""Evaluation above the policies: rollouts in simulators, benchmark callbacks, Where2Place. The scores themselves
live in affordvla.metrics."""
