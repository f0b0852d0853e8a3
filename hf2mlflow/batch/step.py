"""The batch_infer step: answer a file or table of chat requests on Spark with a logged chat model.

The model (either flavor, a run ID or model URI) is wrapped in hf2mlflow/runtime/batch_chat_model.py, which answers
row by row so that bad rows and per-row model errors land in an `error` column, and scored through
mlflow.pyfunc.spark_udf: in local mode here, on the cluster's executors on Databricks, with the same code.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import mlflow

from hf2mlflow.errors import ConfigError, StepError
from hf2mlflow.runtime import RUNTIME_DIR, runtime_code_path
from hf2mlflow.tracking import print_run_summary, step_run
from hf2mlflow.step_args import BATCH_FORMATS, BatchInferArgs

STEP = "batch_infer"
WRAPPER_CODE = RUNTIME_DIR / "batch_chat_model.py"
TABLE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*){0,2}$")  # name, schema.name or catalog.schema.name
# A dotted name ending like a data file is a file name, not schema.table (a .csv is not a table to read).
FILE_SUFFIXES = ("csv", "tsv", "txt", "json", "jsonl", "parquet", "avro", "orc", "xlsx", "xml")
RESULT_SCHEMA = ("answer STRING, finish_reason STRING, prompt_tokens BIGINT, completion_tokens BIGINT, "
                 "total_tokens BIGINT, latency_s DOUBLE, error STRING, response STRING")
OUTPUT_COLUMNS = ["row", "id", "answer", "finish_reason", "prompt_tokens", "completion_tokens", "total_tokens",
                  "latency_s", "error", "response"]
MAX_LOGGED_ERRORS = 100


def _kind(location: str, what: str) -> str:
    lowered = location.rstrip("/").lower()
    if lowered.endswith((".jsonl", ".json")):
        return "jsonl"
    if lowered.endswith(".parquet"):
        return "parquet"
    if TABLE_NAME.match(location) and location.rsplit(".", 1)[-1].lower() not in FILE_SUFFIXES \
            and not os.path.exists(location):
        return "table"
    raise ConfigError(f"{what} '{location}' is not allowed; allowed: {BATCH_FORMATS}")


def _is_local(path: str) -> bool:
    return "://" not in path and not path.startswith(("dbfs:", "file:"))


def check_args(args: BatchInferArgs) -> tuple[str, str]:
    """Everything that can be checked before Spark starts; returns the input and output kinds."""
    if args.max_tokens < 0 or args.partitions < 0:
        raise ConfigError("max_tokens and partitions must be 0 (the default) or positive")
    if not 0.0 <= args.max_error_share <= 1.0:
        raise ConfigError(f"max_error_share {args.max_error_share} is not allowed; allowed: a share from 0 to 1")
    input_kind, output_kind = _kind(args.input, "input"), _kind(args.output, "output")
    if output_kind == "jsonl":
        raise ConfigError(f"output '{args.output}' is not allowed; allowed: a .parquet folder or a Spark table name")
    if input_kind != "table" and _is_local(args.input) and not os.path.exists(args.input):
        raise ConfigError(f"input '{args.input}': no such file or folder")
    if output_kind == "parquet" and _is_local(args.output) and os.path.exists(args.output):
        raise ConfigError(f"output '{args.output}' exists; give a new path (answers are never written over)")
    return input_kind, output_kind


def resolve_model(ref: str):
    """A chat model of this project, by run ID or URI (evaluate's rules: the same models, the same checks)."""
    from hf2mlflow.logged_models import resolve

    return resolve(ref, key="model")


def spark_session(master: str):
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None and not master:
        return active
    builder = SparkSession.builder.appName(STEP)
    if master:
        builder = builder.master(master)
    if not master or master.startswith("local"):
        # Python workers of a local Spark must be this interpreter (with this environment's packages).
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        builder = builder.config("spark.ui.showConsoleProgress", "true")
    return builder.getOrCreate()


def _default_parallelism(spark) -> int:
    try:
        return spark.sparkContext.defaultParallelism
    except Exception:  # Spark Connect (Databricks shared and serverless compute) has no SparkContext
        return int(spark.conf.get("spark.sql.shuffle.partitions", "8"))


def _read(spark, location: str, kind: str):
    """The requests as (row, id, request): row is the 0-based input position, request one JSON object."""
    from pyspark.sql import functions as F
    from pyspark.sql.utils import AnalysisException

    try:
        if kind == "jsonl":
            # Lines as text, not spark.read.json: one malformed line must not change how the others are read.
            frame = spark.read.text(location)
            frame = frame.select(F.get_json_object("value", "$.id").alias("id"), F.col("value").alias("request"))
        else:
            frame = spark.read.parquet(location) if kind == "parquet" else spark.table(location)
            rest = [c for c in frame.columns if c != "id"]
            if not rest:
                raise ConfigError(f"input '{location}' has no columns besides id; rows need 'messages'")
            id_column = F.col("id").cast("string") if "id" in frame.columns else F.lit(None).cast("string")
            frame = frame.select(id_column.alias("id"), F.to_json(F.struct(*rest)).alias("request"))
    except AnalysisException as exc:
        raise StepError(f"input '{location}' cannot be read as {kind}: {str(exc).splitlines()[0]}") from None
    return _with_positions(frame)


def _with_positions(frame):
    """Add `row`, the 0-based input position, with DataFrame operations only (no RDDs: Spark Connect and
    Databricks shared clusters have none): monotonically_increasing_id is (partition << 33) + position in
    the partition, and the sizes of the partitions before give the offset."""
    from pyspark.sql import functions as F

    frame = frame.withColumn("_partition", F.spark_partition_id()).withColumn("_mid", F.monotonically_increasing_id())
    sizes = dict(frame.groupBy("_partition").count().collect())
    offsets, total = {}, 0
    for partition in sorted(sizes):
        offsets[partition], total = total, total + sizes[partition]
    offset = F.create_map(*[F.lit(x) for p, o in offsets.items() for x in (p, o)]) if offsets else F.lit(None)
    row = (F.col("_mid") - F.shiftleft(F.col("_partition").cast("long"), 33) + offset[F.col("_partition")])
    frame = frame.withColumn("row", row.cast("long"))
    frame = frame.withColumn("id", F.coalesce("id", F.col("row").cast("string")))
    return frame.select("row", "id", "request"), total


def _wrapper_model(model_uri: str, max_tokens: int, work: Path) -> str:
    """The row-by-row wrapper around the model, saved locally; spark_udf ships it to the executors."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    path = work / "batch_model"
    mlflow.pyfunc.save_model(
        path=str(path), python_model=str(WRAPPER_CODE), artifacts={"model": model_uri},
        code_paths=[runtime_code_path(work)], model_config={"max_tokens": max_tokens},
        signature=ModelSignature(inputs=Schema([ColSpec("string", "request")]),
                                 outputs=Schema([ColSpec("string", "result")])))
    return str(path)


def _write(frame, location: str, kind: str) -> None:
    from pyspark.sql.utils import AnalysisException

    try:
        if kind == "parquet":
            frame.write.mode("errorifexists").parquet(location)
        else:
            frame.write.mode("errorifexists").saveAsTable(location)
    except AnalysisException as exc:
        raise StepError(f"output '{location}' cannot be written: {str(exc).splitlines()[0]}") from None


def _summary(spark, location: str, kind: str) -> dict:
    from pyspark.sql import functions as F

    written = spark.read.parquet(location) if kind == "parquet" else spark.table(location)
    totals = written.agg(
        F.count("*").alias("rows"), F.count("answer").alias("ok"), F.count("error").alias("errors"),
        F.coalesce(F.sum("prompt_tokens"), F.lit(0)).alias("prompt_tokens"),
        F.coalesce(F.sum("completion_tokens"), F.lit(0)).alias("completion_tokens"),
        F.coalesce(F.sum("total_tokens"), F.lit(0)).alias("total_tokens"),
        F.percentile_approx("latency_s", 0.5).alias("latency_p50"),
        F.percentile_approx("latency_s", 0.95).alias("latency_p95")).first().asDict()
    errors = [r.asDict() for r in written.where(F.col("error").isNotNull()).orderBy("row")
              .select("row", "id", "error").limit(MAX_LOGGED_ERRORS).collect()]
    return {**totals, "error_rows": errors}


def batch_infer(args: BatchInferArgs) -> dict:
    """Score every input row; returns the summary logged to the run (rows, ok, errors, tokens, seconds)."""
    input_kind, output_kind = check_args(args)
    model = resolve_model(args.model)
    print(f"[{STEP}] model {model.name} ({model.flavor}, {model.uri})")

    tags = {"model_uri": model.uri, "model": model.name, "flavor": model.flavor, "output": args.output,
            "input_format": input_kind, "output_format": output_kind}
    params = dataclasses.asdict(args)
    with step_run(STEP, f"{STEP}-{model.name}", tags, params) as run, \
            tempfile.TemporaryDirectory(prefix=f"{STEP}-") as work:
        print(f"[{STEP}] 1/4 starting Spark")
        spark = spark_session(args.spark_master)
        if output_kind == "table" and spark.catalog.tableExists(args.output):
            raise ConfigError(f"output table '{args.output}' exists; give a new name (answers are never written over)")
        if input_kind == "table" and not spark.catalog.tableExists(args.input):
            raise ConfigError(f"input table '{args.input}' does not exist")

        print(f"[{STEP}] 2/4 reading {input_kind} {args.input}")
        requests, rows = _read(spark, args.input, input_kind)
        if rows == 0:
            raise StepError(f"input '{args.input}' has no rows")
        partitions = args.partitions or _default_parallelism(spark)
        requests = requests.repartition(partitions)
        mlflow.log_params({"rows": rows, "effective_partitions": partitions, "spark_version": spark.version})

        print(f"[{STEP}] 3/4 wrapping {model.uri} for spark_udf (downloads the model)")
        udf = mlflow.pyfunc.spark_udf(spark, _wrapper_model(model.uri, args.max_tokens, Path(work)),
                                      result_type="string", env_manager="local")
        from pyspark.sql import functions as F

        answered = requests.withColumn("result", F.from_json(udf(F.struct("request")), RESULT_SCHEMA))
        answered = answered.select("row", "id", *[F.col(f"result.{c}").alias(c) for c in OUTPUT_COLUMNS[2:]])

        print(f"[{STEP}] 4/4 answering {rows} rows in {partitions} partitions -> {output_kind} {args.output} "
              f"(Spark's progress bar shows finished tasks)")
        start = time.perf_counter()
        _write(answered, args.output, output_kind)
        seconds = time.perf_counter() - start

        summary = _summary(spark, args.output, output_kind)
        if summary["rows"] != rows:  # every input row must come out exactly once
            raise StepError(f"output '{args.output}' has {summary['rows']} rows for {rows} input rows")
        metrics = {"rows_total": rows, "rows_ok": summary["ok"], "rows_error": summary["errors"],
                   "seconds": seconds, "rows_per_s": rows / seconds,
                   "prompt_tokens": summary["prompt_tokens"], "completion_tokens": summary["completion_tokens"],
                   "total_tokens": summary["total_tokens"],
                   "completion_tokens_per_s": summary["completion_tokens"] / seconds}
        metrics.update({k: summary[k] for k in ("latency_p50", "latency_p95") if summary[k] is not None})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.set_tag("output_location", _location(args.output, output_kind))
        mlflow.log_dict({"rows": rows, "errors": summary["errors"], "first_errors": summary["error_rows"]},
                        "errors.json")
        share = summary["errors"] / rows
        mlflow.log_metric("error_share", share)
        if share > args.max_error_share:
            first = summary["error_rows"][0]
            raise StepError(f"{summary['errors']} of {rows} rows failed ({share:.1%}; max_error_share "
                            f"{args.max_error_share:g}); the first, row {first['row']} (id {first['id']}): "
                            f"{first['error']}. The answers are in {_location(args.output, output_kind)}, the "
                            f"failed rows in {run.info.artifact_uri}/errors.json")
    # A leading newline: Spark's console progress bar ends its line with a carriage return only.
    print(f"\n[{STEP}] {rows} rows: {summary['ok']} answered, {summary['errors']} errors, {seconds:.1f} s, "
          f"{rows / seconds:.2f} rows/s, {summary['completion_tokens'] / seconds:.1f} completion tokens/s")
    print_run_summary(STEP, run, {"answers": f"{output_kind} {_location(args.output, output_kind)}",
                                  "errors": f"{run.info.artifact_uri}/errors.json"})
    return {**metrics, "run_id": run.info.run_id, "output": args.output}


def _location(output: str, kind: str) -> str:
    return os.path.abspath(output) if kind == "parquet" and _is_local(output) else output
