"""bench/quality.py's statistics and verdict lines on hand-made numbers (issue 12)."""

import importlib.util
import math

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mean_ci_is_the_student_t_interval(quality):
    mean, half = quality.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))  # t(0.975, df=2) = 4.303
    assert quality.mean_ci([5.0]) == (5.0, 0.0)
    assert quality.mean_ci([1.0, float("nan"), 3.0])[0] == 2.0  # NaN seeds are dropped
    assert all(math.isnan(x) for x in quality.mean_ci([]))


def test_table_names_the_winner_per_metric_and_says_when_it_is_not_separated(quality):
    metrics = list(quality.METRICS)
    seeds = [0, 1, 2]

    def curve(teacher_nll, distinct2):
        values = {m: [0.0] * 3 for m in metrics}
        values["teacher_nll"], values["distinct2"] = teacher_nll, distinct2
        return {0: {m: [0.0] * 3 for m in metrics}, 4: values}

    curves = {"rkl": curve([3.0, 3.1, 2.9], [0.20, 0.21, 0.19]),
              "csd_ts": curve([5.0, 5.1, 4.9], [0.30, 0.60, 0.90])}
    text = quality.table(curves, ["rkl", "csd_ts"], seeds, {}, 0.5)
    assert "- teacher NLL of samples: **RKL** 3.000 vs CSD (T,S) 5.000 (separated); best CSD: CSD (T,S) 5.000" in text
    assert "- distinct-2: **CSD (T,S)** 0.600 vs RKL 0.200 (not separated)" in text  # wide CSD interval
    assert "- accuracy: tie at 0.000 (RKL, CSD (T,S))" in text
    rkl_row = next(line for line in text.splitlines() if line.startswith("| RKL |"))
    assert "**3.000 ± 0.248**" in rkl_row and "**0.000" not in rkl_row  # no bold for a tie
