"""The registered pyfunc behind a real `mlflow models serve` on 127.0.0.1, over real HTTP."""

import concurrent.futures
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from conftest import HELLO, free_port


def post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def server(logged):
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=logged["tracking_uri"], MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    log = open(logged["root"] / "serve.log", "w")
    proc = subprocess.Popen(["mlflow", "models", "serve", "-m", logged["uri"], "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{base}/ping", timeout=2)
            break
        except OSError:
            assert proc.poll() is None, (logged["root"] / "serve.log").read_text()[-3000:]
            time.sleep(1)
    else:
        pytest.fail("model server did not come up in 180 s")
    yield f"{base}/invocations"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    log.close()


def test_served_model_answers_chat_requests(server):
    status, body = post(server, {"messages": HELLO, "max_tokens": 5})
    assert status == 200
    (response,) = body if isinstance(body, list) else body["predictions"]
    assert response["object"] == "chat.completion"
    assert response["usage"]["completion_tokens"] <= 5 and response["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("request_body, expected", [
    # Without "messages" MLflow does not see a chat request and answers with its own protocol error.
    ({"temperature": 0.5}, "exactly one of the input fields"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role must be one of system, user, assistant"),
    ({"messages": HELLO, "max_tokens": -3}, "'max_tokens' must be between 1"),
    ({"messages": [{"role": "user", "content": "x " * 3000}]}, "context length is 2048"),
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, request_body, expected):
    status, body = post(server, request_body)
    assert 400 <= status < 500 and expected in body["message"]
    assert post(server, {"messages": HELLO, "max_tokens": 2})[0] == 200


def test_concurrent_requests_get_their_own_answers(server):
    requests = [{"messages": [{"role": "user", "content": f"Tell me about {i}"}], "max_tokens": 3 + i}
                for i in range(4)]
    sequential = [post(server, r)[1] for r in requests]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda r: post(server, r)[1], requests))
    choices = lambda bodies: [(b if isinstance(b, list) else b["predictions"])[0]["choices"] for b in bodies]
    assert choices(parallel) == choices(sequential)
