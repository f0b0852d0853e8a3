"""batch_infer on a real local Spark (local[2], several partitions) with both flavors of the tiny model: every
input row comes out once, keyed by id, with its usage; bad rows and per-row model errors land in their own row, and
more failed rows than `max_error_share` allows (default none) fail the run after the answers are written."""

import json
import os
import sys

import mlflow
import pandas as pd
import pytest

from hf2mlflow.batch.step import OUTPUT_COLUMNS
from steps.batch_infer import main as batch_infer_main
from tests.support import local_store

ROWS = 24
PARTITIONS = 4
DEFAULT_MAX_TOKENS = 6


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = (SparkSession.builder.master("local[2]").appName("test_batch_infer")
               .config("spark.driver.memory", "2g")
               .config("spark.ui.enabled", "false")
               .config("spark.sql.shuffle.partitions", str(PARTITIONS))
               .config("spark.sql.warehouse.dir", str(tmp_path_factory.mktemp("warehouse")))
               .getOrCreate())
    yield session
    session.stop()


def _prompt(i):
    return [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": f"Question {i}?"}]


# Rows that must fail alone, by input position: what is wrong and the start of the error it must get.
BAD_ROWS = {
    3: ({"id": "q3"}, "bad request: 'messages' is required"),
    7: ({"id": "q7", "messages": "hello"}, "bad request: 'messages' must be a list"),
    11: ({"id": "q11", "messages": [{"role": "robot", "content": "hi"}]}, "bad request: messages[0].role"),
    15: ("this line is not JSON", "bad request: not valid JSON"),
    19: ({"id": "q19", "messages": _prompt(19), "max_tokens": -2}, "bad request: 'max_tokens' must be between"),
    # Valid for the schema, too long for the model's 2048-token context: the model's own error, for this row only.
    21: ({"id": "q21", "messages": [{"role": "user", "content": "word " * 3000}]}, "model error:"),
}


def _jsonl_rows():
    lines, expected = [], {}
    for i in range(ROWS):
        if i in BAD_ROWS:
            row, _ = BAD_ROWS[i]
            lines.append(row if isinstance(row, str) else json.dumps(row))
            expected[i] = (None if isinstance(row, str) else row.get("id"), None)
            continue
        row = {"id": f"q{i}", "messages": _prompt(i)}
        if i % 2 == 0:
            row["max_tokens"] = 1 + i % 5
        if i % 6 == 1:
            row["temperature"], row["seed"] = 0.8, i
        if i == 23:
            del row["id"]  # no id: the row is keyed by its input position
        lines.append(json.dumps(row))
        expected[i] = (row.get("id"), row.get("max_tokens", DEFAULT_MAX_TOKENS))
    return lines, expected


def _check_usage(frame: pd.DataFrame, max_tokens_by_id: dict):
    for _, r in frame.iterrows():
        assert r["total_tokens"] == r["prompt_tokens"] + r["completion_tokens"], r.to_dict()
        assert 1 <= r["completion_tokens"] <= max_tokens_by_id[r["id"]], r.to_dict()
        response = json.loads(r["response"])
        assert response["usage"]["completion_tokens"] == r["completion_tokens"]
        assert response["choices"][0]["message"]["content"] == r["answer"]
        assert r["latency_s"] > 0


def _run_metrics(run_id):
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["step"] == "batch_infer"
    return run


def test_pyfunc_jsonl_to_parquet_keeps_every_row(spark, logged, tmp_path):
    lines, expected = _jsonl_rows()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    output = tmp_path / "answers.parquet"
    with local_store(logged["root"]):
        summary = batch_infer_main(["--model", logged["uri"], "--input", str(prompts), "--output", str(output),
                                    "--partitions", str(PARTITIONS), "--max_tokens", str(DEFAULT_MAX_TOKENS),
                                    "--max_error_share", "0.25"])
        run = _run_metrics(summary["run_id"])
        errors_json = json.loads(open(mlflow.artifacts.download_artifacts(
            run_id=summary["run_id"], artifact_path="errors.json", dst_path=str(tmp_path))).read())

    # One Parquet part per partition: the rows really were scored in several Spark tasks.
    assert len(list(output.glob("part-*.parquet"))) == PARTITIONS
    frame = pd.read_parquet(output).sort_values("row")
    assert list(frame.columns) == OUTPUT_COLUMNS
    assert frame["row"].tolist() == list(range(ROWS))
    assert frame["id"].tolist() == [expected[i][0] or str(i) for i in range(ROWS)]

    bad = frame[frame["row"].isin(list(BAD_ROWS))]
    for _, r in bad.iterrows():
        assert r["error"].startswith(BAD_ROWS[r["row"]][1]), r["error"]
        assert pd.isna(r["answer"]) and pd.isna(r["completion_tokens"])
    assert "context length is 2048" in bad.set_index("row").loc[21, "error"]
    good = frame[~frame["row"].isin(list(BAD_ROWS))]
    assert good["error"].isna().all() and good["answer"].notna().all()
    _check_usage(good, {(expected[i][0] or str(i)): m for i, (_, m) in expected.items()})

    metrics = run.data.metrics
    assert metrics["rows_total"] == ROWS and metrics["rows_error"] == len(BAD_ROWS)
    assert metrics["rows_ok"] == ROWS - len(BAD_ROWS)
    assert metrics["completion_tokens"] == good["completion_tokens"].sum()
    assert metrics["prompt_tokens"] == good["prompt_tokens"].sum()
    assert metrics["completion_tokens_per_s"] == pytest.approx(metrics["completion_tokens"] / metrics["seconds"])
    assert metrics["rows_per_s"] == pytest.approx(ROWS / metrics["seconds"])
    assert run.data.tags["output_location"] == str(output)
    assert run.data.params["effective_partitions"] == str(PARTITIONS)
    assert [e["row"] for e in errors_json["first_errors"]] == sorted(BAD_ROWS)
    print(f"\nbatch_infer pyfunc: {ROWS} rows, {PARTITIONS} partitions, {metrics['seconds']:.1f} s, "
          f"{metrics['rows_per_s']:.2f} rows/s, {metrics['completion_tokens_per_s']:.1f} completion tokens/s")


def test_transformers_by_run_id_parquet_to_table_and_a_failed_row_fails_the_run(spark, logged, logged_transformers,
                                                                                 tmp_path, capsys):
    """By default (max_error_share 0) one failed row of 8 fails the run: FAILED, a non-zero exit, and a message
    naming how many rows failed and why; the answers are still written, and the failed rows logged."""
    # Typed columns as a table would have them: integer ids, max_tokens as a nullable double column.
    rows = [{"id": i, "messages": _prompt(i), "max_tokens": float(2 + i % 3) if i % 2 else None,
             "n": 2 if i == 5 else None} for i in range(8)]
    source = tmp_path / "requests.parquet"
    spark.createDataFrame(pd.DataFrame(rows)).repartition(2).write.parquet(str(source))
    with local_store(logged["root"]):
        run_id = mlflow.models.get_model_info(logged_transformers).run_id  # the log_transformers run
        with pytest.raises(SystemExit) as exit_info:
            batch_infer_main(["--model", run_id, "--input", str(source), "--output", "answers_transformers",
                              "--partitions", "3", "--max_tokens", "4"])
        (run,) = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
                  if r.data.tags.get("step") == "batch_infer" and r.data.tags.get("flavor") == "transformers"]
        errors_json = json.loads(open(mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="errors.json", dst_path=str(tmp_path))).read())
    assert exit_info.value.code != 0 and run.info.status == "FAILED"
    message = capsys.readouterr().err
    assert "1 of 8 rows failed (12.5%; max_error_share 0)" in message and "(id 5): model error:" in message
    assert "1 of 8 rows failed" in run.data.tags["error"]
    assert run.data.metrics["error_share"] == 0.125 and [e["id"] for e in errors_json["first_errors"]] == ["5"]

    frame = spark.table("answers_transformers").toPandas().sort_values("id", key=lambda s: s.astype(int))
    assert frame["id"].tolist() == [str(i) for i in range(8)]
    (refused,) = frame[frame["error"].notna()].itertuples()
    assert refused.id == "5" and refused.error.startswith("model error:")  # MLflow's wrapper refuses n > 1
    good = frame[frame["error"].isna()]
    _check_usage(good, {str(r["id"]): int(r["max_tokens"] or 4) for r in rows})
    assert sorted(frame["row"]) == list(range(8))
    assert run.data.metrics["rows_ok"] == 7 and run.data.metrics["completion_tokens"] == good["completion_tokens"].sum()


