"""The one warm-up cosine schedule (affordvla.optim), in both of its shapes, against values computed by hand."""

import math

import pytest
import torch

from affordvla.optim import warmup_cosine


def _factor(total: int, **kwargs):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return warmup_cosine(optimizer, total, **kwargs).lr_lambdas[0]


def test_warm_up_then_cosine_over_the_rest_of_the_run():
    factor = _factor(10, warmup_fraction=0.2)  # 2 warm-up steps, then 8 of cosine
    assert [factor(0), factor(1)] == [0.5, 1.0]
    assert factor(2) == 1.0 and factor(6) == pytest.approx(0.5) and factor(10) == pytest.approx(0.0)


def test_the_pointing_shape_scales_a_cosine_that_spans_the_whole_run():
    factor = _factor(10, warmup_steps=2, cosine_from_start=True)
    assert factor(0) == 0.5 * 0.5 * (1 + math.cos(0.0))  # half of the warm-up times the cosine's start
    assert factor(1) == 1.0 * 0.5 * (1 + math.cos(math.pi * 1 / 10))
    assert factor(5) == pytest.approx(0.5) and factor(12) == pytest.approx(0.0)  # past the end: held at 0


def test_a_run_without_length_or_warm_up_is_refused():
    with pytest.raises(ValueError, match="max_steps > 0"):
        _factor(0)
    with pytest.raises(ValueError, match="warmup_steps must be >= 1"):
        _factor(10, warmup_steps=0)
