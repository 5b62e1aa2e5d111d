"""Metrics: keypoint errors, KALIE's offline score, action errors, and the baselines they are reported against.

Pure scoring of predictions against targets, below the policies (which report them as validation metrics) and
the evaluation layer (which runs rollouts and benchmarks and reports them too).
"""
