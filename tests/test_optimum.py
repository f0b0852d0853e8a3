"""The optimum route: ONNX for architectures the onnxruntime-genai builder does not know, through the same
steps (convert_onnx -P exporter=optimum, log_pyfunc, evaluate) and behind the same chat interface."""

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from hf2mlflow.convert.step import ConvertArgs, convert
from hf2mlflow.errors import ConfigError
from hf2mlflow.convert.genai_builder import BuilderError
from hf2mlflow.runtime.manifest import verify_manifest
from hf2mlflow.convert.optimum_export import check_precision
from tests.support import HELLO, all_runs, ask, local_store, pickle_free_model, write_target


@pytest.fixture(scope="module")
def model(logged_optimum):
    with pickle_free_model(logged_optimum["root"], logged_optimum["uri"]) as loaded:
        yield loaded


@pytest.fixture
def in_store(logged_optimum):
    with local_store(logged_optimum["root"]):
        yield


@pytest.mark.usefixtures("in_store")
def test_conversion_is_tracked_like_the_builders(logged_optimum, tmp_path):
    run_id = logged_optimum["convert_run_id"]
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert (tags["step"], tags["artifact_format"], tags["exporter"]) == ("convert_onnx", "optimum-onnx", "optimum")
    assert tags["mlflow.runName"] == "tiny-gpt2-cpu-fp32-optimum"
    assert params["architecture"] == "GPT2LMHeadModel" and params["export_task"] == "text-generation-with-past"
    assert (params["optimum_version"], params["optimum_onnx_version"]) == ("2.1.0", "0.1.0")
    assert (params["precision"], params["execution_provider"], params["context_length"]) == ("fp32", "cpu", "2048")
    assert metrics["conversion_seconds"] > 0
    assert 100 * 2**20 < metrics["export_peak_rss_bytes"] < 8 * 2**30
    assert metrics["validation_new_tokens"] == 8 and metrics["validation_tokenizer_match"] == 1.0

    onnx_dir = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/onnx", dst_path=str(tmp_path)))
    files = {p.name for p in onnx_dir.iterdir()}
    assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"} <= files
    assert "genai_config.json" not in files  # plain ONNX: onnxruntime-genai cannot load it, onnxruntime can
    manifest = mlflow.artifacts.load_dict(f"runs:/{run_id}/manifest.json")
    assert verify_manifest(onnx_dir, manifest) == [] and set(manifest["files"]) == files
    assert metrics["artifact_bytes"] == manifest["total_bytes"]
    # An export in another precision than asked for fails the step (optimum's `python -m` entry point drops --dtype).
    check_precision(onnx_dir, "fp32")
    with pytest.raises(BuilderError, match="asked for fp16, but its logits are FLOAT"):
        check_precision(onnx_dir, "fp16")
    validation = mlflow.artifacts.load_dict(f"runs:/{run_id}/validation.json")
    assert validation["prompt"].endswith("<|im_start|>assistant\n") and len(validation["new_tokens"]) == 8


@pytest.mark.usefixtures("in_store")
def test_registered_with_what_inference_needs(logged_optimum):
    assert logged_optimum["uri"] == "models:/tiny-gpt2-cpu-fp32-optimum-onnx@candidate"
    local = Path(mlflow.artifacts.download_artifacts(logged_optimum["uri"]))
    lines = (local / "requirements.txt").read_text().splitlines()
    assert lines[0] == "--extra-index-url https://download.pytorch.org/whl/cpu"  # CPU torch, not GBs of CUDA
    assert [r.split("==")[0] for r in lines[1:]] == ["mlflow", "optimum", "optimum-onnx", "onnxruntime",
                                                     "transformers", "tokenizers", "torch", "numpy"]
    assert "torch==2.13.0" in lines and "python_model.pkl" not in {p.name for p in local.rglob("*")}
    info = mlflow.models.get_model_info(logged_optimum["uri"])
    assert info.metadata["artifact_format"] == "optimum-onnx"


