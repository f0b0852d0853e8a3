"""main: the whole chain through `mlflow run`, against real tracking servers (SQLite, PostgreSQL) and from a
git URL served by a real `git daemon`, with reuse, invalidation and failure handling."""

import contextlib
import functools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import mlflow
import pytest

from hf2mlflow import PROJECT_ROOT
from tests.support import copy_working_tree, failing_step_env, free_port, process, tracking_server

STEPS = ["convert_onnx", "log_pyfunc", "log_transformers", "evaluate"]


def run_project(tracking_uri: str, *params, uri, version=None, extra_env=None):
    command = ["mlflow", "run", uri, "--env-manager", "local", "--experiment-name", "chain"]
    command += ["--version", version] if version else []
    given = {p.split("=")[0] for p in params}
    # The built-in tiny model unless a test names one (the project's default is the trained model).
    for p in [*params] + [d for d in ("eval_limit=1", "model=tiny-phi3") if d.split("=")[0] not in given]:
        command += ["-P", p]
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, **(extra_env or {}))
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    return proc, time.perf_counter() - start


def last_chain(tracking_uri: str):
    """The newest main run and its chain summary: {step: (run_id, reused)}."""
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("chain")
    (main,) = client.search_runs([experiment.experiment_id], "tags.step = 'main'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if main.info.status != "FINISHED":
        return main, {}
    path = client.download_artifacts(main.info.run_id, "chain.json", tempfile.mkdtemp())
    steps = json.loads(Path(path).read_text())["steps"]
    return main, {s["entry_point"]: (s["run_id"], s["reused"]) for s in steps}


def test_bad_parameters_fail_before_any_step(tmp_path):
    run_main = functools.partial(run_project, uri=str(PROJECT_ROOT))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc, _ = run_main(uri, "rerun_from=convert")
    assert proc.returncode != 0 and "rerun_from 'convert' is not a step; allowed: convert_onnx" in proc.stderr
    proc, _ = run_main(uri, "target=cpu-fp33")
    assert "unknown target 'cpu-fp33'" in proc.stderr
    runs = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("chain")
                                                 .experiment_id])
    assert [r.data.tags.get("step") for r in runs] == [None, None]  # only main's own runs, both FAILED
    assert {r.info.status for r in runs} == {"FAILED"}


def _postgres(root: Path):
    """A throwaway PostgreSQL cluster on 127.0.0.1, as the postgres user when we are root; None if not installed."""
    initdb = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    if initdb is None:
        return None
    bin_dir = Path(initdb).resolve().parent  # /usr/local/bin may hold links to some of the tools only
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))
    if as_user:
        shutil.chown(data, "postgres", "postgres")
    subprocess.run(as_user + [str(bin_dir / "initdb"), "-D", str(data / "db"), "-U", "postgres", "-A", "trust"],
                   check=True, capture_output=True)
    return bin_dir, as_user, data


@contextlib.contextmanager
def postgres_server(root: Path):
    found = _postgres(root)
    if found is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs it)")
    bin_dir, as_user, data = found
    port = free_port()
    command = as_user + [str(bin_dir / "postgres"), "-D", str(data / "db"), "-p", str(port), "-k", str(data),
                         "-c", "listen_addresses=127.0.0.1"]
    try:
        with process(command, root / "postgres.log"):
            deadline = time.time() + 60
            while subprocess.run([str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                                 capture_output=True).returncode != 0:
                assert time.time() < deadline, (root / "postgres.log").read_text()
                time.sleep(0.5)
            subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                            "mlflow"], check=True)
            yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """The project as it is now (committed or not) as one clean commit: other edits to the working tree
    while the tests run cannot change its code version."""
    work = tmp_path_factory.mktemp("snapshot") / "hf2mlflow"
    subprocess.run(["git", "clone", "-q", str(PROJECT_ROOT), str(work)], check=True)
    copy_working_tree(work)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@127.0.0.1"]
    subprocess.run(git + ["add", "-A"], cwd=work, check=True)
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "working tree under test"], cwd=work, check=True)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, capture_output=True, text=True).stdout.strip()
    return work, sha


@contextlib.contextmanager
def git_daemon(tmp_path: Path, snapshot):
    """The snapshot's repository served by `git daemon` on 127.0.0.1."""
    work, sha = snapshot
    served = tmp_path / "served"
    served.mkdir()
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(served / "hf2mlflow.git")], check=True)
    subprocess.run(["git", "config", "uploadpack.allowAnySHA1InWant", "true"], cwd=served / "hf2mlflow.git",
                   check=True)
    port = free_port()
    command = ["git", "daemon", "--reuseaddr", "--export-all", f"--base-path={served}", "--listen=127.0.0.1",
               f"--port={port}", str(served)]
    with process(command, tmp_path / "git-daemon.log") as proc:
        deadline = time.time() + 30
        while subprocess.run(["git", "ls-remote", f"git://127.0.0.1:{port}/hf2mlflow.git"],
                             capture_output=True).returncode != 0:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "git-daemon.log").read_text()
            time.sleep(0.3)
        yield f"git://127.0.0.1:{port}/hf2mlflow.git", sha


