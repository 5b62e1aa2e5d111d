"""affordvla: turn vision-language models into keypoint-affordance and action policies."""

__version__ = "0.1.0"