def test_chats_in_the_openai_schema_like_the_genai_pyfunc(model):
    response = ask(model, max_tokens=6)
    assert response["object"] == "chat.completion" and response["model"] == "tiny-gpt2"
    (choice,) = response["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert response["usage"]["completion_tokens"] == 6 and choice["finish_reason"] == "length"
    assert response["usage"]["total_tokens"] == response["usage"]["prompt_tokens"] + 6
    assert ask(model, max_tokens=8)["choices"] == ask(model, max_tokens=8, temperature=0)["choices"]


def test_stream_matches_predict(model):
    full = ask(model, max_tokens=10)["choices"][0]
    chunks = list(model.predict_stream({"messages": HELLO, "max_tokens": 10}))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(chunks) > 3  # text arrives piece by piece
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == full["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["finish_reason"]


def test_seeded_sampling_repeats_and_n_choices(model):
    sampled = [ask(model, max_tokens=12, temperature=1.5, top_k=50, top_p=0.9, custom_inputs={"seed": s})
               ["choices"][0]["message"]["content"] for s in (1, 1, 2, 3)]
    assert sampled[0] == sampled[1] and len(set(sampled[1:])) > 1
    (by_param,) = model.predict({"messages": HELLO, "max_tokens": 12, "temperature": 1.5, "top_k": 50,
                                 "top_p": 0.9}, params={"seed": 1})
    assert by_param["choices"][0]["message"]["content"] == sampled[0]
    response = ask(model, max_tokens=6, n=3, temperature=1.0, custom_inputs={"seed": 7})
    assert [c["index"] for c in response["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in response["choices"]}) > 1  # each choice samples anew


def test_stop_string_ends_the_answer(model):
    full = ask(model, max_tokens=20)["choices"][0]["message"]["content"]
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip())
    stopped = ask(model, max_tokens=20, stop=[stop])["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["message"]["content"] == full[:full.find(stop)]
    chunks = list(model.predict_stream({"messages": HELLO, "max_tokens": 20, "stop": [stop]}))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == full[:full.find(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("request_body, expected", [
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"messages\[0\].role must be one of system, user, assistant"),
    ({"messages": HELLO, "top_p": 0}, "'top_p' must be between"),
    ({"messages": [{"role": "user", "content": "x " * 3000}]}, "context length is 2048"),
])
def test_bad_requests_say_what_is_allowed(model, request_body, expected):
    with pytest.raises(MlflowException, match=expected):
        model.predict(request_body)


def test_bad_exporter_fails_before_any_run(tracking, tmp_path):
    with pytest.raises(ConfigError, match="exporter 'foo' is not allowed; allowed: genai-builder, optimum"):
        convert(ConvertArgs(model="tiny-gpt2", target="cpu-fp32", exporter="foo"))
    with pytest.raises(ConfigError) as err:  # optimum exports float weights only
        convert(ConvertArgs(model="tiny-gpt2", target="cpu-int4", exporter="optimum"))
    assert "target 'cpu-int4' with exporter 'optimum'" in str(err.value)
    assert "optimum builds cpu: fp32, fp16; cuda: fp32, fp16" in str(err.value)
    path = write_target(tmp_path, "exporter: optimum\nexecution_provider: cpu\nprecision: fp16\n")
    with pytest.raises(ConfigError, match="exporter 'genai-builder': precision 'fp16' is not built for "
                                          "execution_provider 'cpu'"):
        convert(ConvertArgs(model="tiny-gpt2", target=path, exporter="genai-builder"))
    assert all_runs(tracking) == []


@pytest.fixture(scope="module")
def both_routes(logged_optimum, logged_fp32):
    """tiny-phi3 converted to fp32 for the CPU by both routes (the builder's is shared with test_evaluate.py),
    logged, and evaluated side by side."""
    from hf2mlflow.evaluate.step import EvaluateArgs, evaluate
    from hf2mlflow.log_model.pyfunc import LogPyfuncArgs, log_pyfunc

    with local_store(logged_optimum["root"]):
        optimum = log_pyfunc(LogPyfuncArgs(convert_run_id=convert(ConvertArgs(
            model="tiny-phi3", target="cpu-fp32", exporter="optimum"))))
        uris = [logged_fp32, optimum]
        run_id = evaluate(EvaluateArgs(models=",".join(uris), limit=3))
        yield mlflow.get_run(run_id), uris


ROUTES = ["tiny-phi3-cpu-fp32-onnx", "tiny-phi3-cpu-fp32-optimum-onnx"]


def test_evaluate_compares_the_routes(both_routes):
    run, uris = both_routes
    assert uris == [f"models:/{name}@candidate" for name in ROUTES]
    metrics = run.data.metrics
    for name in ROUTES:
        # Measured: both fp32 routes reproduce PyTorch's greedy tokens on every prompt.
        assert metrics[f"{name}.parity_identical_rate"] == 1.0
        assert metrics[f"{name}.parity_logits_max_abs_diff"] < 1e-3
        assert metrics[f"{name}.decode_tokens_per_s"] > 0
    comparison = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="comparison.json")).read_text())
    prompts = mlflow.load_table("per_prompt_outputs.json", run_ids=[run.info.run_id])
    assert [(r["model"], r["flavor"]) for r in comparison] == list(zip(ROUTES, ["onnx", "optimum-onnx"]))
    # Callers cannot tell the routes apart: the same tokens give the same usage and finish reasons, and the same
    # text wherever the tokens decode to valid UTF-8. Random weights also emit stray bytes: there optimum's
    # decoder writes U+FFFD as transformers' decode() does, while onnxruntime-genai 0.15.2's stream decoder
    # drops the invalid byte and the first byte of the next token (" argest" + "Â" + "end" -> " argestnd").
    genai, optimum = (prompts[prompts["model"] == name].reset_index(drop=True) for name in ROUTES)
    columns = ["finish_reason", "prompt_tokens", "completion_tokens"]
    assert genai[columns].to_dict("records") == optimum[columns].to_dict("records")
    valid = ~optimum["answer"].str.contains("\ufffd")
    assert valid.any() and (genai["answer"][valid] == optimum["answer"][valid]).all()
