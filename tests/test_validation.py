"""What convert_onnx's validation and evaluate's parity catch, on tiny models made wrong in ways real models are:
a config setting the builder does not carry into the graph, tied embeddings at int8, a sliding window, and a
tokenizer that no longer matches its source."""

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from hf2mlflow import PROJECT_ROOT
from hf2mlflow.convert.step import ConvertArgs, convert
from hf2mlflow.evaluate.step import EvaluateArgs, evaluate
from hf2mlflow.log_model.pyfunc import LogPyfuncArgs, log_pyfunc
from hf2mlflow.runtime.manifest import build_manifest
from hf2mlflow.sources.tiny import tiny_model_path
from hf2mlflow.convert.validate import ValidationError, fp32_logits_tolerance
from steps import convert_onnx as convert_step
from tests.support import all_runs, local_store

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def _variant(builtin: str, folder: Path, config: dict, weights=None) -> Path:
    """A copy of built-in `builtin` with `config` over its config.json and `weights(state_dict)` applied."""
    shutil.copytree(tiny_model_path(builtin), folder)
    merged = {**json.loads((folder / "config.json").read_text()), **config}
    (folder / "config.json").write_text(json.dumps(merged, indent=2))
    if weights:
        state = load_file(folder / "model.safetensors")
        save_file(weights(state), folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _only_run(tracking_uri):
    (run,) = all_runs(tracking_uri)
    return run


def _convert_fails(tracking_uri, capsys, model: str, target: str):
    """convert_onnx run as a script: it exits 1 without a traceback; its stderr and its one (FAILED) run."""
    with pytest.raises(SystemExit) as exit_info:
        convert_step.main(["--model", model, "--target", target])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "[convert_onnx] FAILED:" in err and "Traceback" not in err
    run = _only_run(tracking_uri)
    assert run.info.status == "FAILED"
    return err, run


def test_fp32_model_that_differs_from_pytorch_fails_the_run(tracking, tmp_path, capsys):
    # YaRN rope scaling without beta_fast/beta_slow (as Qwen2.5's long-context instructions write it): PyTorch
    # applies it with default betas, the 0.15.2 builder ignores it. Larger output weights make the logits
    # (and so the difference) as large as a trained model's.
    def scale_output(state):
        state["lm_head.weight"] = state["lm_head.weight"] * 50
        return state

    folder = _variant("tiny-qwen2", tmp_path / "qwen2-yarn", {
        "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256}},
        scale_output)
    err, run = _convert_fails(tracking, capsys, str(folder), "cpu-fp32")
    assert "next-token logits differ from PyTorch's" in err and "rope_scaling" in err
    assert "logits differ" in run.data.tags["error"]


def _tied(state):
    state.pop("lm_head.weight")
    return state


def test_int8_with_tied_embeddings_converts_with_the_shipped_target(tracking, tmp_path):
    folder = _variant("tiny-qwen2", tmp_path / "qwen2-tied", {"tie_word_embeddings": True}, _tied)
    run = mlflow.get_run(convert(ConvertArgs(model=str(folder), target="cpu-int8")))
    assert run.info.status == "FINISHED" and run.data.params["builder_option.shared_embeddings"] == "False"


def test_int8_shared_tied_embeddings_fail_with_what_to_set(tracking, tmp_path):
    folder = _variant("tiny-qwen2", tmp_path / "qwen2-tied", {"tie_word_embeddings": True}, _tied)
    target = tmp_path / "cpu-int8-shared.yaml"
    target.write_text("execution_provider: cpu\nprecision: int8\n"
                      "builder_options: {block_size: 32, accuracy_level: 4}\n")
    with pytest.raises(ValidationError) as err:
        convert(ConvertArgs(model=str(folder), target=str(target)))
    assert "cannot load the model the builder wrote" in str(err.value)
    assert "builder_options.shared_embeddings: false" in str(err.value)
    assert _only_run(tracking).info.status == "FAILED"


def test_sliding_window_matches_pytorch_beyond_the_window(tracking, tmp_path):
    from hf2mlflow.parity import GenAIModel, TorchModel

    window = 16
    folder = _variant("tiny-phi3", tmp_path / "phi3-window", {"sliding_window": window})
    run_id = convert(ConvertArgs(model=str(folder), target="cpu-fp32"))
    onnx = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="onnx", dst_path=str(tmp_path)))
    reference, candidate = TorchModel.from_folder(folder), GenAIModel(onnx)
    unwindowed = TorchModel.from_folder(tiny_model_path("tiny-phi3"))
    lengths = []
    for repeats in (0, 1, 3, 8):  # a prompt inside the window whose answer crosses it, then ever longer ones
        messages = [{"role": "user", "content": " ".join(["The capital of France has a long history."] * repeats)
                     or "Hi"}]
        ids = reference.prompt_ids(messages)
        lengths.append(len(ids))
        assert candidate.greedy(ids, 24) == reference.greedy(ids, 24)
        expected = reference.next_logits(ids)
        assert np.max(np.abs(candidate.next_logits(ids) - expected)) <= fp32_logits_tolerance(expected)
    assert lengths[0] < window < lengths[-1]
    # The window really shapes the answer: without it PyTorch computes other logits for the longest prompt.
    assert np.max(np.abs(unwindowed.next_logits(ids) - expected)) > 1e-2


