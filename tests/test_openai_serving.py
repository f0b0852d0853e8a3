"""The official openai client against our models, over real HTTP, through real processes:

`mlflow models serve` (the session's) <- hf2mlflow.serve.openai_front --model-server-url ("forwarded": whole answers)
                         hf2mlflow.serve.openai_front --model-uri        ("loaded": whole and streamed)
                         mlflow gateway start (openai provider) -> the loaded server ("gateway")
"""

import concurrent.futures
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml

from tests.support import free_port

REPO = Path(__file__).resolve().parents[1]
HELLO = [{"role": "user", "content": "Hello there"}]


def _start(name, command, root, env, processes):
    log = open(root / f"{name}.log", "w")
    # A session of its own, so the finaliser can stop the process and every worker it forks.
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    processes.append((proc, log))
    return proc


def _wait_healthy(name, proc, url, root, deadline):
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert proc.poll() is None, f"{name} exited:\n" + (root / f"{name}.log").read_text()[-3000:]
            time.sleep(0.5)
    pytest.fail(f"{name} did not answer {url} in time:\n" + (root / f"{name}.log").read_text()[-3000:])


@pytest.fixture(scope="module")
def servers(logged, served_model):
    """The session's `mlflow models serve` (conftest's `served_model`) and three processes of this module's,
    started at once (they connect to each other only per request)."""
    root, served = logged["root"], logged["uri"].removeprefix("models:/").split("@")[0]
    env = dict(os.environ, MLFLOW_TRACKING_URI=logged["tracking_uri"], MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    ports = {name: free_port() for name in ("forwarded", "loaded", "gateway")}
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    url["model_server"] = served_model[0].removesuffix("/invocations")
    # The shipped gateway template, pointed at this test's ports.
    gateway_config = yaml.safe_load((REPO / "configs/gateway/openai-compatible.yaml").read_text())
    (endpoint,) = gateway_config["endpoints"]
    endpoint["name"] = endpoint["model"]["name"] = served
    endpoint["model"]["config"]["openai_api_base"] = f"{url['loaded']}/v1"
    (root / "gateway.yaml").write_text(yaml.safe_dump(gateway_config))
    commands = {
        "forwarded": [sys.executable, "-m", "hf2mlflow.serve.openai_front", "--model-server-url", url["model_server"],
                      "--served-model-name", served, "--port", str(ports["forwarded"])],
        "loaded": [sys.executable, "-m", "hf2mlflow.serve.openai_front", "--model-uri", logged["uri"],
                   "--port", str(ports["loaded"])],
        "gateway": ["mlflow", "gateway", "start", "--config-path", str(root / "gateway.yaml"),
                    "--host", "127.0.0.1", "--port", str(ports["gateway"]), "--workers", "1"],
    }
    health = {"forwarded": "/health", "loaded": "/health", "gateway": "/health"}
    processes = []
    try:
        procs = {name: _start(name, command, root, env, processes) for name, command in commands.items()}
        deadline = time.time() + 180
        for name, proc in procs.items():
            _wait_healthy(name, proc, url[name] + health[name], root, deadline)
        yield {"url": url, "served": served}
    finally:
        for proc, _log in processes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, log in processes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()


def client(servers, name) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{servers['url'][name]}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(params=["loaded", "forwarded"])
def chat(request, servers):
    """create(**kwargs) against one backend, with the served model's name filled in."""
    api = client(servers, request.param)
    return lambda **kwargs: api.chat.completions.create(**{"model": servers["served"], **kwargs})


def _usage_is_consistent(response, max_tokens):
    usage = response.usage
    assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    for choice in response.choices:
        assert choice.finish_reason in ("stop", "length")
    assert usage.completion_tokens <= max_tokens * len(response.choices)


def test_models_lists_the_served_model(servers):
    for name in ("loaded", "forwarded"):
        assert [m.id for m in client(servers, name).models.list()] == [servers["served"]]


def test_chat_completion(chat, servers):
    response = chat(messages=[{"role": "developer", "content": "Answer briefly."}, *HELLO], max_completion_tokens=6)
    assert response.object == "chat.completion" and response.model == servers["served"]
    (choice,) = response.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    _usage_is_consistent(response, 6)


@pytest.mark.parametrize("max_tokens", [1, 5, 12])
def test_max_tokens_is_honoured(chat, max_tokens):
    response = chat(messages=HELLO, max_tokens=max_tokens, n=2, temperature=1.0, seed=7)
    assert len(response.choices) == 2
    _usage_is_consistent(response, max_tokens)
    if all(c.finish_reason == "length" for c in response.choices):
        assert response.usage.completion_tokens == 2 * max_tokens


def test_same_seed_same_answer(chat):
    def ask(seed, top_p=1.0):
        return chat(messages=HELLO, max_tokens=12, temperature=1.0, top_p=top_p, seed=seed).choices[0].message.content
    assert ask(1) == ask(1) and ask(2, top_p=0.8) == ask(2, top_p=0.8)
    assert len({ask(seed) for seed in (1, 2, 3, 4)}) > 1  # the seed reaches the sampler


def test_stop_strings(chat):
    full = chat(messages=HELLO, max_tokens=16).choices[0].message.content  # greedy: the same prefix every time
    stop = full[4:6]
    assert len(stop) == 2, f"the greedy answer is too short to pick a stop string from: {full!r}"
    for given in (stop, [stop, "\u2603never"]):  # OpenAI takes a string or a list
        (choice,) = chat(messages=HELLO, max_tokens=16, stop=given).choices
        assert choice.message.content == full[:full.find(stop)] and choice.finish_reason == "stop"


@pytest.mark.parametrize("kwargs, error, expected", [
    ({"messages": [{"role": "robot", "content": "hi"}]}, openai.BadRequestError,
     "role must be one of system, user, assistant"),
    ({"messages": HELLO, "max_tokens": -3}, openai.BadRequestError, "'max_tokens' must be between 1"),
    ({"messages": HELLO, "logprobs": True}, openai.BadRequestError, "unsupported field(s) logprobs"),
    ({"messages": HELLO, "model": "gpt-4o"}, openai.NotFoundError, "model 'gpt-4o' is not served here"),
])
def test_bad_requests_raise_and_the_servers_keep_serving(chat, kwargs, error, expected):
    with pytest.raises(error) as raised:
        chat(**kwargs)
    assert 400 <= raised.value.status_code < 500 and expected in raised.value.message
    assert chat(messages=HELLO, max_tokens=2).choices[0].message.role == "assistant"


def test_streamed_completion_matches_the_whole_answer(servers):
    api, served = client(servers, "loaded"), servers["served"]
    whole = api.chat.completions.create(model=served, messages=HELLO, max_tokens=10)
    chunks = list(api.chat.completions.create(model=served, messages=HELLO, max_tokens=10, stream=True))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_streaming_refusals(servers):
    served = servers["served"]
    loaded, forwarded = client(servers, "loaded"), client(servers, "forwarded")
    with pytest.raises(openai.BadRequestError, match="role must be one of"):  # before any chunk: a real 400
        loaded.chat.completions.create(model=served, messages=[{"role": "robot", "content": "hi"}], stream=True)
    with pytest.raises(openai.BadRequestError, match="stream_options is only allowed with stream=true"):
        loaded.chat.completions.create(model=served, messages=HELLO, stream_options={"include_usage": True})
    with pytest.raises(openai.BadRequestError, match="streaming needs the model loaded in this server"):
        forwarded.chat.completions.create(model=served, messages=HELLO, stream=True)
    assert len(list(loaded.chat.completions.create(model=served, messages=HELLO, max_tokens=3, stream=True))) >= 2


def test_streamed_usage_when_asked(servers):
    api, served = client(servers, "loaded"), servers["served"]
    whole = api.chat.completions.create(model=served, messages=HELLO, max_tokens=7)
    chunks = list(api.chat.completions.create(model=served, messages=HELLO, max_tokens=7, stream=True,
                                              stream_options={"include_usage": True}))
    *answer, last = chunks
    assert last.choices == [] and last.usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in answer)
    assert "".join(c.choices[0].delta.content or "" for c in answer) == whole.choices[0].message.content
    plain = list(api.chat.completions.create(model=served, messages=HELLO, max_tokens=7, stream=True))
    assert all(c.usage is None and c.choices for c in plain)


