"""Wrong input to every entry point and to the served model, one table each.

Steps: each row runs a step script's `main(argv)` (its real argument parsing) against the shared store; the step
must stop with a message that names what was wrong and what is allowed, and leave no FINISHED (or RUNNING) run.
Served model: each row posts a raw body to `mlflow models serve`; the answer must be a 4xx that names the
problem, and the server must go on answering. The parser's own property-based test is in tests/unit/test_chat_schema.py.
"""

import importlib
import json

import mlflow
import pytest
import yaml

from hf2mlflow import PROJECT_ROOT
from hf2mlflow.runtime.chat_schema import MAX_CONTENT_CHARS, MAX_MESSAGES, ChatRequestError, parse_request
from tests.support import HELLO, all_runs, local_store, post

NO_RUN = "0" * 32  # a well-formed run ID that no store holds
TARGET = "execution_provider: cpu\nprecision: int4\ntransformers: {device: cpu, dtype: float32}\n"
# Written to {configs}, where rows name them by path: each is valid but for the one fault its name says.
FILES = {
    "misspelled-target.yaml": TARGET.replace("precision", "precission"),
    "wrong-type-target.yaml": TARGET + "generation: {max_new_tokens: lots}\n",
    "fp16-on-cpu.yaml": TARGET.replace("int4", "fp16"),
    "fp16-torch-on-cpu.yaml": TARGET.replace("int4", "fp32").replace("float32", "float16"),
    "misspelled-model.yaml": "hub_idd: microsoft/Phi-3-mini-4k-instruct\n",
    "wrong-type-model.yaml": "builtin: tiny-phi3\ntrust_remote_code: maybe\n",
    "misspelled-dataset.yaml": "path: qa.jsonl\nmetrix: [rouge_l]\n",
    "wrong-type-dataset.yaml": "path: qa.jsonl\nmax_new_tokens: many\n",
    "no-jsonl-dataset.yaml": "path: gone.jsonl\n",
    "misspelled-sweep.yaml": "points:\n  - {builder_options.blok_size: 64}\n",
    "bad-value-sweep.yaml": "points:\n  - {builder_options.block_size: 48}\n",
    "qa.jsonl": '{"messages": [{"role": "user", "content": "Capital of France?"}], "reference": "Paris"}\n',
}
BATCH = ["--input", "{configs}/qa.jsonl", "--output", "{missing}/answers.parquet"]


def step_row(step, argv, *expected, id):
    return pytest.param(step, argv, expected, id=f"{step}-{id}")