@pytest.mark.slow
def test_chain_from_a_git_url_on_postgresql_reuses_and_fails_cleanly(tmp_path, snapshot):
    """The whole chain as users run it remotely: `mlflow run git://...` against a tracking server on PostgreSQL.
    Each step is a real `mlflow run` child; an identical second run reuses them all; a step that fails (injected)
    fails main with its run ID and is never reused."""
    with postgres_server(tmp_path) as backend, tracking_server(backend, tmp_path) as uri, \
            git_daemon(tmp_path, snapshot) as (repo, sha):
        run_main = functools.partial(run_project, uri=repo, version=sha)
        client = mlflow.MlflowClient(uri)

        first, first_seconds = run_main(uri)
        assert first.returncode == 0, first.stderr[-3000:]
        main, chain = last_chain(uri)
        assert list(chain) == STEPS and not any(reused for _, reused in chain.values())
        assert main.data.tags["mlflow.source.git.commit"] == sha
        for step, (run_id, _) in chain.items():
            run = client.get_run(run_id)
            assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == main.info.run_id
            assert run.data.tags["mlflow.project.entryPoint"] == step and run.data.tags["cache_key"]
            assert run.data.tags["mlflow.source.git.commit"] == sha
            assert run.data.tags["code_version"] == sha  # a clean checkout: the commit
        assert client.get_run(chain["log_pyfunc"][0]).data.tags["upstream.convert_onnx"] == chain["convert_onnx"][0]
        assert {m.name for m in client.search_registered_models()} == {
            "tiny-phi3-cpu-int4-onnx", "tiny-phi3-cpu-fp32-transformers"}
        assert "models:/tiny-phi3-cpu-int4-onnx@candidate" in first.stdout  # the printed chain

        second, second_seconds = run_main(uri)
        assert second.returncode == 0, second.stderr[-3000:]
        print(f"\ngit URL on PostgreSQL: first {first_seconds:.1f} s, identical second {second_seconds:.1f} s")
        _, again = last_chain(uri)
        assert again == {step: (run_id, True) for step, (run_id, _) in chain.items()}
        assert second_seconds < first_seconds / 3

        # A failing step fails main with the step's run ID; the failed run is not reused.
        failed, _ = run_main(uri, "eval_limit=2", extra_env=failing_step_env("evaluate"))
        assert failed.returncode != 0
        main, _ = last_chain(uri)
        assert main.info.status == "FAILED" and "step evaluate failed in run" in main.data.tags["error"]
        failed_run = main.data.tags["error"].split("failed in run ")[1].split(":")[0]
        assert client.get_run(failed_run).info.status == "FAILED"

        fixed, _ = run_main(uri, "eval_limit=2")
        assert fixed.returncode == 0, fixed.stderr[-3000:]
        _, rerun = last_chain(uri)
        assert [s for s, (_, reused) in rerun.items() if not reused] == ["evaluate"]
        assert rerun["evaluate"][0] != failed_run


@pytest.fixture
def in_process_chain(tracking, monkeypatch):
    """run(**main_args): main's own chain logic against a real store, each step a FINISHED run made in-process
    with the tags and parameters main gives it (no `mlflow run` child); returns {step: reused} and the runs."""
    from hf2mlflow.workflow import chain, main as workflow

    client = mlflow.MlflowClient(tracking)
    launched = []

    def launch(entry_point, params, tags, experiment_id):
        run = client.create_run(experiment_id, tags={**tags, "mlflow.project.entryPoint": entry_point,
                                                     "mlflow.parentRunId": mlflow.active_run().info.run_id})
        for name, value in params.items():
            client.log_param(run.info.run_id, name, value)
        if entry_point in failing:
            client.set_terminated(run.info.run_id, "FAILED")
            raise workflow.StepError(f"step {entry_point} failed in run {run.info.run_id}: on purpose")
        client.set_terminated(run.info.run_id, "FINISHED")
        launched.append(run.info.run_id)
        return run.info.run_id

    failing = set()
    monkeypatch.setattr(chain, "_launch", launch)

    def run(fail=(), **args):
        failing.clear()
        failing.update(fail)
        results = workflow.main(workflow.MainArgs(**{"eval_limit": 1, "model": "tiny-phi3", **args}))
        return {r.entry_point: r.reused for r in results}, {r.entry_point: r.run_id for r in results}

    return run


