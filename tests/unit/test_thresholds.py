"""One comparison of a figure with its threshold (hf2mlflow/thresholds.py `within`) for the gate, the quality
floors and the sweep's bound: a figure that is missing, NaN or infinite never passes."""

import pytest

from hf2mlflow.quality import floor_problems
from hf2mlflow.thresholds import within
from hf2mlflow.workflow.sweep_grid import BASE, REFERENCE, pick, within_bound
from tests.unit.test_sweep_grid import measured, sweep

NOT_FINITE = [None, float("nan"), float("inf"), float("-inf")]


def test_within_compares_in_the_direction_of_the_threshold():
    assert within(0.3, 0.3, greater_is_better=False) and not within(0.31, 0.3, greater_is_better=False)
    assert within(0.9, 0.9, greater_is_better=True) and not within(0.89, 0.9, greater_is_better=True)
    assert within(0.3 + 1e-13, 0.3, greater_is_better=False, tolerance=1e-12)


@pytest.mark.parametrize("value", NOT_FINITE)
@pytest.mark.parametrize("greater_is_better", [True, False])
def test_a_figure_that_is_missing_or_not_finite_is_never_within(value, greater_is_better):
    assert not within(value, 0.5, greater_is_better)


@pytest.mark.parametrize("figure", ["mean_kld", "top1_agreement"])
def test_a_quality_floor_rejects_a_figure_that_is_not_finite(figure):
    summary = {"mean_kld": 0.1, "top1_agreement": 0.9, figure: float("nan")}
    name = "mean KL divergence" if figure == "mean_kld" else "top-1 agreement"
    assert floor_problems(summary, 0.3, 0.7) == [f"{name} not measured (not finite: nan)"]
    assert floor_problems({k: v for k, v in summary.items() if k != figure}, 0.3, 0.7) == [
        f"{name} not measured (missing)"]


def test_the_sweep_bound_rejects_a_point_whose_figure_is_not_finite():
    config = sweep(points=[{"builder_options.block_size": 64}], quality={"max_mean_kld": 0.3,
                                                                         "min_top1_agreement": 0.7})
    reference = measured(REFERENCE, 40, 9, kld=0.0, top1=1.0)
    nan_kld, nan_top1 = measured("a", 120, 9, kld=float("nan")), measured("b", 130, 9, top1=float("nan"))
    assert not within_bound(nan_kld, reference, config)[0] and not within_bound(nan_top1, reference, config)[0]
    winner, _ = pick([reference, measured(BASE, 100, 8, kld=0.2), nan_kld, nan_top1], config)
    assert winner.point.key == BASE
