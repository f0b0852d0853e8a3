"""Scoring script for an MLflow chat pyfunc on an Azure ML managed online endpoint (azureml-inference-server-http).

Written to <out>/code/score.py by `python -m hf2mlflow.azureml deploy`. It runs in the deployment's environment
(the model's requirements.txt and the inference server), so it imports mlflow, pandas and the server only, never
hf2mlflow: the model brings its own runtime in model/code.

POST /score takes
- Azure ML's body: {"input_data": <one chat request> | [<requests>] | {"columns", "index", "data"}, "params": {}};
- a chat request as sent to `mlflow models serve`: {"messages": [...], "max_tokens": 16, ...};
- a prompt, for a model logged with interface=prompt: {"prompt": "..."}.
One request answers one object (a chat.completion, or a string for a prompt model); a list or a split-orient
DataFrame answers a list, one per row. "stream": true in one request answers server-sent events: `data: {chunk}`
per chunk and `data: [DONE]` last. Errors answer as `mlflow models serve` does: the model's MlflowException with
its HTTP status (400 for a bad request, 503 when the model is busy) and body {"error_code", "message"}.
GET /score answers what is loaded.
"""

import json
import logging
import os
import traceback
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
from azureml_inference_server_http.api.aml_request import AMLRequest, rawhttp
from azureml_inference_server_http.api.aml_response import AMLResponse
from flask import Response
from mlflow.exceptions import MlflowException

logger = logging.getLogger("score")
model = None
info: dict = {}


class BadRequest(Exception):
    pass


def model_folder() -> Path:
    """The folder holding MLmodel under AZUREML_MODEL_DIR: Azure puts the model's files beneath it (under the
    registered path's own folder name). Without the variable, the folder Azure mounts models in."""
    root = os.environ.get("AZUREML_MODEL_DIR") or os.path.join(os.environ.get("AML_APP_ROOT", "/var/azureml-app"),
                                                                "azureml-models")
    found = sorted(Path(root).rglob("MLmodel"), key=lambda path: (len(path.parts), str(path)))
    if not found:
        raise RuntimeError(f"no MLmodel file under {root} (AZUREML_MODEL_DIR); the deployment's model must be an "
                           f"MLflow model folder")
    return found[0].parent


def init():
    global model, info
    folder = model_folder()
    model = mlflow.pyfunc.load_model(str(folder))
    metadata = model.metadata
    schema = metadata.get_input_schema()
    info = {"status": "ready", "model_folder": str(folder), "model": (metadata.metadata or {}).get("model"),
            "inputs": schema.input_names() if schema else None,
            "streams": getattr(model, "_predict_stream_fn", None) is not None,
            "mlflow": mlflow.__version__}
    logger.info("loaded %s", info)


def _param_names() -> set:
    params = model.metadata.get_params_schema()
    return {spec.name for spec in params.params} if params else set()


