"""The registered pyfunc behind a real `mlflow models serve` on 127.0.0.1 (conftest's `served_model`), over real
HTTP. Its answers to bad requests: tests/test_bad_input.py."""

import concurrent.futures
import os
import re

import psutil
import yaml

from hf2mlflow.log_model.pyfunc import LogPyfuncArgs, log_pyfunc
from tests.support import HELLO, free_port, local_store, post, process, wait_for_http


def test_served_model_answers_chat_requests(served_model):
    status, body = post(served_model[0], {"messages": HELLO, "max_tokens": 5})
    assert status == 200
    (response,) = body if isinstance(body, list) else body["predictions"]
    assert response["object"] == "chat.completion"
    assert response["usage"]["completion_tokens"] <= 5 and response["choices"][0]["message"]["role"] == "assistant"


def _choices(bodies):
    return [(b if isinstance(b, list) else b["predictions"])[0]["choices"] for b in bodies]


def _tree_rss(pid: int) -> int:
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def test_concurrent_requests_get_their_own_answers(served_model):
    url, _ = served_model
    requests = [{"messages": [{"role": "user", "content": f"Tell me about {i}"}], "max_tokens": 3 + i}
                for i in range(4)]
    sequential = [post(url, r)[1] for r in requests]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda r: post(url, r)[1], requests))
    assert _choices(parallel) == _choices(sequential)


def _batch_sizes(log) -> list[int]:
    return [int(n) for n in re.findall(r"\[batching [^\]]+\] (\d+) sequences in one batch", log.read_text())]


def test_load_of_8_clients_no_errors_no_cross_talk_and_memory_levels_off(served_model, logged):
    """4 rounds of 48 requests from 8 concurrent clients (greedy and seeded sampling, different prompts and
    lengths): every answer is the one the same request gets alone, the greedy ones generate in batches (the
    server logs each batch), and the server's resident memory (all its processes) stops growing: the last
    round adds less than 5% (or 30 MiB) to what the second left."""
    url, pid = served_model
    batches_before = len(_batch_sizes(logged["root"] / "serve.log"))
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
    sizes = _batch_sizes(logged["root"] / "serve.log")[batches_before:]
    print(f"\nserver RSS after each round (MiB): {[round(r / 2**20) for r in rss]}; "
          f"{len(sizes)} batches of {min(sizes, default=0)}-{max(sizes, default=0)} sequences")
    assert sizes and max(sizes) >= 4
    assert growth < max(0.05 * rss[2], 30 * 2**20), [round(r / 2**20) for r in rss]


def test_a_full_queue_answers_503_at_once(logged, tmp_path):
    """A model logged with room for 2 generating and 1 waiting: a lone request with n=8 answers all its choices;
    of 8 simultaneous requests, those beyond answer 503 (busy, retry) without waiting, the others their normal
    answer, and no request sees a 504."""
    target = tmp_path / "cpu-int4-small-queue.yaml"
    target.write_text(yaml.safe_dump({"name": "cpu-int4-small-queue", "execution_provider": "cpu",
                                      "precision": "int4", "batching": {"max_batch": 2, "max_queue": 1}}))
    with local_store(logged["root"]):
        uri = log_pyfunc(LogPyfuncArgs(convert_run_id=logged["convert_run_id"], target=str(target),
                                       registered_model_name="tiny-phi3-small-queue"))
    port, log = free_port(), tmp_path / "serve.log"
    env = dict(os.environ, MLFLOW_TRACKING_URI=logged["tracking_uri"], MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    with process(["mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
                  "-p", str(port), "-w", "1"], log, env=env) as proc:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, log, seconds=180)
        url = f"http://127.0.0.1:{port}/invocations"
        # One request's own choices, more than the model holds at once, wait for one another on an idle server.
        status, fanned_out = post(url, {"messages": [{"role": "user", "content": "Count"}], "max_tokens": 4, "n": 8})
        assert status == 200 and len(_choices([fanned_out])[0]) == 8, fanned_out
        requests = [{"messages": [{"role": "user", "content": f"Count to {i}"}], "max_tokens": 400} for i in range(8)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda r: post(url, r), requests))
    statuses = sorted(status for status, _ in answers)
    assert set(statuses) == {200, 503} and statuses.count(200) >= 3, statuses
    busy = next(body for status, body in answers if status == 503)
    assert busy["error_code"] == "TEMPORARILY_UNAVAILABLE" and "max_queue 1" in busy["message"]
