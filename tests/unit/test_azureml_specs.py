"""The Azure ML specs `python -m hf2mlflow.azureml deploy` writes, for a small fake model folder: azure-ai-ml's own
loaders accept them with the fields we mean, and bad input or a spec azure-ai-ml rejects fails saying why."""

import ast
from pathlib import Path

import pytest
import yaml

from hf2mlflow import PROJECT_ROOT
from hf2mlflow.azureml import workspace_tracking_uri
from hf2mlflow.azureml.specs import BASE_IMAGE, SCORE_SCRIPT, SERVER_PACKAGES, Spec, check_spec, validate, write_specs
from hf2mlflow.errors import ConfigError

REQUIREMENTS = ["mlflow==3.17.2", "onnxruntime==1.31.1", "tokenizers==0.22.2", "jinja2==3.1.6", "numpy==2.4.6"]


def fake_model(out: Path, metadata=True) -> Path:
    model = out / "model"
    model.mkdir(parents=True)
    mlmodel = {"flavors": {"python_function": {"loader_module": "mlflow.pyfunc.loaders.code_model",
                                               "python_version": "3.11.7"}}}
    if metadata:
        mlmodel["metadata"] = {"model": "smollm2-135m-instruct", "target": "cpu-int4"}
    (model / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    (model / "requirements.txt").write_text("\n".join(REQUIREMENTS) + "\n")
    return out


def test_written_specs_load_with_azure_ai_ml_and_say_what_we_mean(tmp_path):
    out = fake_model(tmp_path / "spec")
    written = write_specs(Spec(endpoint="smol-chat", instance_type="Standard_F4s_v2", instance_count=2), out)
    assert sorted(p.relative_to(out).as_posix() for p in written) == [
        "code/score.py", "deployment.yml", "endpoint.yml", "environment/conda.yaml", "job.yml"]
    assert (out / "code" / "score.py").read_text() == SCORE_SCRIPT.read_text()

    loaded = validate(out)
    endpoint, deployment, job = loaded["endpoint.yml"], loaded["deployment.yml"], loaded["job.yml"]
    assert (endpoint.name, endpoint.auth_mode) == ("smol-chat", "key")

    assert (deployment.name, deployment.endpoint_name) == ("blue", "smol-chat")
    assert deployment.model.type == "mlflow_model" and Path(deployment.model.path) == out / "model"
    assert (deployment.code_configuration.code, deployment.code_configuration.scoring_script) == ("code", "score.py")
    assert (deployment.instance_type, deployment.instance_count) == ("Standard_F4s_v2", 2)
    assert deployment.environment.image == BASE_IMAGE
    conda = deployment.environment.conda_file
    assert "python=3.11" in conda["dependencies"]
    (pip,) = [d["pip"] for d in conda["dependencies"] if isinstance(d, dict)]
    # The model's own pins, untouched, then the server and what Azure's images import at start.
    assert pip == REQUIREMENTS + SERVER_PACKAGES
    assert "azureml-ai-monitoring==1.0.0" in pip and "azureml-inference-server-http==1.5.1" in pip

    assert job.type == "command" and job.compute == "cpu-cluster" and job.experiment_name == "hf2mlflow"
    assert "python ../steps/main.py --model smollm2-135m-instruct --target cpu-int4 --eval_limit 5" in job.command
    assert "MLFLOW_TRACKING_URI=sqlite:///mlflow.db" in job.command and "-u MLFLOW_RUN_ID" in job.command
    assert Path(job.code) == PROJECT_ROOT  # the spec folder is outside the project here: an absolute path
    assert job.environment.conda_file["name"] == "hf2mlflow"  # the project's own conda.yaml
    assert (PROJECT_ROOT / "steps" / "main.py").is_file()


def test_a_spec_folder_inside_the_project_points_the_job_at_it_relatively(tmp_path, monkeypatch):
    import hf2mlflow.azureml.specs as specs

    monkeypatch.setattr(specs, "PROJECT_ROOT", tmp_path)
    (tmp_path / "conda.yaml").write_text("name: hf2mlflow\ndependencies: [python=3.11]\n")
    out = fake_model(tmp_path / "build" / "azureml" / "smol")
    write_specs(Spec(endpoint="smol-chat"), out)
    job = yaml.safe_load((out / "job.yml").read_text())
    assert job["code"] == "../../.." and job["environment"]["conda_file"] == "../../../conda.yaml"
    assert Path(validate(out)["job.yml"].code) == Path("../../..")


@pytest.mark.parametrize("name", ["ab", "1chat", "a" * 33, "smol_chat", "smol chat", ""])
def test_a_bad_endpoint_name_fails_before_anything_is_written(tmp_path, name):
    out = fake_model(tmp_path / "spec")
    with pytest.raises(ConfigError, match="3 to 32 characters, letters, digits and hyphens, starting with a letter"):
        write_specs(Spec(endpoint=name), out)
    assert not (out / "endpoint.yml").exists()


@pytest.mark.parametrize("count", [0, -1, True])
def test_a_bad_instance_count_fails(count):
    with pytest.raises(ConfigError, match=r"instance count .* a whole number, 1 or more"):
        check_spec(Spec(endpoint="smol-chat", instance_count=count))


def test_a_bad_instance_type_or_deployment_name_fails():
    with pytest.raises(ConfigError, match="Standard_DS3_v2"):
        check_spec(Spec(endpoint="smol-chat", instance_type="DS3"))
    with pytest.raises(ConfigError, match="deployment name 'x'"):
        check_spec(Spec(endpoint="smol-chat", deployment="x"))


@pytest.mark.parametrize("file, change, expected", [
    ("endpoint.yml", {"auth_mode": "password"}, r"endpoint.yml .*auth_mode.*'password'.*\['aml_token', 'key'"),
    ("deployment.yml", {"instance_count": "many"}, r"deployment.yml .*instance_count.*Not a valid integer"),
    ("deployment.yml", {"replicas": 2}, r"deployment.yml .*replicas.*Unknown field"),
    ("job.yml", {"code": "no-such-folder"}, r"job.yml .*code.*Can't find directory or file"),
])
def test_a_spec_azure_ai_ml_rejects_is_reported_with_file_field_and_what_is_allowed(tmp_path, file, change,
                                                                                     expected):
    out = fake_model(tmp_path / "spec")
    write_specs(Spec(endpoint="smol-chat"), out)
    document = yaml.safe_load((out / file).read_text())
    (out / file).write_text(yaml.safe_dump({**document, **change}))
    with pytest.raises(ConfigError, match=expected) as failure:
        validate(out)
    assert "is not a valid Azure ML spec (azure-ai-ml 1.35.2)" in str(failure.value)


def test_a_missing_scoring_script_is_reported(tmp_path):
    out = fake_model(tmp_path / "spec")
    write_specs(Spec(endpoint="smol-chat"), out)
    (out / "code" / "score.py").unlink()
    with pytest.raises(ConfigError, match=r"deployment.yml: code_configuration points at .*code/score.py"):
        validate(out)


def test_a_folder_that_is_not_an_mlflow_model_or_lacks_metadata_fails_clearly(tmp_path):
    with pytest.raises(ConfigError, match="MLmodel missing"):
        write_specs(Spec(endpoint="smol-chat"), tmp_path)
    out = fake_model(tmp_path / "spec", metadata=False)
    with pytest.raises(ConfigError, match="give --job-model and --job-target"):
        write_specs(Spec(endpoint="smol-chat"), out)
    write_specs(Spec(endpoint="smol-chat", job_model="tiny-phi3", job_target="cpu-fp32"), out)
    assert "--model tiny-phi3 --target cpu-fp32" in validate(out)["job.yml"].command


def test_the_scoring_script_imports_nothing_of_hf2mlflow():
    """The deployment's environment holds the model's requirements and the server, not this project."""
    tree = ast.parse(SCORE_SCRIPT.read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    top = {m.split(".")[0] for m in modules}
    assert top <= {"json", "logging", "os", "traceback", "pathlib", "mlflow", "pandas", "flask",
                   "azureml_inference_server_http"}, top


def test_workspace_tracking_uri():
    uri = workspace_tracking_uri("westeurope", "0000-sub", "my-rg", "my-ws")
    assert uri == ("https://westeurope.api.azureml.ms/mlflow/v2.0/subscriptions/0000-sub/resourceGroups/my-rg"
                   "/providers/Microsoft.MachineLearningServices/workspaces/my-ws")
    assert workspace_tracking_uri("westeurope", "s", "rg", "ws", host="http://127.0.0.1:5000/").startswith(
        "http://127.0.0.1:5000/mlflow/v2.0/subscriptions/s/")
    with pytest.raises(ConfigError, match="workspace 'a/b' is not allowed"):
        workspace_tracking_uri("westeurope", "s", "rg", "a/b")