def parse(body):
    """(model input, its requests as dicts, params, whether it is one request (answered as one object, not a
    list), whether to stream)."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object: {\"input_data\": ..., \"params\": {...}}, a chat request "
                         "{\"messages\": [...]} or {\"prompt\": \"...\"}")
    if "input_data" in body:
        data, params = body["input_data"], body.get("params") or None
        if params is not None and not isinstance(params, dict):
            raise BadRequest("'params' must be a JSON object")
        if isinstance(data, dict) and "columns" in data and "data" in data:
            try:
                data = pd.DataFrame(data["data"], columns=data["columns"], index=data.get("index"))
            except (TypeError, ValueError) as exc:
                raise BadRequest(f"'input_data' is not a split-orient DataFrame (columns, index, data): {exc}") \
                    from None
            rows, single = data.to_dict(orient="records"), False
        elif isinstance(data, dict):
            rows, single = [data], True
        elif isinstance(data, list) and all(isinstance(row, dict) for row in data):
            rows, single = data, False
        else:
            raise BadRequest("'input_data' must be one request (an object), a list of them, or a split-orient "
                             "DataFrame {\"columns\": [...], \"index\": [...], \"data\": [[...]]}")
    elif "messages" in body or "prompt" in body:
        # As `mlflow models serve` splits a chat body: the keys the model's params schema names are params.
        names = _param_names()
        data = {k: v for k, v in body.items() if k not in names}
        params = {k: v for k, v in body.items() if k in names} or None
        rows, single = [data], True
    else:
        raise BadRequest(f"the body has none of 'input_data', 'messages', 'prompt' (keys: {sorted(body)})")
    stream = [row.get("stream") for row in rows if row.get("stream") is not None]
    if any(not isinstance(value, bool) for value in stream):
        raise BadRequest(f"'stream' must be true or false, got {stream[0]!r}")
    if any(stream) and len(rows) != 1:
        raise BadRequest(f"'stream': true takes one request, got {len(rows)}")
    return data, rows, params, single, any(stream)


def error(status: int, error_code: str, message: str) -> AMLResponse:
    return AMLResponse({"error_code": error_code, "message": message}, status, json_str=True)


def model_error(exc: Exception) -> AMLResponse:
    if isinstance(exc, MlflowException):
        return error(exc.get_http_status_code(), exc.error_code, exc.message)
    # As `mlflow models serve` answers an error that is not the model's own.
    logger.error("the model failed: %s", traceback.format_exc())
    return error(400, "BAD_REQUEST", "Encountered an unexpected error while evaluating the model. Verify that the "
                 "input is compatible with the model for inference.")


def events(first, chunks):
    """Server-sent events. The generator runs in the thread that called predict_stream (the server's worker), as
    MLflow's predict_stream needs; an error after the first chunk becomes an error event."""
    try:
        yield f"data: {json.dumps(first)}\n\n"
        for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
    except Exception as exc:  # noqa: BLE001 - the status is sent already; the client gets the error in the stream
        message = exc.message if isinstance(exc, MlflowException) else f"{type(exc).__name__}: {exc}"
        yield f"data: {json.dumps({'error': {'message': message}})}\n\n"
    yield "data: [DONE]\n\n"


@rawhttp
def run(request: AMLRequest):
    if request.method == "GET":
        return AMLResponse(info, 200, json_str=True)
    if request.method != "POST":
        return error(405, "BAD_REQUEST", f"method {request.method} is not allowed; GET or POST")
    try:
        body = json.loads(request.get_data() or b"null")
    except ValueError as exc:
        return error(400, "MALFORMED_REQUEST", f"the body is not JSON: {exc}")
    try:
        data, rows, params, single, stream = parse(body)
    except BadRequest as exc:
        return error(400, "INVALID_PARAMETER_VALUE", str(exc))
    if stream:
        try:
            chunks = model.predict_stream(rows[0], params=params)
            first = next(chunks)  # a bad request fails here, while the status can still say so
        except StopIteration:
            first, chunks = None, iter(())
        except Exception as exc:  # noqa: BLE001 - every failure is answered
            return model_error(exc)
        if first is None:
            return error(500, "INTERNAL_ERROR", "the model streamed nothing")
        response = Response(events(first, chunks), status=200, mimetype="text/event-stream",
                            headers={"Cache-Control": "no-cache"})
        # The server closes the response when the answer ends or the client goes (its write fails); closing the
        # model's stream then frees its row in the batch, even before events() began (closing a generator that
        # never started runs none of its code). It runs in this worker's thread, as MLflow's predict_stream needs.
        response.call_on_close(chunks.close)
        return response
    try:
        answers = model.predict(data, params=params)
    except Exception as exc:  # noqa: BLE001 - every failure is answered
        return model_error(exc)
    answers = answers.to_dict(orient="records") if hasattr(answers, "to_dict") else list(answers)
    return AMLResponse(answers[0] if single and len(answers) == 1 else answers, 200, json_str=True)
