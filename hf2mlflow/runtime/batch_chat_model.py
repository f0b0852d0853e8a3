"""The model batch_infer hands to mlflow.pyfunc.spark_udf (models-from-code: this file is the model).

It wraps one logged chat model of this project (either flavor, in `context.artifacts["model"]`) and answers a
batch of rows one request per row (concurrently where the model batches generations, so the rows of a
partition generate together), so that a bad row or a model error for one row becomes that row's `error`
instead of failing the Spark task and with it the whole job. Input: a `request` column, one JSON object per row
(a JSONL line, or a Parquet/table row as JSON). Output: one JSON object per row (RESULT_FIELDS), which
batch_infer parses into columns: a string result keeps nulls where MLflow's struct conversion of spark_udf
results cannot (it casts integer columns with missing values and fails).
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from hf2mlflow.runtime.batching import concurrently
from hf2mlflow.runtime.chat_schema import REQUEST_KEYS, ChatRequestError, parse_request

# Keys forwarded to the model, typed as parse_request validated them (a Parquet max_tokens of 8.0 goes on as 8).
FORWARDED = ("max_tokens", "temperature", "top_p", "top_k", "n")
# Only used to fill fields the row leaves out; those are not forwarded, so the model's own defaults apply.
_PLACEHOLDER_DEFAULTS = {"max_new_tokens": 1, "temperature": 0.0, "top_p": 1.0, "top_k": 0}
RESULT_FIELDS = ("answer", "finish_reason", "prompt_tokens", "completion_tokens", "total_tokens", "latency_s",
                 "error", "response")


def request_from_json(text, default_max_tokens: int = 0) -> dict:
    """One row's JSON -> the chat request sent to the model, validated with parse_request's rules."""
    if text is None or not str(text).strip():
        raise ChatRequestError("empty row: a row is an object with 'messages'")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ChatRequestError(f"not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(body, dict):
        raise ChatRequestError(f"a row is an object with 'messages', got {type(body).__name__}")
    # Fields that are not request fields (the row's `id`, a dataset's `reference`) are not the model's.
    body = {k: v for k, v in body.items() if k in REQUEST_KEYS}
    if body.get("stream"):
        raise ChatRequestError("'stream' is not supported in batch inference; leave it out or set false")
    parsed = parse_request(body, _PLACEHOLDER_DEFAULTS)
    request = {"messages": parsed.messages}
    request.update({k: getattr(parsed, k) for k in FORWARDED if body.get(k) is not None})
    if parsed.stop:
        request["stop"] = list(parsed.stop)
    if parsed.seed is not None:
        request["custom_inputs"] = {"seed": parsed.seed}
    if default_max_tokens and "max_tokens" not in request:
        request["max_tokens"] = default_max_tokens
    return request


def answer_row(model, text, default_max_tokens: int = 0) -> dict:
    result = dict.fromkeys(RESULT_FIELDS)
    try:
        request = request_from_json(text, default_max_tokens)
    except ChatRequestError as exc:
        result["error"] = f"bad request: {exc}"
        return result
    start = time.perf_counter()
    try:
        (response,) = model.predict(request)  # both flavors answer a single request with a list of one response
    except Exception as exc:  # any model failure is this row's, not the job's
        result["error"] = f"model error: {type(exc).__name__}: {str(exc)[:1000]}"
        result["latency_s"] = time.perf_counter() - start
        return result
    result["latency_s"] = time.perf_counter() - start
    choice, usage = response["choices"][0], response["usage"]
    result.update(answer=choice["message"]["content"], finish_reason=choice["finish_reason"],
                  prompt_tokens=int(usage["prompt_tokens"]), completion_tokens=int(usage["completion_tokens"]),
                  total_tokens=int(usage["total_tokens"]), response=json.dumps(response, default=str))
    return result


class BatchChatModel(PythonModel):
    def load_context(self, context):
        self.model = mlflow.pyfunc.load_model(context.artifacts["model"])
        self.default_max_tokens = int(context.model_config.get("max_tokens") or 0)
        try:  # the ONNX pyfunc batches up to max_batch sequences; the transformers flavor answers one at a time
            onnx_model = self.model.unwrap_python_model()
            self.parallel, self.admit = onnx_model.limits.max_batch, onnx_model.admit
        except Exception:  # noqa: BLE001 - not our pyfunc: no batching
            self.parallel, self.admit = 1, lambda sequences: nullcontext()

    def predict(self, context, model_input, params=None):
        # The partition is one request to the model: its rows and their choices share the room it holds, and
        # wait for one another rather than fail on a queue they fill themselves.
        with self.admit(self.parallel):
            rows = concurrently(lambda text: json.dumps(answer_row(self.model, text, self.default_max_tokens)),
                                list(model_input["request"]), self.parallel)
        return pd.DataFrame({"result": rows})


mlflow.models.set_model(BatchChatModel())
