"""Metrics: keypoint errors, KALIE's offline score, and the baselines they are reported against."""