# (step, argv, fragments the message must hold: what was wrong, and what is allowed); {name}s are filled in from
# the `values` fixture.
STEP_ROWS = [
    step_row("convert_onnx", ["--target", "{configs}/misspelled-target.yaml"],
             "misspelled-target.yaml", "key 'precission': unknown key; allowed keys:", "did you mean 'precision'",
             id="misspelled-target-key"),
    step_row("convert_onnx", ["--target", "{configs}/wrong-type-target.yaml"],
             "wrong-type-target.yaml", "key 'generation.max_new_tokens'", "valid integer", "'lots'",
             id="wrong-type-in-target"),
    step_row("convert_onnx", ["--target", "{configs}/fp16-on-cpu.yaml"],
             "fp16-on-cpu.yaml", "precision 'fp16' is not built for execution_provider 'cpu'",
             "allowed precisions for cpu: fp32, int8, int4", id="precision-provider-combination"),
    step_row("convert_onnx", ["--target", "cpu-int4", "--exporter", "optimum"],
             "the optimum exporter does not build precision 'int4'", "optimum builds cpu: fp32, fp16",
             id="exporter-target-combination"),
    step_row("convert_onnx", ["--target", "{missing}/target.yaml"],
             "target config file not found: {missing}/target.yaml", "shipped targets: cpu-fp32",
             id="missing-target-file"),
    step_row("convert_onnx", ["--model", "{configs}/misspelled-model.yaml"],
             "misspelled-model.yaml", "key 'hub_idd': unknown key", "did you mean 'hub_id'",
             id="misspelled-model-key"),
    step_row("convert_onnx", ["--model", "{configs}/wrong-type-model.yaml"],
             "wrong-type-model.yaml", "key 'trust_remote_code'", "valid boolean", "'maybe'", id="wrong-type-in-model"),
    step_row("convert_onnx", ["--model", "{missing}/model"],
             "model folder not found: {missing}/model", "config.json", "shipped models:", id="missing-model-folder"),
    step_row("convert_onnx", ["--modle", "tiny-phi3"],
             "unknown argument(s) --modle tiny-phi3", "did you mean --model", "allowed: --model, --target",
             id="misspelled-argument"),
    step_row("convert_onnx", ["--memory_budget_gib", "lots"],
             "--memory_budget_gib", "invalid float value: 'lots'", id="wrong-type-argument"),
    step_row("convert_onnx", ["--builder_memory", "tiny"],
             "builder_memory 'tiny' is not allowed; allowed: auto, standard, low", id="builder-memory-value"),

    step_row("log_pyfunc", [], "the following arguments are required: --convert_run_id", id="missing-run-id"),
    step_row("log_pyfunc", ["--convert_run_id", NO_RUN],
             f"convert_run_id '{NO_RUN}': no such run", "the run ID of a FINISHED convert_onnx run",
             id="run-id-does-not-exist"),
    step_row("log_pyfunc", ["--convert_run_id", "{pyfunc_run_id}"],
             "'{pyfunc_run_id}' is a log_pyfunc run, not a convert_onnx run", id="run-id-of-another-step"),
    step_row("log_pyfunc", ["--convert_run_id", "{convert_run_id}", "--target", "cpu-fp32"],
             "target 'cpu-fp32' is fp32 on cpu", "built int4 for cpu", "convert again for that target",
             id="target-of-another-conversion"),
    step_row("log_pyfunc", ["--convert_run_id", "{convert_run_id}", "--target", "{configs}/misspelled-target.yaml"],
             "misspelled-target.yaml", "key 'precission': unknown key", id="misspelled-target-key"),
    step_row("log_pyfunc", ["--convert_run_id", "{convert_run_id}", "--interface", "json"],
             "interface 'json' is not allowed; allowed: chat, prompt", id="interface-value"),

    step_row("log_transformers", ["--target", "{configs}/fp16-torch-on-cpu.yaml"],
             "fp16-torch-on-cpu.yaml", "key 'transformers'", "dtype 'float16' needs device 'cuda'",
             "on 'cpu' use 'float32' or 'bfloat16'", id="dtype-device-combination"),
    step_row("log_transformers", ["--target", "{configs}/wrong-type-target.yaml"],
             "key 'generation.max_new_tokens'", "valid integer", id="wrong-type-in-target"),
    step_row("log_transformers", ["--model", "{missing}/model.yaml"],
             "model config file not found: {missing}/model.yaml", "shipped models:", id="missing-model-file"),
    step_row("log_transformers", ["--save_pretrained", "maybe"],
             "--save_pretrained", "got maybe but expected one of yes/no, true/false", id="wrong-type-argument"),
    step_row("log_transformers", ["--target", "cpu-fp32", "--dtype", "float16"],
             "unknown argument(s) --dtype float16", "allowed: --model, --target", id="unknown-argument"),

    step_row("evaluate", [], "the following arguments are required: --models", id="missing-models"),
    step_row("evaluate", ["--models", "{model_uri}", "--dataset", "{missing}/dataset.yaml"],
             "dataset config file not found: {missing}/dataset.yaml", "shipped datasets: capitals-and-facts",
             id="missing-dataset-file"),
    step_row("evaluate", ["--models", "{model_uri}", "--dataset", "{configs}/no-jsonl-dataset.yaml"],
             "no-jsonl-dataset", "key 'path'", "gone.jsonl", "not found", "a JSONL file next to the YAML file",
             id="missing-jsonl-file"),
    step_row("evaluate", ["--models", "{model_uri}", "--dataset", "{configs}/misspelled-dataset.yaml"],
             "misspelled-dataset.yaml", "key 'metrix': unknown key", "did you mean 'metrics'",
             id="misspelled-dataset-key"),
    step_row("evaluate", ["--models", "{model_uri}", "--dataset", "{configs}/wrong-type-dataset.yaml"],
             "wrong-type-dataset.yaml", "key 'max_new_tokens'", "valid integer", "'many'", id="wrong-type-in-dataset"),
    step_row("evaluate", ["--models", NO_RUN],
             f"run ID '{NO_RUN}': no such run", "give a log_pyfunc or log_transformers run ID, or a model URI",
             id="run-id-does-not-exist"),
    step_row("evaluate", ["--models", "{convert_run_id}"],
             "'{convert_run_id}' (convert_onnx run) holds no logged model",
             "give a log_pyfunc or log_transformers run ID, or a model URI", id="run-id-of-another-step"),
    step_row("evaluate", ["--models", "models:/no-such-model@candidate"],
             "'models:/no-such-model@candidate' does not load", "models:/name@alias, models:/name/version",
             id="model-uri-does-not-load"),
    step_row("evaluate", ["--models", "{model_uri}", "--limit", "few"],
             "--limit", "invalid int value: 'few'", id="wrong-type-argument"),
    step_row("evaluate", ["--models", "{model_uri}", "--limit", "-1"],
             "limit must be 0 (the default) or positive", id="negative-limit"),

    step_row("main", ["--rerun_from", "convert"],
             "rerun_from 'convert' is not a step; allowed: convert_onnx, log_pyfunc", id="rerun-from-value"),
    step_row("main", ["--eval_limit", "lots"], "--eval_limit", "invalid int value: 'lots'", id="wrong-type-argument"),
    step_row("main", ["--eval_limit", "-2"],
             "eval_limit must be 0 (all examples) or positive, got -2", id="negative-eval-limit"),
    step_row("main", ["--targt", "cpu-fp32"],
             "unknown argument(s) --targt cpu-fp32", "did you mean --target", id="misspelled-argument"),
    step_row("main", ["--model", "{configs}/misspelled-model.yaml"],
             "misspelled-model.yaml", "key 'hub_idd': unknown key", "allowed keys:", id="misspelled-model-key"),
    step_row("main", ["--target", "{configs}/fp16-on-cpu.yaml"],
             "precision 'fp16' is not built for execution_provider 'cpu'", "allowed precisions for cpu",
             id="precision-provider-combination"),
    step_row("main", ["--transformers_target", "dml-int4"],
             "transformers_target 'dml-int4'", "no `transformers` section", "Targets for this flavor: cpu-fp32",
             id="transformers-target-without-transformers"),
    step_row("main", ["--dataset", "{missing}/dataset.yaml"],
             "dataset config file not found: {missing}/dataset.yaml", "shipped datasets:", id="missing-dataset-file"),
    step_row("main", ["--dataset", "{configs}/no-jsonl-dataset.yaml"],
             "gone.jsonl", "a JSONL file next to the YAML file", id="missing-jsonl-file"),

    step_row("sweep", ["--sweep", "{configs}/misspelled-sweep.yaml"],
             "misspelled-sweep.yaml", "unknown option(s) builder_options.blok_size",
             "a sweep may vary: builder_options.block_size", id="misspelled-option"),
    step_row("sweep", ["--sweep", "{configs}/bad-value-sweep.yaml"],
             "bad-value-sweep.yaml", "point block_size=48", "Input should be 16, 32, 64, 128 or 256",
             id="option-value"),
    step_row("sweep", ["--sweep", "no-such-sweep"],
             "unknown sweep 'no-such-sweep'", "shipped sweeps: cpu-int4-grid", id="unknown-sweep"),
    step_row("sweep", ["--sweep", "cpu-int4-small", "--alias", "v3"],
             "alias:", "v3", id="reserved-alias"),
    step_row("sweep", ["--eval_limit", "-1"],
             "eval_limit must be 0 (all examples) or positive, got -1", id="negative-eval-limit"),

    step_row("batch_infer", ["--model", "{model_uri}"],
             "the following arguments are required: --input", "--output", id="missing-arguments"),
    step_row("batch_infer", ["--model", NO_RUN, *BATCH],
             f"model: run ID '{NO_RUN}': no such run", "give a log_pyfunc or log_transformers run ID, or a model URI",
             id="run-id-does-not-exist"),
    step_row("batch_infer", ["--model", "models:/no-such-model@candidate", *BATCH],
             "'models:/no-such-model@candidate' does not load", "models:/name@alias", id="model-uri-does-not-load"),
    step_row("batch_infer", ["--model", "{model_uri}", *BATCH, "--max_tokens", "-5"],
             "max_tokens and partitions must be 0 (the default) or positive", id="negative-max-tokens"),
    step_row("batch_infer", ["--model", "{model_uri}", *BATCH, "--partitions", "many"],
             "--partitions", "invalid int value: 'many'", id="wrong-type-argument"),
    step_row("batch_infer", ["--model", "{model_uri}", *BATCH[:2], "--output", "{missing}/a.jsonl"],
             "output '{missing}/a.jsonl' is not allowed; allowed: a .parquet folder or a Spark table name",
             id="output-format"),
]


