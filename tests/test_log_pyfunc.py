import concurrent.futures
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from hf2mlflow.errors import ConfigError, StepError
from hf2mlflow.log_model.pyfunc import LogPyfuncArgs, log_pyfunc
from tests.support import HELLO, all_runs, ask, local_store, pickle_free_model


@pytest.fixture(scope="module")
def model(logged):
    with pickle_free_model(logged["root"], logged["uri"]) as loaded:
        yield loaded


@pytest.fixture
def in_store(logged):
    """Point MLflow at the shared store, for tests that read or write its registry."""
    with local_store(logged["root"]):
        yield


@pytest.mark.usefixtures("in_store")
def test_registered_with_alias_and_lean_requirements(logged):
    name = logged["uri"].split("/")[1].split("@")[0]
    version = mlflow.MlflowClient().get_model_version_by_alias(name, "candidate")
    run = mlflow.get_run(version.run_id)
    assert run.data.tags["convert_run_id"] == logged["convert_run_id"] and run.data.tags["step"] == "log_pyfunc"
    local = Path(mlflow.artifacts.download_artifacts(logged["uri"]))
    reqs = (local / "requirements.txt").read_text().split()
    assert [r.split("==")[0] for r in reqs] == ["mlflow", "onnxruntime", "tokenizers", "jinja2", "numpy"]
    assert "python_model.pkl" not in {p.name for p in local.rglob("*")}


