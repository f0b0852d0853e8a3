"""The registered pyfunc behind a real `mlflow models serve` on 127.0.0.1, over real HTTP."""

import concurrent.futures
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import psutil
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
    yield f"{base}/invocations", proc.pid
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    log.close()


def test_served_model_answers_chat_requests(server):
    status, body = post(server[0], {"messages": HELLO, "max_tokens": 5})
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
    status, body = post(server[0], request_body)
    assert 400 <= status < 500 and expected in body["message"]
    assert post(server[0], {"messages": HELLO, "max_tokens": 2})[0] == 200


def _choices(bodies):
    return [(b if isinstance(b, list) else b["predictions"])[0]["choices"] for b in bodies]


def _tree_rss(pid: int) -> int:
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def test_concurrent_requests_get_their_own_answers(server):
    url, _ = server
    requests = [{"messages": [{"role": "user", "content": f"Tell me about {i}"}], "max_tokens": 3 + i}
                for i in range(4)]
    sequential = [post(url, r)[1] for r in requests]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda r: post(url, r)[1], requests))
    assert _choices(parallel) == _choices(sequential)


def test_load_of_8_clients_no_errors_no_cross_talk_and_memory_levels_off(server):
    """4 rounds of 48 requests from 8 concurrent clients (greedy and seeded sampling, different prompts and
    lengths): every answer is the one the same request gets alone, and the server's resident memory (all its
    processes) stops growing: the last round adds less than 5% (or 30 MiB) to what the second left."""
    url, pid = server
    requests = [{"messages": [{"role": "user", "content": f"Request {i}: say something about {i * 7}"}],
                 "max_tokens": 4 + i % 9, **({"temperature": 0.9, "seed": i} if i % 3 == 0 else {})}
                for i in range(48)]
    expected = _choices([post(url, r)[1] for r in requests])
    rss = [_tree_rss(pid)]
    for _ in range(4):
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda r: post(url, r), requests))
        assert [status for status, _ in answers] == [200] * len(requests)
        assert _choices([body for _, body in answers]) == expected
        rss.append(_tree_rss(pid))
    growth = rss[-1] - rss[2]
    print(f"\nserver RSS after each round (MiB): {[round(r / 2**20) for r in rss]}")
    assert growth < max(0.05 * rss[2], 30 * 2**20), [round(r / 2**20) for r in rss]