def test_every_entry_point_has_rows():
    entry_points = yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())["entry_points"]
    assert {row.values[0] for row in STEP_ROWS} == set(entry_points)


@pytest.fixture(scope="module")
def values(logged, tmp_path_factory):
    """What the rows' {name}s stand for: the bad files, a folder that does not exist, the shared store's runs."""
    configs = tmp_path_factory.mktemp("bad-input")
    for name, text in FILES.items():
        (configs / name).write_text(text)
    with local_store(logged["root"]):
        pyfunc_run_id = mlflow.models.get_model_info(logged["uri"]).run_id
    return {"configs": configs, "missing": configs / "missing", "convert_run_id": logged["convert_run_id"],
            "pyfunc_run_id": pyfunc_run_id, "model_uri": logged["uri"]}


@pytest.mark.parametrize("step, argv, expected", STEP_ROWS)
def test_step_says_what_is_wrong_and_finishes_no_run(step, argv, expected, values, logged, capsys):
    step_main = importlib.import_module(f"steps.{step}").main
    with local_store(logged["root"]) as uri:
        before = {r.info.run_id for r in all_runs(uri)}
        with pytest.raises(SystemExit) as exited:
            step_main([arg.format(**values) for arg in argv])
        assert mlflow.active_run() is None
        new_runs = [r for r in all_runs(uri) if r.info.run_id not in before]
    message = capsys.readouterr().err
    assert exited.value.code in (1, 2), message  # 1: the step refused the input; 2: its argument parser did
    for part in expected:
        assert part.format(**values) in message, message
    assert [r.info.status for r in new_runs if r.info.status != "FAILED"] == []


