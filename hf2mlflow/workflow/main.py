"""The main entry point: convert_onnx -> log_pyfunc, log_transformers -> evaluate, chained through run IDs.

Each step runs as an MLflow Projects run of its own entry point, as a child of the main run. A step is
reused when a FINISHED run exists whose cache key matches: the entry point, its parameters as MLflow
stores them (strings), the upstream run IDs, the code version (git commit, or a content hash of the
project when there is no clean commit) and a content hash of the config files the step reads. The key
is a tag, so the lookup is one filtered query (no 1000-run blind spot) that returns the newest match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from hf2mlflow import PROJECT_ROOT
from hf2mlflow.config import config_file, load_dataset_config, load_model, load_target, load_transformers_target
from hf2mlflow.contract import CHAIN_ORDER
from hf2mlflow.errors import ConfigError, StepError, fault_message
from hf2mlflow.datasets import load_examples
from hf2mlflow.tracking import print_run_summary, step_run
from hf2mlflow.step_args import MainArgs

STEP = "main"
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


def _sha256(*parts: bytes) -> str:
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
    return "content-" + _sha256(*(p.encode() + (PROJECT_ROOT / p).read_bytes() for p in paths))


def _model_digest(name_or_path: str) -> bytes:
    """What the model config says; for a local folder or GGUF file, its files' names, sizes and times (not GBs
    of content)."""
    path = config_file("models", name_or_path)
    if path is not None:
        return path.read_bytes()
    folder = Path(name_or_path).expanduser()
    if folder.is_file():
        return f"{folder.name} {folder.stat().st_size} {folder.stat().st_mtime_ns}".encode()
    if folder.is_dir():
        return "\n".join(f"{p.name} {p.stat().st_size} {p.stat().st_mtime_ns}"
                         for p in sorted(folder.iterdir()) if p.is_file()).encode()
    return name_or_path.encode()  # a hub id: its revision is pinned in the params or the model config


def _hub_commit(name_or_path: str) -> str:
    """The commit a hub model's revision points to now; empty for models from anywhere else."""
    from hf2mlflow.sources.resolve import hub_commit

    spec = load_model(name_or_path)
    if spec.source != "hub":
        return ""
    commit = hub_commit(spec.hub_id, spec.revision)
    print(f"[{STEP}] {spec.hub_id}@{spec.revision} is commit {commit}")
    return commit


def dataset_digest(name_or_path: str, dataset) -> str:
    """What evaluate reads of a dataset: its YAML file and its JSONL file."""
    return _sha256(config_file("datasets", name_or_path).read_bytes(), dataset.path.read_bytes())


def _cache_key(entry_point: str, params: dict, upstream: dict, code: str, configs: str) -> str:
    return _sha256(json.dumps({"entry_point": entry_point, "params": params, "upstream": upstream,
                               "code_version": code, "configs": configs}, sort_keys=True).encode())


def _reusable_run(experiment_id: str, key: str):
    runs = mlflow.MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.{CACHE_TAG} = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _launch(entry_point: str, params: dict, tags: dict, experiment_id: str) -> str:
    """Run the entry point as an MLflow Projects run (a child of the active main run) and wait for it."""
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


def rerun_steps(args: MainArgs) -> set[str]:
    """The steps `force` and `rerun_from` ask to run again."""
    if args.force:
        return set(CHAIN_ORDER)
    return set(CHAIN_ORDER[CHAIN_ORDER.index(args.rerun_from):] if args.rerun_from else ())


class Chain:
    """Steps of one workflow run, each reused or launched as a child of the active run; `order` numbers them."""

    def __init__(self, experiment_id: str, rerun: set[str] = frozenset(), order: tuple[str, ...] = CHAIN_ORDER,
                 label: str = STEP):
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


