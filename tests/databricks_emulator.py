"""A stand-in for a Databricks workspace, for testing `mlflow run -b databricks` offline.

It is an emulation of the REST API that MLflow 3.17.2's databricks backend calls, not a cluster:
- `GET /api/2.0/dbfs/get-status`, and `POST /dbfs/<path>` (raw bytes: how mlflow/projects/databricks.py
  uploads the project tarball and job file; not in Databricks' public REST reference, so only a real workspace
  can show that it still accepts it), stored under `root/dbfs`;
- `POST /api/2.0/jobs/runs/submit` (Jobs API 2.0: a `new_cluster`, `libraries`, and one task: the classic
  route's `shell_command_task` or the databricks_spark_job route's `spark_python_task`), `GET .../runs/get`,
  `POST .../runs/cancel`;
- everything under `/api/*/mlflow*`, forwarded to a real `mlflow server`, as a workspace serves the tracking API
  next to the Jobs API (the spark_python_task route logs to the tracking URI `databricks`).
Every request must carry `Authorization: Bearer <token>` and is checked against the documented shape (required
fields, types, one task, one cluster kind); a request that breaks it gets HTTP 400 and is kept in `problems`.

A submitted run "starts a cluster": each `pypi` library must already be installed here at the pinned version
(nothing is downloaded), then the task runs as a local process the way the driver would run it. Cluster paths
(`/dbfs/...`, `/databricks/...`, `dbfs:/...`) are mapped into `root`, and an `rsync` stand-in is put on PATH
when this machine has none (Databricks' image has rsync; MLflow's job command uses it to copy the tarball).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

# Fields of a new cluster in the Clusters/Jobs API (ClusterSpec / NewCluster).
CLUSTER_FIELDS = {
    "spark_version": str, "node_type_id": str, "driver_node_type_id": str, "num_workers": int, "autoscale": dict,
    "spark_conf": dict, "spark_env_vars": dict, "custom_tags": dict, "aws_attributes": dict,
    "azure_attributes": dict, "gcp_attributes": dict, "init_scripts": list, "cluster_log_conf": dict,
    "enable_elastic_disk": bool, "instance_pool_id": str, "driver_instance_pool_id": str, "policy_id": str,
    "apply_policy_default_values": bool, "data_security_mode": str, "single_user_name": str,
    "runtime_engine": str, "ssh_public_keys": list, "enable_local_disk_encryption": bool, "docker_image": dict,
    "cluster_name": str, "is_single_node": bool, "kind": str, "use_ml_runtime": bool, "workload_type": dict,
}
# MLflow 3.17.2 adds its own run options to the backend config, and on the spark_python_task route (and for
# a cluster spec without a "new_cluster" wrapper on the classic route) sends them inside new_cluster. A real
# workspace evidently ignores them; they are recorded as `ignored_cluster_fields`, any other unknown field fails.
MLFLOW_BACKEND_KEYS = {"ENV_MANAGER", "SYNCHRONOUS", "DOCKER_ARGS", "STORAGE_DIR", "build_image", "docker_auth"}
SUBMIT_FIELDS = {"run_name", "new_cluster", "existing_cluster_id", "libraries", "timeout_seconds",
                 "idempotency_token", "notebook_task", "spark_jar_task", "spark_python_task", "spark_submit_task",
                 "shell_command_task"}
TASKS = ("notebook_task", "spark_jar_task", "spark_python_task", "spark_submit_task", "shell_command_task")
EMULATED_TASKS = ("spark_python_task", "shell_command_task")
LIBRARY_KINDS = ("pypi", "maven", "cran", "jar", "egg", "whl", "requirements")
# A cluster path at the start of a word: /dbfs/..., /databricks/... (not inside a URL or another path).
CLUSTER_PATH = re.compile(r"(?<![\w.:/-])/(dbfs|databricks)(?=/)")

RSYNC_STANDIN = '''#!{python}
"""rsync stand-in for the emulated driver: only `rsync -a -v --ignore-existing SRC DST_DIR`, as MLflow calls it."""
import os, shutil, sys
args = sys.argv[1:]
flags, paths = [a for a in args if a.startswith("-")], [a for a in args if not a.startswith("-")]
if set(flags) - {{"-a", "-v", "--ignore-existing"}} or len(paths) != 2:
    sys.exit(f"rsync stand-in: unsupported arguments {{args}}")
src, dst = paths
target = os.path.join(dst, os.path.basename(src)) if os.path.isdir(dst) else dst
if not os.path.exists(target):
    shutil.copy2(src, target)
print(os.path.basename(src))
'''


class BadRequest(Exception):
    pass


def _require(condition: bool, message: str):
    if not condition:
        raise BadRequest(message)


def _check_map_of_strings(value, where: str):
    _require(isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()),
             f"{where} must be an object of string values, got {value!r}")


def check_new_cluster(cluster) -> list[str]:
    """Returns the MLflow-internal fields found (ignored); raises BadRequest for anything else that is wrong."""
    _require(isinstance(cluster, dict), f"new_cluster must be an object, got {type(cluster).__name__}")
    unknown = set(cluster) - set(CLUSTER_FIELDS) - MLFLOW_BACKEND_KEYS
    _require(not unknown, f"new_cluster: unknown field(s) {sorted(unknown)}")
    for key, kind in CLUSTER_FIELDS.items():
        if key in cluster:
            ok = isinstance(cluster[key], kind) and not (kind is int and isinstance(cluster[key], bool))
            _require(ok, f"new_cluster.{key} must be {kind.__name__}, got {cluster[key]!r}")
    _require("spark_version" in cluster, "new_cluster.spark_version is required")
    _require("node_type_id" in cluster or "instance_pool_id" in cluster,
             "new_cluster needs node_type_id or instance_pool_id")
    _require(("num_workers" in cluster) != ("autoscale" in cluster),
             "new_cluster needs exactly one of num_workers and autoscale")
    if "num_workers" in cluster:
        _require(cluster["num_workers"] >= 0, "new_cluster.num_workers must be >= 0")
    if "autoscale" in cluster:
        scale = cluster["autoscale"]
        _require(isinstance(scale.get("min_workers"), int) and isinstance(scale.get("max_workers"), int)
                 and 0 <= scale["min_workers"] <= scale["max_workers"],
                 f"new_cluster.autoscale needs integers 0 <= min_workers <= max_workers, got {scale!r}")
    for key in ("spark_conf", "spark_env_vars", "custom_tags"):
        if key in cluster:
            _check_map_of_strings(cluster[key], f"new_cluster.{key}")
    return sorted(set(cluster) & MLFLOW_BACKEND_KEYS)


def check_libraries(libraries) -> None:
    _require(isinstance(libraries, list), f"libraries must be a list, got {type(libraries).__name__}")
    for i, library in enumerate(libraries):
        _require(isinstance(library, dict) and len(library) == 1 and next(iter(library)) in LIBRARY_KINDS,
                 f"libraries[{i}] must have exactly one of {', '.join(LIBRARY_KINDS)}, got {library!r}")
        if "pypi" in library:
            pypi = library["pypi"]
            _require(isinstance(pypi, dict) and isinstance(pypi.get("package"), str) and pypi["package"]
                     and set(pypi) <= {"package", "repo"},
                     f"libraries[{i}].pypi needs a 'package' string (and optionally 'repo'), got {pypi!r}")


def check_submit(body) -> dict:
    """Jobs API 2.0 runs/submit; returns what the emulator needs to know about the run."""
    _require(isinstance(body, dict), "the request body must be a JSON object")
    unknown = set(body) - SUBMIT_FIELDS
    _require(not unknown, f"runs/submit: unknown field(s) {sorted(unknown)}")
    if "run_name" in body:
        _require(isinstance(body["run_name"], str), f"run_name must be a string, got {body['run_name']!r}")
    _require(("new_cluster" in body) != ("existing_cluster_id" in body),
             "runs/submit needs exactly one of new_cluster and existing_cluster_id")
    _require("new_cluster" in body, "existing_cluster_id is valid for Databricks but not emulated here")
    ignored = check_new_cluster(body["new_cluster"])
    check_libraries(body.get("libraries", []))
    tasks = [t for t in TASKS if t in body]
    _require(len(tasks) == 1, f"runs/submit needs exactly one task of {', '.join(TASKS)}, got {tasks}")
    task = tasks[0]
    _require(task in EMULATED_TASKS, f"{task} is valid for Databricks but not emulated here")
    spec = body[task]
    _require(isinstance(spec, dict), f"{task} must be an object")
    if task == "shell_command_task":
        _require(set(spec) <= {"command", "env_vars"}, f"shell_command_task: unknown field(s) in {sorted(spec)}")
        command = spec.get("command")
        _require(isinstance(command, list) and command and all(isinstance(c, str) for c in command),
                 f"shell_command_task.command must be a non-empty list of strings, got {command!r}")
        _check_map_of_strings(spec.get("env_vars", {}), "shell_command_task.env_vars")
    else:
        _require(set(spec) <= {"python_file", "parameters"}, f"spark_python_task: unknown field(s) in {sorted(spec)}")
        _require(isinstance(spec.get("python_file"), str) and spec["python_file"].startswith(("dbfs:/", "/")),
                 f"spark_python_task.python_file must be a dbfs:/ or workspace path, got {spec.get('python_file')!r}")
        parameters = spec.get("parameters", [])
        _require(isinstance(parameters, list) and all(isinstance(p, str) for p in parameters),
                 f"spark_python_task.parameters must be a list of strings, got {parameters!r}")
    return {"task": task, "ignored_cluster_fields": ignored}


@dataclass
class JobRun:
    run_id: int
    request: dict
    task: str
    ignored_cluster_fields: list
    life_cycle_state: str = "PENDING"
    result_state: str | None = None
    state_message: str = "Starting the emulated cluster"
    log: Path | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    def state(self) -> dict:
        state = {"life_cycle_state": self.life_cycle_state, "state_message": self.state_message}
        if self.result_state:
            state["result_state"] = self.result_state
        return state


class Workspace:
    """The emulated workspace: `with Workspace(root, token, tracking_server).serving() as host: ...`."""

    def __init__(self, root: Path, token: str, tracking_server: str | None = None):
        self.root, self.token, self.tracking_server = Path(root), token, tracking_server
        self.dbfs = self.root / "dbfs"
        self.runs: dict[int, JobRun] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.problems: list[str] = []  # requests that broke the documented shape
        self.uploads: dict[str, int] = {}  # DBFS path -> bytes
        self.host = ""
        self._lock = threading.Lock()

    # --- cluster paths -------------------------------------------------------------------------------------
    def local_path(self, cluster_path: str) -> Path:
        """dbfs:/x, /dbfs/x -> root/dbfs/x; /databricks/x -> root/databricks/x."""
        if cluster_path.startswith("dbfs:/"):
            cluster_path = "/dbfs/" + cluster_path[len("dbfs:/"):].lstrip("/")
        _require(CLUSTER_PATH.match(cluster_path) is not None, f"not a cluster path: {cluster_path}")
        return self.root / cluster_path.lstrip("/")

    def _map_paths(self, text: str) -> str:
        return CLUSTER_PATH.sub(lambda m: f"{self.root}/{m.group(1)}", text)

    # --- DBFS ----------------------------------------------------------------------------------------------
    def get_status(self, path) -> tuple[int, dict]:
        _require(isinstance(path, str) and path.startswith("/"), f"dbfs/get-status: 'path' must be an absolute "
                                                                  f"DBFS path, got {path!r}")
        local = self.dbfs / path.lstrip("/")
        if not local.exists():
            return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST",
                         "message": f"No file or directory exists on path {path}."}
        stat = local.stat()
        return 200, {"path": path, "is_dir": local.is_dir(), "file_size": 0 if local.is_dir() else stat.st_size,
                     "modification_time": int(stat.st_mtime * 1000)}

    def put_fuse(self, path: str, data: bytes) -> tuple[int, dict]:
        local = self.local_path(path)
        if local.exists():
            return 409, {"error_code": "RESOURCE_ALREADY_EXISTS", "message": "File already exists"}
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
        self.uploads[path] = len(data)
        return 200, {}

    # --- Jobs ----------------------------------------------------------------------------------------------
    def submit(self, body: dict) -> dict:
        checked = check_submit(body)
        with self._lock:
            run = JobRun(len(self.runs) + 1, body, checked["task"], checked["ignored_cluster_fields"])
            self.runs[run.run_id] = run
        threading.Thread(target=self._execute, args=(run,), daemon=True).start()
        return {"run_id": run.run_id}

    def get_run(self, run_id) -> tuple[int, dict]:
        run = self.runs.get(run_id)
        if run is None:
            return 400, {"error_code": "INVALID_PARAMETER_VALUE", "message": f"Run {run_id} does not exist."}
        return 200, {"job_id": 1000 + run.run_id, "run_id": run.run_id, "number_in_job": 1,
                     "run_name": run.request.get("run_name", "Untitled"), "state": run.state(),
                     "task": {run.task: run.request[run.task]},
                     "cluster_spec": {"new_cluster": run.request["new_cluster"]},
                     "run_page_url": f"{self.host}/?o=0#job/{1000 + run.run_id}/run/{run.run_id}"}

    def cancel(self, run_id) -> tuple[int, dict]:
        run = self.runs.get(run_id)
        if run is None:
            return 400, {"error_code": "INVALID_PARAMETER_VALUE", "message": f"Run {run_id} does not exist."}
        if run.process and run.process.poll() is None:
            os.killpg(run.process.pid, signal.SIGTERM)
        return 200, {}

    def _install_libraries(self, run: JobRun) -> str | None:
        """The cluster's library installation, offline: each pypi requirement must already be satisfied."""
        for library in run.request.get("libraries", []):
            if "pypi" not in library:
                return f"library {library} is not emulated (only pypi)"
            package = library["pypi"]["package"].strip("'\"")
            try:
                requirement = Requirement(package)
            except InvalidRequirement as exc:
                return f"library '{package}' is not a valid pip requirement: {exc}"
            try:
                installed = version(requirement.name)
            except PackageNotFoundError:
                return f"library '{package}' could not be installed: not installed on the emulated cluster image"
            if not requirement.specifier.contains(installed.split("+")[0], prereleases=True):
                return f"library '{package}' could not be installed: the emulated cluster image has {installed}"
        return None

    def _environment(self, run: JobRun) -> dict:
        # The driver's environment: this machine's, minus the client's MLflow and Databricks settings, plus what
        # the runtime provides (workspace host and token) and what the cluster spec and task ask for.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DATABRICKS_"))}
        bin_dir = self.root / "bin"
        if shutil.which("rsync") is None:
            bin_dir.mkdir(exist_ok=True)
            standin = bin_dir / "rsync"
            standin.write_text(RSYNC_STANDIN.format(python=sys.executable))
            standin.chmod(0o755)
        env["PATH"] = f"{Path(sys.executable).parent}:{bin_dir}:{env.get('PATH', '')}"
        env["DB_HOME"] = str(self.root / "databricks")
        env["TMPDIR"] = str(self.root / "tmp")  # the job's `mktemp -d` and temp files stay in the workspace
        (self.root / "tmp").mkdir(exist_ok=True)
        env.update({"DATABRICKS_HOST": self.host, "DATABRICKS_TOKEN": self.token})
        env.update(run.request["new_cluster"].get("spark_env_vars", {}))
        if run.task == "shell_command_task":
            env.update(run.request[run.task].get("env_vars", {}))
        return env

    def _command(self, run: JobRun, driver: Path) -> list[str]:
        spec = run.request[run.task]
        if run.task == "shell_command_task":
            return [self._map_paths(part) for part in spec["command"]]
        source = self.local_path(spec["python_file"])
        if not source.exists():
            raise BadRequest(f"spark_python_task.python_file {spec['python_file']} does not exist")
        job_file = driver / source.name
        job_file.write_text(self._map_paths(source.read_text()))
        return [sys.executable, str(job_file), *spec.get("parameters", [])]

    def _execute(self, run: JobRun) -> None:
        driver = self.root / "driver" / str(run.run_id)
        driver.mkdir(parents=True)
        run.log = driver / "driver.log"
        failure = self._install_libraries(run)
        if failure:
            run.life_cycle_state, run.result_state, run.state_message = "INTERNAL_ERROR", "FAILED", failure
            run.log.write_text(failure)
            return
        try:
            command = self._command(run, driver)
        except BadRequest as exc:
            run.life_cycle_state, run.result_state, run.state_message = "INTERNAL_ERROR", "FAILED", str(exc)
            run.log.write_text(str(exc))
            return
        with open(run.log, "w") as out:
            run.process = subprocess.Popen(command, cwd=driver, env=self._environment(run), stdout=out,
                                           stderr=subprocess.STDOUT, start_new_session=True)
            run.life_cycle_state, run.state_message = "RUNNING", "In run"
            code = run.process.wait()
        run.life_cycle_state = "TERMINATED"
        run.result_state = "SUCCESS" if code == 0 else ("CANCELED" if code < 0 else "FAILED")
        run.state_message = "" if code == 0 else f"Command exited with code {code}"

    def driver_log(self, run_id: int) -> str:
        run = self.runs.get(run_id)
        return run.log.read_text() if run and run.log and run.log.exists() else ""

    # --- HTTP ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def serving(self):
        workspace = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: the requests are kept in workspace.requests
                pass

            def _reply(self, status: int, body, content_type="application/json"):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self, method: str):
                url = urllib.parse.urlsplit(self.path)
                workspace.requests.append((method, url.path))
                if url.path == "/.well-known/databricks-config" and method == "GET":
                    # Host metadata that databricks-sdk reads, unauthenticated, before it sends the token.
                    return self._reply(200, {"oidc_endpoint": f"{workspace.host}/oidc", "workspace_id": "1"})
                if self.headers.get("Authorization") != f"Bearer {workspace.token}":
                    return self._reply(401, {"error_code": "UNAUTHENTICATED",
                                             "message": "Invalid access token (expected a Bearer token)."})
                body = self._body()
                try:
                    if re.match(r"^/api/[0-9.]+/mlflow", url.path) or url.path.startswith("/api/2.0/preview/mlflow"):
                        return self._forward(method, body)
                    status, reply = workspace.route(method, url, body)
                except BadRequest as exc:
                    workspace.problems.append(f"{method} {url.path}: {exc}")
                    status, reply = 400, {"error_code": "INVALID_PARAMETER_VALUE", "message": str(exc)}
                return self._reply(status, reply)

            def _forward(self, method: str, body: bytes):
                if not workspace.tracking_server:
                    return self._reply(404, {"error_code": "ENDPOINT_NOT_FOUND", "message": "no tracking server"})
                request = urllib.request.Request(workspace.tracking_server + self.path, data=body or None,
                                                 method=method)
                if self.headers.get("Content-Type"):
                    request.add_header("Content-Type", self.headers["Content-Type"])
                try:
                    with urllib.request.urlopen(request, timeout=120) as response:
                        return self._reply(response.status, response.read(),
                                           response.headers.get("Content-Type", "application/json"))
                except urllib.error.HTTPError as exc:
                    return self._reply(exc.code, exc.read(), exc.headers.get("Content-Type", "application/json"))

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_PUT(self):
                self._handle("PUT")

            def do_PATCH(self):
                self._handle("PATCH")

            def do_DELETE(self):
                self._handle("DELETE")

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self.host = f"http://127.0.0.1:{server.server_address[1]}"
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self.host
        finally:
            server.shutdown()
            server.server_close()
            for run in self.runs.values():
                if run.process and run.process.poll() is None:
                    os.killpg(run.process.pid, signal.SIGKILL)

    def route(self, method: str, url, body: bytes) -> tuple[int, dict]:
        path = url.path
        if path.startswith("/dbfs/") and method in ("POST", "PUT"):
            return self.put_fuse(path, body)
        if path == "/api/2.0/dbfs/get-status" and method == "GET":
            # MLflow sends the path as a JSON body on this GET; the documented form is a query parameter.
            query = urllib.parse.parse_qs(url.query).get("path", [None])[0]
            return self.get_status(query if query is not None else _json(body).get("path"))
        if path == "/api/2.0/dbfs/put" and method == "POST":  # the documented upload, for completeness
            payload = _json(body)
            _require(isinstance(payload.get("path"), str) and isinstance(payload.get("contents"), str),
                     "dbfs/put needs 'path' and base64 'contents' strings")
            return self.put_fuse("/dbfs" + payload["path"], base64.b64decode(payload["contents"]))
        if path == "/api/2.0/jobs/runs/submit" and method == "POST":
            return 200, self.submit(_json(body))
        if path == "/api/2.0/jobs/runs/get" and method == "GET":
            raw = urllib.parse.parse_qs(url.query).get("run_id", [None])[0]
            _require(raw is not None and raw.isdigit(), f"jobs/runs/get needs an integer run_id, got {raw!r}")
            return self.get_run(int(raw))
        if path == "/api/2.0/jobs/runs/cancel" and method == "POST":
            run_id = _json(body).get("run_id")
            _require(isinstance(run_id, int), f"jobs/runs/cancel needs an integer run_id, got {run_id!r}")
            return self.cancel(run_id)
        return 404, {"error_code": "ENDPOINT_NOT_FOUND", "message": f"No API found for '{method} {path}'"}

    def wait(self, run_id: int, seconds: float) -> JobRun:
        deadline = time.time() + seconds
        while self.runs[run_id].life_cycle_state in ("PENDING", "RUNNING") and time.time() < deadline:
            time.sleep(0.5)
        return self.runs[run_id]


def _json(body: bytes) -> dict:
    try:
        value = json.loads(body or b"{}")
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not JSON: {exc.msg}") from None
    _require(isinstance(value, dict), "the request body must be a JSON object")
    return value
