"""log_transformers: the transformers flavor (llm/v1/chat) of the built-in tiny models."""

import importlib.metadata
import json
import shutil
from pathlib import Path

import mlflow
import pytest
import yaml

from hf2mlflow.errors import ConfigError, StepError
from hf2mlflow.log_model.transformers_flavor import LogTransformersArgs, log_transformers
from hf2mlflow.sources.tiny import tiny_model_path
from tests.support import HELLO, all_runs, local_store


@pytest.fixture(scope="module")
def models(logged, logged_transformers):
    """Both flavors of tiny-phi3, loaded the way users load them."""
    with local_store(logged["root"]):
        yield {"pyfunc": mlflow.pyfunc.load_model(logged["uri"]),
               "transformers": mlflow.pyfunc.load_model(logged_transformers)}


def shape(value):
    """The structure of a JSON value: keys and types, not contents."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__


def test_registered_with_alias_tags_and_installable_requirements(logged, logged_transformers):
    with local_store(logged["root"]):
        name = logged_transformers.split("/")[1].split("@")[0]
        assert name == "tiny-phi3-cpu-fp32-transformers"
        version = mlflow.MlflowClient().get_model_version_by_alias(name, "candidate")
        tags = mlflow.get_run(version.run_id).data.tags
        local = Path(mlflow.artifacts.download_artifacts(logged_transformers))
    assert {k: tags[k] for k in ("step", "model", "target", "flavor")} == {
        "step": "log_transformers", "model": "tiny-phi3", "target": "cpu-fp32", "flavor": "transformers"}
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["flavors"]["transformers"]["inference_task"] == "llm/v1/chat"
    assert mlmodel["flavors"]["python_function"]["config"] == {"max_new_tokens": 256, "do_sample": False}
    reqs = (local / "requirements.txt").read_text().splitlines()
    # torchvision is what MLflow would add by default; a text model never needs it.
    assert not any("torchvision" in r for r in reqs)
    assert reqs[0] == "--extra-index-url https://download.pytorch.org/whl/cpu"
    pins = dict(r.split("==") for r in reqs[1:])
    for package in ("mlflow", "transformers", "tokenizers", "safetensors"):
        assert pins[package] == importlib.metadata.version(package)
    assert pins["torch"] == importlib.metadata.version("torch").split("+")[0]  # no local label like +cpu
    assert (local / "model" / "model.safetensors").is_file()  # save_pretrained=True: weights travel with it


def test_same_request_same_schema_and_usage_as_the_onnx_pyfunc(models):
    request = {"messages": HELLO, "max_tokens": 6, "temperature": 0.0}
    answers = {flavor: model.predict(request)[0] for flavor, model in models.items()}
    assert shape(answers["transformers"]) == shape(answers["pyfunc"])
    for answer in answers.values():
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["message"]["role"] == "assistant"
        usage = answer["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert 0 < usage["completion_tokens"] <= 6
    # The same tokenizer and chat template count the same prompt tokens in both flavors.
    assert answers["transformers"]["usage"]["prompt_tokens"] == answers["pyfunc"]["usage"]["prompt_tokens"]


def test_transformers_flavor_honours_max_tokens_and_stays_greedy(models):
    model = models["transformers"]
    short, longer = (model.predict({"messages": HELLO, "max_tokens": n})[0] for n in (3, 9))
    assert short["usage"]["completion_tokens"] == 3 and short["choices"][0]["finish_reason"] == "length"
    assert longer["usage"]["completion_tokens"] == 9
    assert longer["choices"] == model.predict({"messages": HELLO, "max_tokens": 9})[0]["choices"]


def test_cuda_target_logs_on_a_cpu_machine_with_its_dtype_and_gpu_requirements(tracking):
    uri = log_transformers(LogTransformersArgs(model="tiny-qwen2", target="cuda-fp16", alias="gpu"))
    assert uri == "models:/tiny-qwen2-cuda-fp16-transformers@gpu"
    local = Path(mlflow.artifacts.download_artifacts(uri))
    assert yaml.safe_load((local / "MLmodel").read_text())["flavors"]["transformers"]["torch_dtype"] == "torch.float16"
    reqs = (local / "requirements.txt").read_text()
    assert "download.pytorch.org/whl/cpu" not in reqs and "torch==" in reqs


@pytest.fixture
def no_template_model(tmp_path):
    folder = tmp_path / "no-template"
    shutil.copytree(tiny_model_path("tiny-phi3"), folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("args, error, expected", [
    ({"model": "no-such-model"}, ConfigError, ["unknown model 'no-such-model'", "tiny-phi3"]),
    ({"target": "dml-int4"}, ConfigError, ["no `transformers` section", "cpu-fp32", "cuda-fp16"]),
    ({"target": "cpu-fp33"}, ConfigError, ["unknown target 'cpu-fp33'"]),
    ({"save_pretrained": False, "model": "tiny-phi3"}, ConfigError, ["save_pretrained=false", "hub", "builtin"]),
    ({"alias": "latest"}, ConfigError, ["alias", "reserved"]),
])
def test_bad_input_fails_before_any_run(tracking, args, error, expected):
    with pytest.raises(error) as err:
        log_transformers(LogTransformersArgs(**args))
    assert all(text in str(err.value) for text in expected), str(err.value)
    assert all_runs(tracking) == []


def test_tokenizer_without_chat_template_fails_before_weights_load(tracking, no_template_model, capsys):
    with pytest.raises(StepError, match="has no chat template"):
        log_transformers(LogTransformersArgs(model=no_template_model))
    assert "loading" not in capsys.readouterr().out
    (run,) = all_runs(tracking)
    assert run.info.status == "FAILED" and "no chat template" in run.data.tags["error"]
    assert mlflow.MlflowClient().search_registered_models() == []
