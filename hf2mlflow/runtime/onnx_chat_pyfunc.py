"""The logged pyfunc model (models-from-code: this file is the model, nothing is pickled).

Loaded by MLflow with `context.artifacts` (the ONNX folder and its manifest) and
`context.model_config` (model name, generation defaults, interface, batching limits, and the conversion's
artifact_format and execution provider, which pick the engine: for the builder's models, onnxruntime with
continuous batching on CPU and onnxruntime-genai on GPUs; onnxruntime through optimum for optimum's exports;
all answer alike). Concurrent calls, a DataFrame's rows and a request's choices generate together where the
engine batches (the CPU engine of the builder's models).
"""

from __future__ import annotations

import itertools
from dataclasses import fields
import json
import sys
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
from mlflow.pyfunc import PythonModel

from hf2mlflow.runtime.batching import BatchLimits, GenerationFailed, QueueFull, concurrently
from hf2mlflow.runtime.chat_schema import ChatRequestError, parse_prompt_request, parse_request
from hf2mlflow.runtime.manifest import verify_manifest


def _rows(model_input) -> list[dict]:
    if hasattr(model_input, "to_dict"):  # a DataFrame: one request per row
        return model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        return [model_input]
    return list(model_input)


def _bad_request(exc: Exception) -> MlflowException:
    # INVALID_PARAMETER_VALUE is served as HTTP 400 by `mlflow models serve`.
    return MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE)


def _busy(exc: QueueFull) -> MlflowException:
    # TEMPORARILY_UNAVAILABLE is served as HTTP 503: the client may retry, unlike the scoring server's 504.
    return MlflowException(f"the model is busy: {exc}; retry later", error_code=TEMPORARILY_UNAVAILABLE)


def _failed(exc: GenerationFailed) -> MlflowException:
    # INTERNAL_ERROR is served as HTTP 500, with this message: the client learns what failed (the scoring servers
    # answer other exceptions with a generic message).
    return MlflowException(str(exc), error_code=INTERNAL_ERROR)


def _engine(artifact_format: str, model_dir: Path, config: dict, limits: BatchLimits):
    # Imported here: each engine's runtime is installed only where a model of its format is logged.
    if artifact_format == "onnxruntime-genai" and config.get("execution_provider", "cpu") == "cpu":
        from hf2mlflow.runtime.slot_chat import SlotChatEngine

        if "long_rope_threshold" not in config:  # a row's answer would depend on its neighbours' lengths
            raise MlflowException("model_config has no long_rope_threshold (the graph's rotary regimes); log the "
                                  "model again with log_pyfunc")
        return SlotChatEngine(model_dir, config["model_name"], limits, config.get("session_options") or {},
                              config["long_rope_threshold"])
    if artifact_format == "onnxruntime-genai":
        from hf2mlflow.runtime.genai_chat import GenAIChatEngine

        return GenAIChatEngine(model_dir, config["model_name"], config.get("session_options") or {})
    if artifact_format == "optimum-onnx":
        from hf2mlflow.runtime.ort_chat import OrtChatEngine

        return OrtChatEngine(model_dir, config["model_name"], config.get("execution_provider", "cpu"))
    raise MlflowException(f"model_config artifact_format '{artifact_format}' is not served by this model; "
                          f"allowed: onnxruntime-genai, optimum-onnx")


class OnnxChatModel(PythonModel):
    def load_context(self, context):
        config = context.model_config
        model_dir = Path(context.artifacts["onnx"])
        manifest = json.loads(Path(context.artifacts["manifest"]).read_text())
        problems = verify_manifest(model_dir, manifest)
        if problems:
            raise MlflowException(f"the ONNX artifacts do not match the conversion manifest: {'; '.join(problems)}")
        self.defaults = config["generation"]
        self.interface = config["interface"]
        batching = config.get("batching", {})
        self.limits = BatchLimits(**{f.name: int(batching.get(f.name, f.default)) for f in fields(BatchLimits)})
        self.engine = _engine(config.get("artifact_format", "onnxruntime-genai"), model_dir, config, self.limits)
        if hasattr(self.engine, "scheduler"):
            print(f"[batching] up to {self.limits.max_batch} sequences generate together, {self.limits.max_queue} "
                  f"more wait, beyond that requests get 503", file=sys.stderr, flush=True)

    def _request(self, row: dict, params):
        # The prompt interface takes text the model continues as it is (already templated, as the seed sends it).
        parse = parse_prompt_request if self.interface == "prompt" else parse_request
        try:
            return parse(row, self.defaults, params)
        except ChatRequestError as exc:
            raise _bad_request(exc) from None

    def admit(self, sequences: int):
        """Room for one request's `sequences` (rows x n) while it runs (batching.BatchScheduler.admit); QueueFull
        when other work leaves none."""
        return self.engine.admit(sequences)

    def predict(self, context, model_input, params=None):
        requests = [self._request(row, params) for row in _rows(model_input)]
        sequences = sum(r.n for r in requests)
        if sequences > self.limits.max_request_sequences:  # it would hold the model longer than any client waits
            raise _bad_request(ValueError(
                f"this request asks for {sequences} sequences ({len(requests)} rows x n); this model takes at most "
                f"max_request_sequences {self.limits.max_request_sequences} in one request (the target's batching "
                f"settings): split it"))
        try:
            with self.admit(sequences):
                responses = concurrently(self.engine.chat, requests, self.limits.max_batch)
        except ChatRequestError as exc:
            raise _bad_request(exc) from None
        except QueueFull as exc:
            raise _busy(exc) from None
        except GenerationFailed as exc:
            raise _failed(exc) from exc
        if self.interface == "prompt":
            return [r["choices"][0]["message"]["content"] for r in responses]
        return responses

    def predict_stream(self, context, model_input, params=None):
        rows = _rows(model_input)
        if len(rows) != 1:
            raise _bad_request(ValueError(f"predict_stream takes one request, got {len(rows)}"))
        request = self._request(rows[0], params)
        stream = self.engine.stream(request)
        try:
            try:
                first = next(stream)  # prompt errors surface here, before anything is yielded
            except ChatRequestError as exc:
                raise _bad_request(exc) from None
            except QueueFull as exc:
                raise _busy(exc) from None
            chunks = itertools.chain([first], stream)
            if self.interface == "prompt":  # string in, strings out: the completion's text as it arrives
                yield from (text for c in chunks if (text := c["choices"][0]["delta"].get("content")))
            else:
                yield from chunks
        finally:
            stream.close()  # the caller stopped reading (or it ended): the sequence leaves its row now


mlflow.models.set_model(OnnxChatModel())