def test_concurrent_streams_answer_as_alone(servers):
    api, served = client(servers, "loaded"), servers["served"]
    questions = [[{"role": "user", "content": f"Tell me about the number {i}"}] for i in range(8)]
    alone = [api.chat.completions.create(model=served, messages=q, max_tokens=12).choices[0].message.content
             for q in questions]

    def streamed(messages):
        return "".join(c.choices[0].delta.content or "" for c in api.chat.completions.create(
            model=served, messages=messages, max_tokens=12, stream=True))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(streamed, questions)) == alone


def test_clients_that_disconnect_after_the_first_chunk_leave_the_model_idle(servers):
    """As many long streams as the model takes (max_batch + max_queue), each client gone after its first event (the
    role chunk: most of them still queued): a new request is answered as fast as when idle, not refused (503) or
    queued behind answers nobody reads."""
    api, served = client(servers, "loaded"), servers["served"]
    host, port = servers["url"]["loaded"].removeprefix("http://").split(":")

    def latency() -> float:
        started = time.perf_counter()
        api.chat.completions.create(model=served, messages=HELLO, max_tokens=8)
        return time.perf_counter() - started

    idle = min(latency() for _ in range(3))
    story = [{"role": "user", "content": "Write a very long story about a dragon"}]  # 1500 tokens, greedy
    long = json.dumps({"model": served, "messages": story, "max_tokens": 1500, "stream": True})
    connections = []
    for _ in range(40):
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        connection.request("POST", "/v1/chat/completions", long, {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        connections.append((connection, response))
    for connection, response in connections:  # the client goes: its socket closes
        response.close()
        connection.close()
    time.sleep(0.3)  # the server sees the disconnects
    after = min(latency() for _ in range(3))
    print(f"a quick request idle {idle * 1000:.0f} ms, after the 40 streams {after * 1000:.0f} ms")
    assert after < 2 * idle + 0.2


def test_mlflow_gateway_in_front(servers):
    api, served = client(servers, "gateway"), servers["served"]
    response = api.chat.completions.create(model=served, messages=HELLO, max_tokens=5, temperature=1.0, seed=3)
    again = api.chat.completions.create(model=served, messages=HELLO, max_tokens=5, temperature=1.0, seed=3)
    assert response.choices[0].message.content == again.choices[0].message.content  # seed passes through
    _usage_is_consistent(response, 5)
    # The gateway asks the front for streamed usage (stream_options.include_usage).
    greedy = api.chat.completions.create(model=served, messages=HELLO, max_tokens=6).choices[0].message.content
    chunks = list(api.chat.completions.create(model=served, messages=HELLO, max_tokens=6, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == greedy
    # The gateway keeps the 400 but puts the message in FastAPI's `detail`, where the client does not look.
    with pytest.raises(openai.BadRequestError) as raised:
        api.chat.completions.create(model=served, messages=[{"role": "robot", "content": "hi"}])
    assert "role must be one of" in str(raised.value.body)
    assert api.chat.completions.create(model=served, messages=HELLO, max_tokens=2).choices[0].finish_reason


def test_transformers_flavor_behind_the_same_endpoint(logged, logged_transformers):
    root, port = logged["root"], free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=logged["tracking_uri"])
    processes = []
    try:
        proc = _start("loaded-transformers", [sys.executable, "-m", "hf2mlflow.serve.openai_front", "--model-uri",
                                              logged_transformers, "--port", str(port)], root, env, processes)
        _wait_healthy("loaded-transformers", proc, f"http://127.0.0.1:{port}/health", root, time.time() + 180)
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        name = logged_transformers.removeprefix("models:/").split("@")[0]
        response = api.chat.completions.create(model=name, messages=HELLO, max_tokens=4)
        assert response.choices[0].message.role == "assistant" and response.model == name
        _usage_is_consistent(response, 4)
        with pytest.raises(openai.BadRequestError, match="does not stream"):
            list(api.chat.completions.create(model=name, messages=HELLO, max_tokens=4, stream=True))
        assert api.chat.completions.create(model=name, messages=HELLO, max_tokens=2).usage.completion_tokens <= 2
    finally:
        for proc, log in processes:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
            log.close()