def test_what_each_change_reruns(in_process_chain):
    """Which steps run again when the target changes, when rerun_from asks, and after a failure: main's own
    composition of cache keys (tests/unit/test_cache_key.py checks the keys themselves)."""
    from hf2mlflow.errors import StepError

    first, runs = in_process_chain()
    assert first == dict.fromkeys(STEPS, False)
    assert in_process_chain() == (dict.fromkeys(STEPS, True), runs)

    # Another ONNX target: conversion and everything downstream of it run again; the transformers model reads
    # nothing that changed, so it is reused.
    changed, fp32_runs = in_process_chain(target="cpu-fp32")
    assert changed == {"convert_onnx": False, "log_pyfunc": False, "log_transformers": True, "evaluate": False}
    assert fp32_runs["log_transformers"] == runs["log_transformers"]

    # rerun_from: that step and the ones after it run again, the ones before are reused.
    partly, _ = in_process_chain(target="cpu-fp32", rerun_from="log_transformers")
    assert partly == {"convert_onnx": True, "log_pyfunc": True, "log_transformers": False, "evaluate": False}

    # A failed step is never reused: the next identical run launches it again.
    with pytest.raises(StepError, match="step evaluate failed in run"):
        in_process_chain(target="cpu-fp32", eval_limit=2, fail={"evaluate"})
    rerun, _ = in_process_chain(target="cpu-fp32", eval_limit=2)
    assert [s for s, reused in rerun.items() if not reused] == ["evaluate"]


@pytest.fixture
def fake_hub(monkeypatch):
    """A local HTTP server answering the hub API call that resolves a revision (GET
    /api/models/ORG/NAME/revision/REV): `refs` maps a revision to the commit it points to; moving a branch is
    changing its entry. HF_ENDPOINT points at it and HF_HUB_OFFLINE is lifted for the test."""
    import http.server
    import threading

    from huggingface_hub.utils import reset_sessions

    refs = {}

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            prefix = "/api/models/test-org/tiny-chat/revision/"
            revision = self.path.split("?")[0].removeprefix(prefix)
            if not self.path.startswith(prefix) or revision not in refs:
                self.send_response(404)
                self.send_header("X-Error-Code", "RevisionNotFound")
                self.end_headers()
                return
            body = json.dumps({"id": "test-org/tiny-chat", "sha": refs[revision], "siblings": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads HF_HUB_OFFLINE once, when imported (the test session sets it before that), and its
    # cached HTTP session refuses every request once made offline: a new session is made for the test and after it.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    reset_sessions()
    yield refs
    server.shutdown()
    monkeypatch.undo()
    reset_sessions()


def test_a_hub_revision_is_pinned_to_its_commit_and_a_moved_branch_converts_again(in_process_chain, fake_hub,
                                                                                   tracking, tmp_path):
    """main resolves a hub model's `revision: main` to the commit it points to and hands the steps that commit:
    unchanged, everything is reused; once the branch moves upstream, the model is converted and logged again."""
    model = tmp_path / "tiny-chat.yaml"
    model.write_text("name: tiny-chat\nhub_id: test-org/tiny-chat\nrevision: main\n")
    fake_hub["main"] = "a" * 40
    first, runs = in_process_chain(model=str(model))
    assert first == dict.fromkeys(STEPS, False)
    client = mlflow.MlflowClient(tracking)
    for step in ("convert_onnx", "log_transformers"):
        assert client.get_run(runs[step]).data.params["revision"] == "a" * 40
    assert in_process_chain(model=str(model)) == (dict.fromkeys(STEPS, True), runs)

    fake_hub["main"] = "b" * 40  # the branch moved upstream
    moved, moved_runs = in_process_chain(model=str(model))
    assert moved == dict.fromkeys(STEPS, False)
    assert client.get_run(moved_runs["convert_onnx"]).data.params["revision"] == "b" * 40


def test_a_hub_revision_that_cannot_be_resolved_fails_before_any_step(in_process_chain, fake_hub, tmp_path,
                                                                        monkeypatch):
    from hf2mlflow.errors import StepError

    model = tmp_path / "tiny-chat.yaml"
    model.write_text("name: tiny-chat\nhub_id: test-org/tiny-chat\nrevision: no-such-branch\n")
    with pytest.raises(StepError, match="model 'test-org/tiny-chat' has no revision 'no-such-branch'"):
        in_process_chain(model=str(model))
    # Offline, with nothing in the cache: the message says what to do.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StepError, match="pin a commit"):
        in_process_chain(model=str(model))