def test_bad_arguments_fail_before_spark_work(logged, tmp_path, capsys):
    taken = tmp_path / "taken.parquet"
    taken.mkdir()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    cases = [
        (["--model", logged["uri"], "--input", "prompts.csv", "--output", "o.parquet"],
         "input 'prompts.csv' is not allowed; allowed: a .jsonl file, a .parquet file or folder"),
        (["--model", logged["uri"], "--input", str(tmp_path / "missing.jsonl"), "--output", "o.parquet"],
         "missing.jsonl': no such file or folder"),
        (["--model", logged["uri"], "--input", str(prompts), "--output", str(taken)],
         "taken.parquet' exists; give a new path"),
        (["--model", logged["uri"], "--input", str(prompts), "--output", "o.parquet", "--max_error_share", "2"],
         "max_error_share 2.0 is not allowed; allowed: a share from 0 to 1"),
        (["--model", logged["convert_run_id"], "--input", str(prompts), "--output", str(tmp_path / "o.parquet")],
         f"model: run ID '{logged['convert_run_id']}' (convert_onnx run) holds no logged model"),
    ]
    with local_store(logged["root"]):
        for argv, message in cases:
            with pytest.raises(SystemExit):
                batch_infer_main(argv)
            assert message in capsys.readouterr().err
