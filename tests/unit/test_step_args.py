"""How a step script reads its parameters (hf2mlflow/step_args.py): types, required fields, booleans as MLproject
passes them, misspelled names refused with the allowed ones."""

import pytest

from hf2mlflow.step_args import ConvertArgs, EvaluateArgs, MainArgs, parse_step_args


def test_defaults_and_types():
    args = parse_step_args(ConvertArgs, ["--memory_budget_gib", "12.5", "--model", "tiny-qwen2"], "convert_onnx")
    assert args == ConvertArgs(model="tiny-qwen2", memory_budget_gib=12.5)
    assert parse_step_args(MainArgs, ["--eval-limit", "3"], "main").eval_limit == 3  # dashes work too


@pytest.mark.parametrize("given, expected", [("true", True), ("False", False), ("1", True), ("no", False)])
def test_booleans_as_mlproject_passes_them(given, expected):
    assert parse_step_args(MainArgs, ["--force", given], "main").force is expected
    assert parse_step_args(MainArgs, ["--force"], "main").force is True


def test_a_required_field_must_be_given(capsys):
    with pytest.raises(SystemExit):
        parse_step_args(EvaluateArgs, [], "evaluate")
    assert "the following arguments are required: --models" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["--modle", "tiny-phi3"], "unknown argument(s) --modle tiny-phi3; allowed: --model, --target"),
    (["--modle", "tiny-phi3"], "(did you mean --model?)"),
    (["--memory_budget_gib", "lots"], "argument --memory_budget_gib/--memory-budget-gib: invalid float value: 'lots'"),
    (["--trust_remote_code", "maybe"], "got maybe but expected one of yes/no, true/false, t/f, y/n, 1/0"),
])
def test_bad_arguments_say_what_is_allowed(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_step_args(ConvertArgs, argv, "convert_onnx")
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err

