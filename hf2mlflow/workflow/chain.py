"""The chain engine of `main` and `sweep`: steps run as MLflow Projects runs, each reused when its inputs did not
change.

Each step runs as an MLflow Projects run of its own entry point, as a child of the active run. A step is
reused when a FINISHED run exists whose cache key matches: the entry point, its parameters as MLflow
stores them (strings), the upstream run IDs, the code version (git commit, or a content hash of the
project when there is no clean commit) and a content hash of the config files the step reads. The key
is a tag, so the lookup is one filtered query (no 1000-run blind spot) that returns the newest match.
The model is resolved once (ChainModel): its config, the content of its local files and its hub commit.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow

from hf2mlflow import PROJECT_ROOT
from hf2mlflow.config import ModelSpec, config_file, load_model
from hf2mlflow.contract import CHAIN_ORDER
from hf2mlflow.digest import content_digest
from hf2mlflow.errors import StepError

CACHE_TAG = "cache_key"
# Never part of the code version: outputs and caches that runs write into the project folder.
NOT_CODE = {".git", "__pycache__", "mlruns", "mlartifacts", ".pytest_cache"}


@dataclass
class StepResult:
    entry_point: str
    run_id: str
    reused: bool
    seconds: float
    registered_model_uri: str = ""


def configs_digest(*parts: bytes) -> str:
    """sha256 of what a step reads, each part length-prefixed so that no two splits of the bytes collide."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


def _git(*args) -> str:
    return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout


def code_version() -> str:
    """The git commit when the project is a clean checkout; otherwise a hash of the project's files."""
    try:
        commit, dirty = _git("rev-parse", "HEAD").strip(), _git("status", "--porcelain").strip()
        files = _git("ls-files", "--cached", "--others", "--exclude-standard").split("\n")
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, True
        files = [str(p.relative_to(PROJECT_ROOT)) for p in PROJECT_ROOT.rglob("*")
                 if p.is_file() and not NOT_CODE & set(p.relative_to(PROJECT_ROOT).parts)]
    if commit and not dirty:
        return commit
    paths = sorted(f for f in files if f and (PROJECT_ROOT / f).is_file())
    return "content-" + configs_digest(*(p.encode() + (PROJECT_ROOT / p).read_bytes() for p in paths))


@dataclass(frozen=True)
class ChainModel:
    """The model of a chain, resolved once and handed to every step that reads it."""

    name: str  # as given: a shipped name, a model YAML file, a local folder, a .gguf file or a hub id
    spec: ModelSpec
    digest: str  # its config file (or its name) and the content of every file of its local folder or GGUF file
    commit: str  # the commit a hub model's revision points to now; "" for models from anywhere else

    @property
    def source_params(self) -> dict:
        """The parameters that pin what a step loads: a hub model's commit, so that the steps download exactly
        it and a branch that moved upstream is a new conversion, not a reused one."""
        return {"revision": self.commit} if self.commit else {}

    @classmethod
    def resolve(cls, name_or_path: str, label: str) -> "ChainModel":
        """Reads the model's config, hashes its local files (every byte: see hf2mlflow/digest.py) and asks the
        hub for its commit."""
        spec = load_model(name_or_path)
        config = config_file("models", name_or_path)
        parts = [config.read_bytes() if config else name_or_path.encode()]
        local = spec.local_path or spec.gguf_file
        if local is not None:
            print(f"[{label}] hashing the content of {local}")
            parts.append(content_digest(Path(local).expanduser()).encode())
        return cls(name_or_path, spec, configs_digest(*parts), _hub_commit(spec, label))


def _hub_commit(spec: ModelSpec, label: str) -> str:
    from hf2mlflow.sources.resolve import hub_commit

    if spec.source != "hub":
        return ""
    commit = hub_commit(spec.hub_id, spec.revision)
    print(f"[{label}] {spec.hub_id}@{spec.revision} is commit {commit}")
    return commit


def dataset_digest(name_or_path: str, dataset) -> str:
    """What evaluate reads of a dataset: its YAML file and its JSONL file."""
    return configs_digest(config_file("datasets", name_or_path).read_bytes(), dataset.path.read_bytes())


def _cache_key(entry_point: str, params: dict, upstream: dict, code: str, configs: str) -> str:
    return configs_digest(json.dumps({"entry_point": entry_point, "params": params, "upstream": upstream,
                                      "code_version": code, "configs": configs}, sort_keys=True).encode())


def _reusable_run(experiment_id: str, key: str):
    runs = mlflow.MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.{CACHE_TAG} = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _launch(entry_point: str, params: dict, tags: dict, experiment_id: str) -> str:
    """Run the entry point as an MLflow Projects run (a child of the active run) and wait for it."""
    submitted = mlflow.projects.run(str(PROJECT_ROOT), entry_point=entry_point, parameters=params,
                                    experiment_id=experiment_id, env_manager="local", synchronous=False)
    # The key goes on the run at once: a step killed later stays unfinished and never matches (FINISHED only).
    client = mlflow.MlflowClient()
    for name, value in tags.items():
        client.set_tag(submitted.run_id, name, value)
    if not submitted.wait():
        run = client.get_run(submitted.run_id)
        error = run.data.tags.get("error", "no error recorded; see the step's output above")
        raise StepError(f"step {entry_point} failed in run {submitted.run_id}: {error}")
    return submitted.run_id


class Chain:
    """Steps of one workflow run, each reused or launched as a child of the active run; `order` numbers them and
    `label` starts every line printed."""

    def __init__(self, experiment_id: str, label: str, rerun: set[str] = frozenset(),
                 order: tuple[str, ...] = CHAIN_ORDER):
        self.experiment_id, self.code, self.rerun, self.order, self.label = (
            experiment_id, code_version(), set(rerun), order, label)
        self.results: list[StepResult] = []

    def step(self, entry_point: str, params: dict, upstream: dict, configs: str, not_in_key=()) -> StepResult:
        params = {k: str(v) for k, v in params.items()}  # as MLflow stores them
        key_params = {k: v for k, v in params.items() if k not in not_in_key}
        key = _cache_key(entry_point, key_params, upstream, self.code, configs)
        number = f"{self.order.index(entry_point) + 1}/{len(self.order)}"
        start = time.perf_counter()
        found = None if entry_point in self.rerun else _reusable_run(self.experiment_id, key)
        if found is not None:
            print(f"[{self.label}] {number} {entry_point}: reusing FINISHED run {found.info.run_id}")
            run_id = found.info.run_id
        else:
            print(f"[{self.label}] {number} {entry_point}: running" + (" (rerun requested)" if entry_point in self.rerun
                                                               else ""))
            tags = {CACHE_TAG: key, "code_version": self.code, "config_digest": configs,
                    **{f"upstream.{name}": run_id for name, run_id in upstream.items()}}
            run_id = _launch(entry_point, params, tags, self.experiment_id)
        registered = mlflow.MlflowClient().get_run(run_id).data.tags.get("registered_model_uri", "")
        result = StepResult(entry_point, run_id, found is not None, time.perf_counter() - start, registered)
        self.results.append(result)
        mlflow.set_tag(f"chain.{entry_point}", run_id)
        return result