def request_row(body, *expected, id, content_type="application/json"):
    return pytest.param(body, content_type, expected, id=id)


def hello_with(**fields):
    return {"messages": HELLO, **fields}


def one_message(content, role="user"):
    return {"messages": [{"role": role, "content": content}]}


# (raw body, content type, fragments the answer's message must hold). Without "messages" MLflow does not see a
# chat request and answers with its own protocol error; type errors are MLflow's signature check; the rest is
# the model's own request parser (hf2mlflow/runtime/chat_schema.py) and its context check.
REQUEST_ROWS = [
    request_row({"max_tokens": 5}, "exactly one of the input fields", "'inputs'", id="missing-messages"),
    request_row({"messages": []}, "'messages' is required: a non-empty list", id="empty-messages"),
    request_row({"messages": "hi"}, "'messages': Array(", "Expected data to be list", id="messages-not-a-list"),
    request_row({"messages": [{"content": "hi"}]}, "Missing required properties: {'role'}", id="missing-role"),
    request_row(one_message("hi", role="robot"), "messages[0].role must be one of system, user, assistant, got 'robot'",
                id="bad-role"),
    request_row(one_message("hi", role="tool"), "messages[0].role must be one of system, user, assistant, got 'tool'",
                id="unsupported-role"),
    request_row(one_message(""), "messages[0].content must be a non-empty string, got ''", id="empty-content"),
    request_row(one_message(None), "messages[0].content must be a non-empty string, got None", id="null-content"),
    request_row(one_message(5), "key `content`. Expected type string, received type int", id="number-content"),
    request_row(one_message([{"type": "text", "text": "hi"}]),
                "key `content`. Expected type string, received type list", id="content-parts"),
    request_row(hello_with(max_tokens=10**9), "'max_tokens' must be between 1 and 1048576, got 1000000000",
                id="huge-max-tokens"),
    request_row(hello_with(max_tokens=2**70), "column max_tokens", "convert", id="max-tokens-beyond-int64"),
    request_row(hello_with(max_tokens=-3), "'max_tokens' must be between 1 and 1048576, got -3",
                id="negative-max-tokens"),
    request_row(hello_with(temperature=-0.5), "'temperature' must be between 0.0 and 2.0, got -0.5",
                id="negative-temperature"),
    request_row(hello_with(top_p=-0.1), "'top_p' must be between", "1.0, got -0.1", id="negative-top-p"),
    request_row(hello_with(n=-2), "'n' must be between 1 and 8, got -2", id="negative-n"),
    request_row(hello_with(top_k=-1), "'top_k' must be between 0 and", id="negative-top-k"),
    request_row(hello_with(seed=-5), "'seed' must be between 0 and", "got -5", id="negative-seed"),
    request_row(hello_with(max_tokens="ten"), "column max_tokens", "int64", id="text-max-tokens"),
    request_row(hello_with(max_tokens=2.5), "column max_tokens", "float64 to int64", id="fractional-max-tokens"),
    request_row(hello_with(temperature="hot"), "column temperature", "double", id="text-temperature"),
    request_row(hello_with(stream="yes"), "'stream' must be true or false, got 'yes'", id="text-stream"),
    request_row(hello_with(stop=["a", "b", "c", "d", "e"]), "'stop' must be a string or a list of at most 4",
                id="too-many-stops"),
    request_row(hello_with(frequency_penalty=0.5),
                "'frequency_penalty' is not supported by this model; leave it out or set 0",
                id="unsupported-penalty"),
    request_row(hello_with(custom_inputs={"temperature": 1}), "'custom_inputs' may hold only 'seed'",
                id="unknown-custom-input"),
    request_row(one_message("x " * 3000), "this model's context length is 2048", id="prompt-beyond-context"),
    request_row(one_message("x" * (MAX_CONTENT_CHARS + 1)), f"at most {MAX_CONTENT_CHARS} are allowed",
                id="prompt-beyond-character-limit"),
    request_row({"messages": [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)},
                f"at most {MAX_MESSAGES} are allowed", id="too-many-messages"),
    request_row(b'{"messages": [{"role": "user", "content": "caf\xc3\x28"}]}',
                "valid JSON", "UnicodeDecodeError", "invalid continuation byte", id="invalid-utf8"),
    request_row(b'{"messages": [{"role": "user", "content": "a\xed\xa0\x80b"}]}',
                "messages[0].content is not valid Unicode", "lone surrogate", id="utf8-encoded-surrogate"),
    request_row(b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
                "messages[0].content is not valid Unicode", "lone surrogate", id="escaped-lone-surrogate"),
    request_row(b"this is not JSON", "Ensure that input is a valid JSON formatted string", id="not-json"),
    request_row(b'{"messages": [', "valid JSON formatted string", id="truncated-json"),
    request_row([hello_with()], "exactly one of the input fields", "Received a list", id="top-level-list"),
    request_row(hello_with(), "only supports the following content types", "application/json",
                content_type="text/plain", id="wrong-content-type"),
]