def test_answers_in_the_openai_chat_schema(model):
    response = ask(model, max_tokens=6)
    assert response["object"] == "chat.completion" and response["id"].startswith("chatcmpl-")
    assert response["model"] == "tiny-phi3" and isinstance(response["created"], int)
    (choice,) = response["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    usage = response["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 6


def test_greedy_by_default_and_seeded_sampling_repeats(model):
    assert ask(model, max_tokens=8)["choices"] == ask(model, max_tokens=8, temperature=0)["choices"]
    sampled = [ask(model, max_tokens=12, temperature=1.5, custom_inputs={"seed": s})["choices"][0]["message"]["content"]
               for s in (1, 1, 2, 3)]
    assert sampled[0] == sampled[1]
    assert len(set(sampled[1:])) > 1
    (by_param,) = model.predict({"messages": HELLO, "max_tokens": 12, "temperature": 1.5}, params={"seed": 1})
    assert by_param["choices"][0]["message"]["content"] == sampled[0]


def test_n_choices(model):
    response = ask(model, max_tokens=6, n=3, temperature=1.0, custom_inputs={"seed": 7})
    assert [c["index"] for c in response["choices"]] == [0, 1, 2]


def test_stop_string_ends_the_answer(model):
    full = ask(model, max_tokens=20)["choices"][0]["message"]["content"]
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip())
    stopped = ask(model, max_tokens=20, stop=[stop])["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["message"]["content"] == full[:full.find(stop)]


def test_stream_matches_predict(model):
    full = ask(model, max_tokens=10)["choices"][0]
    chunks = list(model.predict_stream({"messages": HELLO, "max_tokens": 10}))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == full["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["finish_reason"]


def test_batch_and_concurrent_requests_are_independent(model):
    requests = [{"messages": [{"role": "user", "content": f"Question number {i}"}], "max_tokens": 4 + i}
                for i in range(6)]
    one_by_one = [model.predict(r)[0]["choices"] for r in requests]
    batch = model.predict(pd.DataFrame(requests))
    assert [r["choices"] for r in batch] == one_by_one
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        concurrent_answers = list(pool.map(lambda r: model.predict(r)[0]["choices"], requests * 2))
    assert concurrent_answers == one_by_one * 2
    assert max(model.unwrap_python_model().engine.scheduler.batch_sizes) >= 4  # they did generate together


def test_a_late_request_starts_while_a_long_one_decodes_and_both_answer_as_alone(model):
    """Continuous batching: a request that arrives while a long answer streams is answered before that answer
    ends (it joined the running batch), and both answers are what each request gets alone."""
    story = [{"role": "user", "content": "Write a very long story about a dragon"}]  # 1500 tokens, greedy
    long = {"messages": story, "max_tokens": 1500}
    late = {"messages": [{"role": "user", "content": "And briefly?"}], "max_tokens": 8}
    long_alone = model.predict(long)[0]["choices"][0]["message"]
    late_alone = model.predict(late)[0]["choices"][0]["message"]
    assert model.predict(long)[0]["usage"]["completion_tokens"] > 300  # a long answer

    scheduler = model.unwrap_python_model().engine.scheduler
    together_before = sum(steps for rows, steps in scheduler.batch_sizes.items() if rows == 2)
    chunks = model.predict_stream(long)
    streamed = [next(chunks), next(chunks)]  # the long answer is decoding
    late_answer = model.predict(late)[0]["choices"][0]["message"]
    rest = list(chunks)
    assert rest, "the late request was answered only after the long one ended"
    assert late_answer == late_alone
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in streamed + rest)
    assert text == long_alone["content"]
    assert sum(steps for rows, steps in scheduler.batch_sizes.items() if rows == 2) > together_before


def test_streams_closed_or_dropped_after_their_first_chunk_stop_decoding_at_once(model):
    """As many long streams as the model takes (max_batch + max_queue), half closed and half dropped after their
    first chunk (the role chunk: queued, no token read yet), leave the model idle and answering as fast as before."""
    scheduler = model.unwrap_python_model().engine.scheduler
    quick = {"messages": HELLO, "max_tokens": 8}

    def latency() -> float:
        started = time.perf_counter()
        model.predict(quick)
        return time.perf_counter() - started

    idle = min(latency() for _ in range(3))
    story = [{"role": "user", "content": "Write a very long story about a dragon"}]  # 1500 tokens, greedy
    long = {"messages": story, "max_tokens": 1500}
    streams = [model.predict_stream(long) for _ in range(40)]
    assert all(next(stream)["choices"][0]["delta"]["role"] == "assistant" for stream in streams)
    for stream in streams[::2]:
        stream.close()
    del streams, stream  # the others are dropped
    time.sleep(0.2)  # a few decode steps at most
    steps = sum(scheduler.batch_sizes.values())
    time.sleep(0.3)
    assert sum(scheduler.batch_sizes.values()) == steps, "closed streams are still decoding"
    after = min(latency() for _ in range(3))
    print(f"a quick request idle {idle * 1000:.0f} ms, after the 40 streams {after * 1000:.0f} ms")
    assert after < 2 * idle + 0.2


def test_a_request_that_fans_out_beyond_the_queue_waits_for_its_own_rows(model):
    """8 rows x n=8 on an idle model are 64 sequences, more than max_batch + max_queue (40): the request's own
    sequences wait for one another, and every choice is the row's lone answer. A request that could never be
    served (rows x n beyond max_request_sequences) is refused at once."""
    requests = [{"messages": [{"role": "user", "content": f"Question number {i}"}], "max_tokens": 3} for i in range(8)]
    alone = [model.predict(r)[0]["choices"][0]["message"] for r in requests]
    answers = model.predict(pd.DataFrame([{**r, "n": 8} for r in requests]))
    assert [[c["message"] for c in a["choices"]] for a in answers] == [[m] * 8 for m in alone]
    with pytest.raises(MlflowException, match=r"264 sequences \(33 rows x n\).*max_request_sequences 256") as refused:
        model.predict(pd.DataFrame([{**requests[0], "n": 8}] * 33))
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"  # HTTP 400


@pytest.mark.usefixtures("in_store")
def test_batch_inference_rows_that_fan_out_beyond_the_queue_all_answer(logged):
    """batch_infer's model (a partition's rows, each one request, answered concurrently): 8 rows x n=8 on an idle
    model all answer; none becomes a "busy" row error."""
    import json
    from types import SimpleNamespace

    from hf2mlflow.runtime.batch_chat_model import BatchChatModel

    batch = BatchChatModel()
    batch.load_context(SimpleNamespace(artifacts={"model": mlflow.artifacts.download_artifacts(logged["uri"])},
                                       model_config={}))
    rows = [json.dumps({"messages": [{"role": "user", "content": f"Question number {i}"}], "max_tokens": 3, "n": 8})
            for i in range(8)]
    results = [json.loads(r) for r in batch.predict(None, pd.DataFrame({"request": rows}))["result"]]
    assert [r["error"] for r in results] == [None] * 8
    assert all(len(json.loads(r["response"])["choices"]) == 8 for r in results)


@pytest.mark.parametrize("request_body, expected", [
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role must be one of system, user, assistant"),
    ({"messages": HELLO, "max_tokens": -1}, "'max_tokens' must be between 1"),
    ({"messages": HELLO, "temperature": 5.0}, "'temperature' must be between 0.0 and 2.0"),
    ({"messages": [{"role": "user", "content": "x " * 3000}]}, "context length is 2048"),
])
def test_bad_requests_say_what_is_allowed(model, request_body, expected):
    with pytest.raises(MlflowException, match=expected.replace("[", r"\[").replace("]", r"\]")):
        model.predict(request_body)


# The seed's own request to its custom wrapper: a prompt already in Phi-3's chat format.
SEED_PROMPT = "<|system|>You are a stand-up comedian.<|end|><|user|>Tell me a joke about atom<|end|><|assistant|>"


@pytest.mark.usefixtures("in_store")
def test_the_seed_prompt_request_is_continued_as_it_is_with_its_settings_honoured(logged, tmp_path):
    """interface=prompt: the seed's signature ({"prompt": string} -> string), the prompt tokenized as it is (the
    ids onnxruntime-genai's tokenizer gives the raw text, no second chat template around it), and generation
    settings taken from a row's columns or from MLflow params, checked like the chat schema's."""
    import onnxruntime_genai as og

    uri = log_pyfunc(LogPyfuncArgs(convert_run_id=logged["convert_run_id"], interface="prompt",
                                   registered_model_name="tiny-phi3-prompt"))
    folder = mlflow.artifacts.download_artifacts(f"runs:/{logged['convert_run_id']}/onnx", dst_path=str(tmp_path))
    raw_ids = [int(i) for i in og.Tokenizer(og.Model(folder)).encode(SEED_PROMPT)]
    with pickle_free_model(logged["root"], uri) as model:
        inputs = model.metadata.get_input_schema()
        assert [(c.name, c.required) for c in inputs.inputs][:1] == [("prompt", True)]
        assert not any(c.required for c in inputs.inputs[1:])
        assert str(model.metadata.get_output_schema()) == "[string (required)]"

        pyfunc = model.unwrap_python_model()
        request = pyfunc._request({"prompt": SEED_PROMPT}, None)
        assert pyfunc.engine.encode(request) == raw_ids

        (answer,) = model.predict({"prompt": SEED_PROMPT})
        assert isinstance(answer, str) and answer
        # max_tokens as a column or a param: one token is a prefix of the longer answer.
        (short,) = model.predict({"prompt": SEED_PROMPT, "max_tokens": 1})
        (short_param,) = model.predict({"prompt": SEED_PROMPT}, params={"max_tokens": 1})
        assert short == short_param and answer.startswith(short) and len(short) < len(answer)
        # A seeded sampled answer repeats; two rows of one DataFrame answer each.
        sampled = pd.DataFrame({"prompt": [SEED_PROMPT, "Hi"], "temperature": [0.9, 0.9], "seed": [7, 7]})
        assert model.predict(sampled) == model.predict(sampled)
        assert "".join(model.predict_stream({"prompt": SEED_PROMPT})) == answer
        with pytest.raises(MlflowException, match="'temperature' must be between 0.0 and 2.0, got 5"):
            model.predict({"prompt": SEED_PROMPT}, params={"temperature": 5.0})
        with pytest.raises(MlflowException, match="'prompt' is required: a non-empty string"):
            model.predict({"prompt": ""})


@pytest.mark.usefixtures("in_store")
def test_tampered_artifacts_fail_at_load(logged, tmp_path):
    local = Path(mlflow.artifacts.download_artifacts(logged["uri"], dst_path=str(tmp_path / "copy")))
    data = next(local.rglob("model.onnx.data"))
    data.write_bytes(b"\0" + data.read_bytes()[1:])
    with pytest.raises(MlflowException, match="do not match the conversion manifest: .*model.onnx.data: sha256"):
        mlflow.pyfunc.load_model(str(local))


@pytest.mark.usefixtures("in_store")
def test_step_refuses_runs_that_are_not_finished_conversions(logged):
    with pytest.raises(StepError, match="convert_run_id 'nope': no such run"):
        log_pyfunc(LogPyfuncArgs(convert_run_id="nope"))
    name = logged["uri"].split("/")[1].split("@")[0]
    pyfunc_run = mlflow.MlflowClient().get_model_version_by_alias(name, "candidate").run_id
    with pytest.raises(StepError, match=f"'{pyfunc_run}' is a log_pyfunc run, not a convert_onnx run"):
        log_pyfunc(LogPyfuncArgs(convert_run_id=pyfunc_run))


@pytest.mark.usefixtures("in_store")
@pytest.mark.parametrize("alias, expected", [("latest", "'latest' alias name"), ("v3", "'v3' is reserved"),
                                             ("has space", "Invalid alias name")])
def test_bad_alias_fails_before_any_run(logged, alias, expected):
    before = len(all_runs(logged["tracking_uri"]))
    with pytest.raises(ConfigError, match=f"alias: .*{expected}"):
        log_pyfunc(LogPyfuncArgs(convert_run_id=logged["convert_run_id"], alias=alias))
    assert len(all_runs(logged["tracking_uri"])) == before


def test_the_gpu_engine_answers_as_the_cpu_engine(model, logged, tmp_path):
    """GPU targets serve through onnxruntime-genai (genai_chat.GenAIChatEngine), one sequence at a time; on the same
    files it answers as the CPU engine does, with the same prompt ids (onnxruntime-genai's tokenizer and chat
    template agree with tokenizer.json and Jinja on this model) and the same tokens. (Not always the same text on
    random weights: onnxruntime-genai's stream decoder drops bytes that are no UTF-8, and sometimes characters.)"""
    from hf2mlflow.runtime.chat_schema import parse_request
    from hf2mlflow.runtime.genai_chat import GenAIChatEngine

    with local_store(logged["root"]):
        folder = mlflow.artifacts.download_artifacts(f"runs:/{logged['convert_run_id']}/onnx", dst_path=str(tmp_path))
    gpu_engine = GenAIChatEngine(Path(folder), "tiny-phi3")
    cpu_engine = model.unwrap_python_model().engine
    defaults = {"max_new_tokens": 24, "temperature": 0.0, "top_p": 1.0, "top_k": 0}
    for question in ("Hello there", "What is the capital of France?"):
        request = parse_request({"messages": [{"role": "user", "content": question}]}, defaults, None)
        assert gpu_engine.encode(request) == cpu_engine.encode(request)
        ids = cpu_engine.encode(request)
        assert list(gpu_engine._choice_tokens(ids, request, 0)) == list(cpu_engine._choice_tokens(ids, request, 0))
        gpu, cpu = gpu_engine.chat(request), cpu_engine.chat(request)
        assert gpu["usage"] == cpu["usage"]
        assert [c["finish_reason"] for c in gpu["choices"]] == [c["finish_reason"] for c in cpu["choices"]]
