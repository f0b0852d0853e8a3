"""An OpenAI-compatible `/v1/chat/completions` in front of this project's chat models.

Why not MLflow's AI Gateway alone: in MLflow 3.17.2 its `mlflow-model-serving` provider
(`mlflow/gateway/providers/mlflow.py`) sends `/invocations` only the first message's text as a
plain string (`{"inputs": ["..."]}`), so a chat model's signature refuses it; it refuses
conversations of more than one message, returns no usage or finish reason, and has no
streaming (asking for it breaks the connection). So this small server speaks the OpenAI
chat-completions API itself and hands each request, translated to the model's llm/v1/chat
schema, to one of two backends:

- `--model-uri`: the pyfunc loaded in this process; answers whole or streamed (SSE) through
  the model's `predict_stream`.
- `--model-server-url`: a running `mlflow models serve`; answers whole only, because its
  `/invocations` does not stream in MLflow 3.17.

    python -m hf2mlflow.serve.openai_front --model-uri 'models:/tiny-phi3-cpu-int4-onnx@candidate' --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from typing import Optional

import requests
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from hf2mlflow.runtime.batching import CancelScope

# OpenAI request fields passed to the model unchanged; the model validates their values.
PASSED = ("messages", "temperature", "top_p", "top_k", "max_tokens", "stop", "n",
          "frequency_penalty", "presence_penalty")
# OpenAI fields this server translates, or drops because they do not change the answer.
TRANSLATED = ("model", "max_completion_tokens", "seed", "stream", "stream_options", "user")
ALLOWED = PASSED + TRANSLATED


class OpenAIError(Exception):
    """An error answered in OpenAI's shape, so the openai client raises its matching exception."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def translate(body, served_name: str) -> tuple[dict, bool, bool]:
    """An OpenAI chat-completions body -> (the model's llm/v1/chat request, whether to stream, whether the
    stream ends with a usage chunk)."""
    if not isinstance(body, dict):
        raise OpenAIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    body = {k: v for k, v in body.items() if v is not None}  # OpenAI treats null as "use the default"
    unknown = sorted(set(body) - set(ALLOWED))
    if unknown:
        raise OpenAIError(400, f"unsupported field(s) {', '.join(unknown)}; this server accepts: {', '.join(ALLOWED)}",
                          param=unknown[0])
    if "model" not in body:
        raise OpenAIError(400, f"'model' is required: this server serves {served_name!r}", param="model")
    if body["model"] != served_name:
        raise OpenAIError(404, f"model {body['model']!r} is not served here; use {served_name!r} (see /v1/models)",
                          param="model", code="model_not_found")
    request = {k: body[k] for k in PASSED if k in body}
    if "max_completion_tokens" in body:  # OpenAI's newer name for max_tokens
        if request.setdefault("max_tokens", body["max_completion_tokens"]) != body["max_completion_tokens"]:
            raise OpenAIError(400, "max_tokens and max_completion_tokens differ; give one of them", param="max_tokens")
    if isinstance(request.get("stop"), str):  # the model's signature takes a list of strings
        request["stop"] = [request["stop"]]
    if isinstance(request.get("messages"), list):
        # "developer" is OpenAI's newer name for system instructions; the chat templates know "system".
        request["messages"] = [dict(m, role="system") if isinstance(m, dict) and m.get("role") == "developer" else m
                               for m in request["messages"]]
    if "seed" in body:  # the llm/v1/chat signature carries a seed only in custom_inputs
        request["custom_inputs"] = {"seed": body["seed"]}
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise OpenAIError(400, f"'stream' must be true or false, got {stream!r}", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise OpenAIError(400, "'stream_options' may hold only 'include_usage'", param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise OpenAIError(400, f"'stream_options.include_usage' must be true or false, got {include_usage!r}",
                          param="stream_options")
    if include_usage and not stream:
        raise OpenAIError(400, "stream_options is only allowed with stream=true", param="stream_options")
    return request, stream, include_usage


def _model_error(exc: Exception) -> OpenAIError:
    """The model's own errors: INVALID_PARAMETER_VALUE is a bad request (the message says what is allowed)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException) and exc.error_code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST"):
        return OpenAIError(400, exc.message)
    if isinstance(exc, MlflowException) and exc.error_code == "TEMPORARILY_UNAVAILABLE":
        return OpenAIError(503, exc.message)  # the model's queue is full; clients retry
    return OpenAIError(500, f"the model failed: {type(exc).__name__}: {exc}")


class LoadedModel:
    """The pyfunc model loaded in this process: whole and streamed answers."""

    def __init__(self, model_uri: str):
        import mlflow.pyfunc

        self.model = mlflow.pyfunc.load_model(model_uri)
        # MLflow's transformers flavor has no predict_stream; the ONNX pyfunc has.
        self.streams = getattr(self.model, "_predict_stream_fn", None) is not None

    def complete(self, request: dict) -> dict:
        try:
            (response,) = self.model.predict(request)
        except Exception as exc:  # noqa: BLE001 - every failure is answered, in OpenAI's shape
            raise _model_error(exc) from None
        return response

    def stream(self, request: dict) -> "ModelStream":
        if not self.streams:
            raise OpenAIError(400, "this model does not stream (MLflow's transformers flavor has no predict_stream); "
                              "send stream=false", param="stream")
        return ModelStream(self.model, request)


class ModelStream:
    """The chunks of one streamed answer. MLflow's predict_stream sets and resets a context variable around its
    generator, so the whole generator runs in one thread of its own; the event loop awaits its chunks. close(),
    when the client goes, stops it within a decode step: the thread's sequences are cancelled in the batch
    scheduler (even while the thread waits for a token, or its sequence for a row) and the thread stops reading."""

    def __init__(self, model, request: dict):
        self._loop = asyncio.get_running_loop()
        self._chunks: asyncio.Queue = asyncio.Queue()  # unbounded: the producer never waits for the client
        self._scope = CancelScope()
        threading.Thread(target=self._produce, args=(model, request), daemon=True).start()

    def _put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._chunks.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is stopping
            self._scope.cancel()

    def _produce(self, model, request: dict) -> None:
        with self._scope:
            try:
                chunks = model.predict_stream(request)
                try:
                    for chunk in chunks:
                        if self._scope.cancelled:
                            return
                        self._put(chunk)
                finally:
                    chunks.close()  # in this thread, as MLflow's context variable needs
                self._put(None)
            except Exception as exc:  # noqa: BLE001 - every failure is answered, in OpenAI's shape
                self._put(exc)

    async def next(self) -> Optional[dict]:
        """The next chunk, None after the last. A failure raises: before the first chunk it becomes the HTTP
        status; after it, an error event in the stream."""
        item = await self._chunks.get()
        if isinstance(item, Exception):
            raise _model_error(item)
        return item

    def close(self) -> None:
        self._scope.cancel()


class ModelServer:
    """A running `mlflow models serve`: whole answers only (its /invocations does not stream)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") + "/invocations"

    def complete(self, request: dict) -> dict:
        try:
            reply = requests.post(self.url, json=request, timeout=600)
        except requests.RequestException as exc:
            raise OpenAIError(502, f"the model server at {self.url} is unreachable: {exc}") from None
        try:
            body = reply.json()
        except ValueError:
            body = {"message": reply.text[:500]}
        if reply.status_code != 200:
            message = body.get("message", body) if isinstance(body, dict) else body
            status = reply.status_code if 400 <= reply.status_code < 500 or reply.status_code == 503 else 502
            raise OpenAIError(status, f"the model server answered {reply.status_code}: {message}")
        # A chat request comes back unwrapped (a list); other inputs come wrapped in "predictions".
        answers = body.get("predictions") if isinstance(body, dict) else body
        if not isinstance(answers, list) or len(answers) != 1 or not isinstance(answers[0], dict):
            raise OpenAIError(502, f"the model server's answer is not one chat completion: {str(body)[:300]}")
        return answers[0]

    def stream(self, request: dict) -> ModelStream:
        raise OpenAIError(400, "streaming needs the model loaded in this server (start it with --model-uri): "
                          "mlflow models serve's /invocations answers only whole responses in MLflow 3.17",
                          param="stream")


def create_app(backend, served_name: str):
    app = FastAPI(title="hf2mlflow OpenAI-compatible chat completions")
    started = int(time.time())

    @app.exception_handler(OpenAIError)
    async def _openai_error(_request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/health")
    async def health():
        return {"status": "OK"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_name, "object": "model", "created": started,
                                            "owned_by": "hf2mlflow"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(http_request: Request):
        try:
            body = json.loads(await http_request.body())
        except ValueError as exc:
            raise OpenAIError(400, f"the request body is not valid JSON: {exc}") from None
        request, stream, include_usage = translate(body, served_name)
        if not stream:
            response = await run_in_threadpool(backend.complete, request)
            return dict(response, model=served_name)  # OpenAI answers with the model the client named
        chunks = backend.stream(request)
        try:
            first = await chunks.next()  # a bad request fails here, still with its 4xx
        except BaseException:
            chunks.close()
            raise

        async def events():
            # Generation runs in the stream's own thread; this only awaits its chunks, so it can be cancelled at
            # any await. Under uvicorn (ASGI spec 2.3), Starlette listens for the client's disconnect and cancels
            # the response's task at once: the `finally` then stops generation, even while no chunk is coming.
            usage, head, chunk = None, {}, first
            try:
                while chunk is not None:
                    usage = chunk.pop("usage", None) or usage
                    head = {k: chunk[k] for k in ("id", "object", "created")}
                    if include_usage:  # OpenAI's shape: null on every chunk, then one chunk with the usage
                        chunk["usage"] = None
                    yield f"data: {json.dumps(dict(chunk, model=served_name))}\n\n"
                    chunk = await chunks.next()
                if include_usage:
                    if usage is None:
                        raise OpenAIError(500, "the model's stream ended without token usage")
                    yield f"data: {json.dumps(dict(head, model=served_name, choices=[], usage=usage))}\n\n"
            except Exception as exc:  # noqa: BLE001 - headers are sent: the error goes in the stream
                error = exc if isinstance(exc, OpenAIError) else _model_error(exc)
                yield f"data: {json.dumps(error.body())}\n\n"
                return
            finally:
                chunks.close()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def served_name_for(model_uri: Optional[str], name: Optional[str]) -> str:
    """The `model` clients pass: given, or the registered model name of a models:/NAME@alias or /VERSION URI."""
    if name:
        return name
    if model_uri and model_uri.startswith("models:/"):
        return model_uri[len("models:/"):].split("@")[0].split("/")[0]
    raise SystemExit("give --served-model-name: the name clients pass as `model` "
                     "(it defaults to NAME only for a --model-uri of the form models:/NAME@alias or "
                     "models:/NAME/version)")


def main(argv=None):
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m hf2mlflow.serve.openai_front",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    backend = parser.add_mutually_exclusive_group(required=True)
    backend.add_argument("--model-uri", help="load this pyfunc chat model here (whole and streamed answers)")
    backend.add_argument("--model-server-url", help="forward to this `mlflow models serve` (whole answers only)")
    parser.add_argument("--served-model-name", help="the `model` clients pass (default: NAME of models:/NAME@alias)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    served_name = served_name_for(args.model_uri, args.served_model_name)
    chosen = LoadedModel(args.model_uri) if args.model_uri else ModelServer(args.model_server_url)
    print(f"[openai_serving] model {served_name!r} at http://{args.host}:{args.port}/v1", flush=True)
    # One worker: a loaded model is one copy in memory; generation runs in the server's thread pool.
    uvicorn.run(create_app(chosen, served_name), host=args.host, port=args.port, workers=1)


if __name__ == "__main__":
    main()
