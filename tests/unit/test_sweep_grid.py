"""The sweep's pure logic (hf2mlflow/workflow/sweep_grid.py): which points a sweep config means, what each point's
conversion is, the Pareto front, and which point is picked and why."""

import pytest
import yaml

from hf2mlflow.config import SweepConfig, load_sweep, load_target, shipped
from hf2mlflow.errors import ConfigError
from hf2mlflow.workflow.sweep_grid import (BASE, REFERENCE, Measured, Point, failure_summary, pareto_front, pick,
                                           points, target_file)

BASE_TARGET, REFERENCE_TARGET = load_target("cpu-int4"), load_target("cpu-fp32")


def sweep(**fields) -> SweepConfig:
    return SweepConfig.model_validate({"name": "test", **fields})


def test_every_shipped_sweep_loads_and_its_points_are_valid_targets():
    for name in shipped("sweeps"):
        config = load_sweep(name)
        grid = points(config, load_target(config.base_target), load_target(config.reference_target), name)
        assert [p.key for p in grid[:2]] == [REFERENCE, BASE] and len(grid) > 2
        assert len({p.key for p in grid}) == len(grid)


def test_the_grid_is_every_combination_then_the_extra_points_without_repeats_or_the_base_again():
    config = sweep(grid={"builder_options.algo_config": ["k_quant", "rtn"], "builder_options.block_size": [32, 64]},
                   points=[{"builder_options.block_size": 64, "builder_options.algo_config": "rtn"},
                           {"session_options.allow_spinning": False}])
    grid = points(config, BASE_TARGET, REFERENCE_TARGET, "test.yaml")
    labels = [p.label for p in grid]
    # k_quant+32 is the base target itself (cpu-int4); rtn+64 given twice is one point.
    assert labels == ["reference (cpu-fp32)", "base (cpu-int4)", "algo_config=k_quant block_size=64",
                      "algo_config=rtn block_size=32", "algo_config=rtn block_size=64", "allow_spinning=false"]


def test_runtime_options_share_the_base_conversion_and_builder_options_do_not():
    config = sweep(points=[{"session_options.intra_op_num_threads": 1}, {"session_options.allow_spinning": False},
                           {"builder_options.block_size": 128}])
    _, base, threads, spinning, block = points(config, BASE_TARGET, REFERENCE_TARGET, "test.yaml")
    assert threads.conversion == spinning.conversion == base.conversion != block.conversion
    assert threads.target != base.target and threads.target["session_options"]["intra_op_num_threads"] == 1


def test_a_point_that_is_no_valid_target_stops_the_sweep_naming_the_point_and_what_is_allowed():
    config = sweep(points=[{"builder_options.block_size": 48}, {"builder_options.accuracy_level": 9}])
    with pytest.raises(ConfigError) as err:
        points(config, BASE_TARGET, REFERENCE_TARGET, "my-sweep.yaml")
    message = str(err.value)
    assert "my-sweep.yaml: 2 point(s)" in message and "point block_size=48" in message
    assert "16, 32, 64, 128 or 256" in message and "point accuracy_level=9" in message


@pytest.mark.parametrize("fields, fragment", [
    ({"points": [{"builder_options.blok_size": 64}]}, "unknown option(s) builder_options.blok_size"),
    ({"grid": {"builder_options.block_size": []}}, "list no values"),
    ({}, "needs a `grid` or `points`"),
    ({"points": [{"target.precision": "int8"}]}, "a sweep may vary: builder_options.block_size"),
])
def test_sweep_files_with_unknown_options_or_nothing_to_try_are_refused(tmp_path, fields, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(fields))
    with pytest.raises(ConfigError, match="bad.yaml") as err:
        load_sweep(str(path))
    assert fragment in str(err.value)


def test_a_target_file_is_named_for_its_content_and_loads_as_a_target(tmp_path):
    grid = points(sweep(points=[{"builder_options.block_size": 64}]), BASE_TARGET, REFERENCE_TARGET, "t")
    first = target_file(tmp_path, "cpu-int4", grid[2].target)
    assert target_file(tmp_path, "cpu-int4", grid[2].target) == first
    assert target_file(tmp_path, "cpu-int4", grid[1].target) != first
    assert load_target(str(first)).builder_options.block_size == 64


