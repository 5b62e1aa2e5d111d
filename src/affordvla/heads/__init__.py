"""Output heads: how keypoints and actions are read from a model."""