def _validate(args: MainArgs) -> tuple:
    """Every input, before any step runs."""
    if args.rerun_from and args.rerun_from not in CHAIN_ORDER:
        raise ConfigError(f"rerun_from '{args.rerun_from}' is not a step; allowed: {', '.join(CHAIN_ORDER)}")
    if args.eval_limit < 0:
        raise ConfigError(f"eval_limit must be 0 (all examples) or positive, got {args.eval_limit}")
    load_model(args.model)
    target = load_target(args.target)
    transformers_target = args.transformers_target or (target.name if target.transformers else "cpu-fp32")
    try:
        tf_target = load_transformers_target(transformers_target)
    except ConfigError as exc:
        raise ConfigError(f"transformers_target '{transformers_target}': {exc}") from None
    dataset = load_dataset_config(args.dataset)
    load_examples(dataset)
    return target, tf_target, dataset


def run_chain(args: MainArgs) -> list[StepResult]:
    target, tf_target, dataset = _validate(args)
    params = dataclasses.asdict(args)
    with step_run(STEP, f"{STEP}-{args.model}-{args.target}", {"model": args.model, "target": args.target},
                  params) as run:
        chain = Chain(run.info.experiment_id, rerun_steps(args))
        target_file = config_file("targets", args.target).read_bytes()
        model = _model_digest(args.model)
        print(f"[{STEP}] code version {chain.code}")
        # A hub model's revision is resolved to its commit now: the steps download exactly that commit, and a
        # branch that moved upstream is a new conversion, not a reused one.
        source = {"revision": commit} if (commit := _hub_commit(args.model)) else {}

        convert = chain.step("convert_onnx", {"model": args.model, "target": args.target, **source}, {},
                             _sha256(model, target_file))
        pyfunc = chain.step("log_pyfunc", {"convert_run_id": convert.run_id}, {"convert_onnx": convert.run_id},
                            _sha256(target_file))
        # Only what the transformers flavor reads of its target counts (not the target's name), so another
        # ONNX target with the same device, dtype and generation defaults reuses it.
        tf_settings = json.dumps({"transformers": tf_target.transformers.model_dump(),
                                  "generation": tf_target.generation.model_dump()}, sort_keys=True).encode()
        transformers = chain.step("log_transformers", {"model": args.model, "target": tf_target.name, **source}, {},
                                  _sha256(model, tf_settings), not_in_key=("target",))
        models = f"{pyfunc.run_id},{transformers.run_id}"
        evaluation = chain.step("evaluate", {"models": models, "dataset": args.dataset, "limit": args.eval_limit},
                                {"log_pyfunc": pyfunc.run_id, "log_transformers": transformers.run_id},
                                _sha256(dataset_digest(args.dataset, dataset).encode(),
                                        config_file("gates", "default").read_bytes()))
        summary = [asdict(r) for r in chain.results]
        mlflow.log_dict({"code_version": chain.code, "steps": summary}, "chain.json")
        mlflow.log_text(_table(chain.results), "chain.txt")
    print(f"\n[{STEP}] chain\n{_table(chain.results)}")
    promoted = mlflow.get_run(evaluation.run_id).data.tags.get("promoted", "none")
    print(f"[{STEP}] promoted by evaluate's gate: {promoted}" + ("" if promoted != "none" else
          f" (no model passed; the reasons are the `gate` tags of the evaluate run {evaluation.run_id})"))
    print_run_summary(STEP, run, {r.entry_point: r.registered_model_uri for r in chain.results
                                  if r.registered_model_uri})
    return chain.results


def _table(results: list[StepResult]) -> str:
    lines = [f"{'step':<17} {'run ID':<33} {'':<7} {'seconds':>8}  registered model"]
    for r in results:
        lines.append(f"{r.entry_point:<17} {r.run_id:<33} {'reused' if r.reused else 'new':<7} "
                     f"{r.seconds:>8.1f}  {r.registered_model_uri}")
    return "\n".join(lines)


def main(args: MainArgs) -> list[StepResult]:
    try:
        return run_chain(args)
    except MlflowException as exc:
        if fault_message(exc):
            raise  # run_step says what the machine did
        raise StepError(f"tracking error: {exc.message}") from None