def measured(key, speed, prompts, agreement=1.0, examples=10, kld=0.1, top1=0.8) -> Measured:
    point = Point(key, key, {}, {}, {})
    return Measured(point, prompts / examples, examples, agreement, speed, 50.0, 100.0, 300.0,
                    {"decode": {"median": speed, "min": speed, "max": speed}}, kld, top1)


def test_the_pareto_front_holds_the_points_nothing_beats_on_both_axes():
    points_ = [measured(REFERENCE, 40, 9, kld=0.0), measured(BASE, 100, 8, kld=0.2), measured("a", 120, 8, kld=0.2),
               measured("b", 110, 7, kld=0.3), measured("c", 130, 5, kld=0.4)]
    assert [m.point.key for m in pareto_front(points_)] == [REFERENCE, "a", "c"]


def test_the_pick_is_the_fastest_point_within_the_teacher_forced_bound_and_says_why():
    config = sweep(points=[{"builder_options.block_size": 64}], quality={"max_mean_kld": 0.2,
                                                                         "min_top1_agreement": 0.7})
    points_ = [measured(REFERENCE, 40, 9, kld=0.0, top1=1.0), measured(BASE, 100, 8, kld=0.2),
               measured("a", 120, 6, kld=0.15), measured("fast-but-far", 150, 9, kld=0.35),
               measured("fast-but-disagreeing", 140, 9, kld=0.1, top1=0.6)]
    winner, reason = pick(points_, config)
    assert winner.point.key == "a"  # answers on 10 prompts are shown, not bound: 6 right against 9
    assert "fastest of 2 of 4 points within the quality bound" in reason and "1.20x the base" in reason
    assert "mean KLD 0.15 (<= 0.2), top-1 agreement 80.0% (>= 70.0%), contains 6.0/10 against the reference's 9.0" \
        in reason


def test_answers_on_the_dataset_may_bound_too():
    config = sweep(points=[{"builder_options.block_size": 64}],
                   quality={"max_mean_kld": None, "max_prompts_lost": 1, "min_greedy_agreement": 0.5})
    points_ = [measured(REFERENCE, 40, 9), measured(BASE, 100, 8), measured("a", 120, 8),
               measured("fast-but-wrong", 150, 7), measured("fast-but-diverging", 140, 9, agreement=0.2)]
    winner, reason = pick(points_, config)
    assert winner.point.key == "a" and "contains 8.0/10 against the reference's 9.0 (<= 1 prompt(s) lost)" in reason


def test_a_sweep_without_any_quality_bound_is_refused():
    with pytest.raises(ValueError, match="quality sets no bound"):
        sweep(points=[{"builder_options.block_size": 64}], quality={"max_mean_kld": None})


def test_no_pick_when_no_point_keeps_the_bound_and_the_reason_names_each_point():
    config = sweep(points=[{"builder_options.block_size": 64}], quality={"max_mean_kld": 0.05})
    winner, reason = pick([measured(REFERENCE, 40, 9, kld=0.0), measured(BASE, 100, 8, kld=0.2)], config)
    assert winner is None and reason.startswith("no point keeps the quality bound")
    assert "base: mean KLD 0.2 (> 0.05)" in reason


def test_at_equal_speed_the_closer_to_the_source_is_picked():
    config = sweep(points=[{"builder_options.block_size": 64}])
    winner, _ = pick([measured(REFERENCE, 40, 9, kld=0.0), measured(BASE, 100, 7, kld=0.2),
                      measured("better", 100, 8, kld=0.1)], config)
    assert winner.point.key == "better"


def test_a_failed_point_is_summed_up_by_its_step_and_the_exception_line_of_the_traceback():
    error = ("step convert_onnx failed in run abc: BuilderError: the model builder exited with status 1; its last "
             "output:\n  File \"weight_only.py\", line 123\n    packed_zp = np.reshape(...)\n"
             "ValueError: cannot reshape array of size 4320 into shape (960,newaxis)")
    assert failure_summary(error) == ("step convert_onnx failed in run abc: BuilderError: ValueError: cannot reshape "
                                      "array of size 4320 into shape (960,newaxis)")
    long = failure_summary("step evaluate failed in run abc: RuntimeError: " + "x" * 300 + " shape:{49152,288}", 60)
    assert long.startswith("step evaluate failed in run abc: RuntimeError: xx") and long.endswith("shape:{49152,288}")
    assert " ... " in long and len(long) < 120
