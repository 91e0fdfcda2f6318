"""The learning-rate schedule: linear warm-up, then constant, linear or cosine decay (per optimizer step)."""

import math

import pytest

from csd_ray.workers.trainer import lr_factor


@pytest.mark.parametrize("schedule, expected", [
    # warmup 2 of 6 steps: (s+1)/2 while warming up, then decay over the 4 remaining steps.
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]),
])
def test_lr_factor_warms_up_then_decays(schedule, expected):
    assert [lr_factor(s, 2, 6, schedule) for s in range(6)] == pytest.approx(expected, abs=1e-12)


def test_lr_factor_without_warmup_and_past_the_end():
    assert [lr_factor(s, 0, 4, "linear") for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert lr_factor(9, 0, 4, "linear") == 0.0 and lr_factor(9, 0, 4, "cosine") == pytest.approx(0.0)
    assert lr_factor(3, 5, 5, "cosine") == pytest.approx(4 / 5)  # all warm-up: no decay left
    assert lr_factor(7, 5, 5, "linear") == 1.0


def test_linear_decay_over_a_single_step_after_warmup():
    assert lr_factor(3, 2, 4, "linear") == 0.5  # (3 - 2) / (4 - 2)
    assert lr_factor(2, 1, 3, "linear") == 0.5 and lr_factor(1, 0, 2, "linear") == 0.5
    assert lr_factor(3, 2, 3, "linear") == 0.0  # one decay step: past it, nothing left