@pytest.mark.parametrize("body, content_type, expected", REQUEST_ROWS)
def test_served_model_answers_4xx_that_names_the_problem_and_keeps_serving(served_model, body, content_type,
                                                                          expected):
    url, _ = served_model
    status, answer = post(url, body, content_type)
    text = answer.get("message", "") if isinstance(answer, dict) else str(answer)
    assert 400 <= status < 500, (status, text[-2000:])
    for part in expected:
        assert part in text, text[-2000:]
    assert "Traceback" not in json.dumps(answer)
    status, answer = post(url, hello_with(max_tokens=2))
    assert status == 200 and answer[0]["object"] == "chat.completion"


def test_unknown_request_fields_mlflow_drops_them_the_model_parser_refuses_them(served_model, logged):
    """MLflow's chat signature drops top-level fields it does not name before the model sees them (MLflow 3.17:
    a warning in the server log, and the answer is the one without them), so `mlflow models serve` cannot
    refuse a misspelled `max_token`. The model's own parser refuses them wherever it gets the raw request
    (the OpenAI-compatible front answers 400: tests/test_openai_serving.py)."""
    url, _ = served_model
    status, with_typo = post(url, hello_with(max_tokens=3, max_token=5))
    assert status == 200
    assert with_typo[0]["choices"] == post(url, hello_with(max_tokens=3))[1][0]["choices"]
    log = (logged["root"] / "serve.log").read_text()
    assert "Found extra inputs in the model input that are not defined in the model signature" in log
    assert "max_token'" in log
    with pytest.raises(ChatRequestError, match=r"unknown request field\(s\) max_token; allowed: messages"):
        parse_request(hello_with(max_token=5), {"max_new_tokens": 16, "temperature": 0.0, "top_p": 1.0, "top_k": 0})
