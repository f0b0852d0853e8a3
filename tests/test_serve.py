"""The registered pyfunc behind a real `mlflow models serve` on 127.0.0.1 (conftest's `served_model`), over real
HTTP. Its answers to bad requests: tests/test_bad_input.py."""

import concurrent.futures

import psutil

from conftest import HELLO, post


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


def test_load_of_8_clients_no_errors_no_cross_talk_and_memory_levels_off(served_model):
    """4 rounds of 48 requests from 8 concurrent clients (greedy and seeded sampling, different prompts and
    lengths): every answer is the one the same request gets alone, and the server's resident memory (all its
    processes) stops growing: the last round adds less than 5% (or 30 MiB) to what the second left."""
    url, pid = served_model
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
