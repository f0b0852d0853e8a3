"""The Databricks emulator (tests/databricks_emulator.py) refuses job submissions that break the documented shapes."""

import json

import pytest

from hf2mlflow import PROJECT_ROOT
from tests.databricks_emulator import BadRequest, check_submit

CPU_SPEC = PROJECT_ROOT / "configs" / "databricks" / "cpu.json"


def test_the_emulator_checks_the_documented_shapes():
    good = {"run_name": "r", "new_cluster": json.loads(CPU_SPEC.read_text()), "libraries": [],
            "spark_python_task": {"python_file": "dbfs:/x.py", "parameters": ["a"]}}
    assert check_submit(good)["task"] == "spark_python_task"
    broken = [
        ({**good, "new_cluster": {**good["new_cluster"], "num_workers": "2"}}, "num_workers must be int"),
        ({**good, "new_cluster": {**good["new_cluster"], "autoscale": {"min_workers": 1, "max_workers": 2}}},
         "exactly one of num_workers and autoscale"),
        ({**good, "new_cluster": {**good["new_cluster"], "spark_vesion": "x"}}, "unknown field(s) ['spark_vesion']"),
        ({**good, "libraries": [{"pypi": {"pkg": "x"}}]}, "needs a 'package' string"),
        ({**good, "shell_command_task": {"command": ["true"]}}, "exactly one task"),
        ({**good, "spark_python_task": {"python_file": "x.py"}}, "must be a dbfs:/ or workspace path"),
        ({**good, "existing_cluster_id": "c"}, "exactly one of new_cluster and existing_cluster_id"),
    ]
    for body, message in broken:
        with pytest.raises(BadRequest) as caught:
            check_submit(body)
        assert message in str(caught.value), (message, str(caught.value))