def test_evaluate_keeps_a_model_whose_tokenizer_disagrees_with_its_source_from_promotion(converted, shared_store):
    convert_run_id = converted("tiny-phi3", "cpu-int4")
    with local_store(shared_store["root"]):
        _flag_a_swapped_tokenizer(convert_run_id)


def _flag_a_swapped_tokenizer(convert_run_id):
    # A pyfunc of its own (its files are changed below), logged from the session's conversion.
    uri = log_pyfunc(LogPyfuncArgs(convert_run_id=convert_run_id, registered_model_name="tiny-phi3-swapped-tokenizer"))
    logged = mlflow.get_logged_model(mlflow.models.get_model_info(uri).model_id)
    artifacts = Path(logged.artifact_location.removeprefix("file://"))
    (tokenizer_file,) = artifacts.rglob("tokenizer.json")
    # Swap the ids of two pieces the prompts use: the logged model now reads other ids than its source does.
    tokenizer = json.loads(tokenizer_file.read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = "Ġthe", "Ġcapital" if "Ġcapital" in vocab else "Ġof"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tokenizer_file.write_text(json.dumps(tokenizer))
    # As a model logged so (its manifest says these are its files), not as a tampered one.
    (manifest_file,) = artifacts.rglob("manifest.json")
    manifest_file.write_text(json.dumps(build_manifest(tokenizer_file.parent)))
    run = mlflow.get_run(evaluate(EvaluateArgs(models=uri, limit=3)))
    (summary,) = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/comparison.json")
    assert summary["tokenizer_agreement_rate"] < 1.0 and summary["gate"] == "failed"
    assert "min_tokenizer_agreement: tokenizer_agreement_rate" in summary["flag"]
    # The gate keeps it from promotion, and its registered version says why.
    name = "tiny-phi3-swapped-tokenizer"
    assert run.data.tags["promoted"] == "none" and run.data.metrics[f"{name}.gate_passed"] == 0.0
    assert run.data.tags[f"gate.{name}"].startswith("failed: min_tokenizer_agreement")
    client = mlflow.MlflowClient()
    (found,) = client.search_model_versions(f"name = '{name}'")
    version = client.get_model_version(name, found.version)  # search results carry no aliases
    assert "champion" not in version.aliases and version.aliases == ["candidate"]
    assert version.tags["gate"].startswith("failed default: min_tokenizer_agreement: tokenizer_agreement_rate")


def test_a_conversion_below_its_quality_floor_fails_with_the_figures(tracking, tmp_path, capsys):
    target = tmp_path / "cpu-int4-strict.yaml"
    # The shipped recipe on random weights (mean KL divergence about 3e-5): no int4 model reaches a floor of 1e-9.
    target.write_text((PROJECT_ROOT / "configs" / "targets" / "cpu-int4.yaml").read_text()
                      .replace("max_mean_kld: 0.3", "max_mean_kld: 1.0e-9"))
    err, run = _convert_fails(tracking, capsys, "tiny-phi3", str(target))
    assert "below the target's quality_floor: mean KL divergence" in err and "> 1e-09 allowed" in err
    assert "252 positions of the held-out text" in err and "quality_floor" in run.data.tags["error"]
    assert not mlflow.artifacts.list_artifacts(run_id=run.info.run_id, artifact_path="onnx")


def test_int4_with_tied_embeddings_shares_one_8_bit_weight(tracking, tmp_path):
    import onnx

    folder = _variant("tiny-qwen2", tmp_path / "qwen2-tied", {"tie_word_embeddings": True}, _tied)
    run_id = convert(ConvertArgs(model=str(folder), target="cpu-int4"))
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["quality.mean_kld"] <= 0.3
    onnx_dir = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/onnx", dst_path=str(tmp_path / "out")))
    nodes = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph.node
    (gather,) = [n for n in nodes if n.op_type == "GatherBlockQuantized"]
    (head,) = [n for n in nodes if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/")]
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in (gather, head)}
    assert set(bits.values()) == {8} and head.input[1] in {i for n in nodes for i in n.input if n is not head}
