"""The main entry point: convert_onnx -> log_pyfunc, log_transformers -> evaluate, chained through run IDs, each
step reused when its inputs did not change (hf2mlflow/workflow/chain.py says how).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict

import mlflow
from mlflow.exceptions import MlflowException

from hf2mlflow.config import config_file, load_dataset_config, load_target, load_transformers_target
from hf2mlflow.contract import CHAIN_ORDER
from hf2mlflow.errors import ConfigError, StepError, fault_message
from hf2mlflow.datasets import load_examples
from hf2mlflow.tracking import print_run_summary, step_run
from hf2mlflow.step_args import MainArgs
from hf2mlflow.workflow.chain import Chain, ChainModel, StepResult, configs_digest, dataset_digest

STEP = "main"


def rerun_steps(args: MainArgs) -> set[str]:
    """The steps `force` and `rerun_from` ask to run again."""
    if args.force:
        return set(CHAIN_ORDER)
    return set(CHAIN_ORDER[CHAIN_ORDER.index(args.rerun_from):] if args.rerun_from else ())


def _validate(args: MainArgs) -> tuple:
    """Every input, before any step runs."""
    if args.rerun_from and args.rerun_from not in CHAIN_ORDER:
        raise ConfigError(f"rerun_from '{args.rerun_from}' is not a step; allowed: {', '.join(CHAIN_ORDER)}")
    if args.eval_limit < 0:
        raise ConfigError(f"eval_limit must be 0 (all examples) or positive, got {args.eval_limit}")
    target = load_target(args.target)
    transformers_target = args.transformers_target or (target.name if target.transformers else "cpu-fp32")
    try:
        tf_target = load_transformers_target(transformers_target)
    except ConfigError as exc:
        raise ConfigError(f"transformers_target '{transformers_target}': {exc}") from None
    dataset = load_dataset_config(args.dataset)
    load_examples(dataset)
    # Last: it hashes the model's local files and asks the hub for its commit.
    return ChainModel.resolve(args.model, STEP), target, tf_target, dataset


def run_chain(args: MainArgs) -> list[StepResult]:
    model, target, tf_target, dataset = _validate(args)
    params = dataclasses.asdict(args)
    with step_run(STEP, f"{STEP}-{args.model}-{args.target}", {"model": args.model, "target": args.target},
                  params) as run:
        chain = Chain(run.info.experiment_id, STEP, rerun_steps(args))
        target_file = config_file("targets", args.target).read_bytes()
        print(f"[{STEP}] code version {chain.code}")
        source = model.source_params
        convert = chain.step("convert_onnx", {"model": args.model, "target": args.target, **source}, {},
                             configs_digest(model.digest.encode(), target_file))
        pyfunc = chain.step("log_pyfunc", {"convert_run_id": convert.run_id}, {"convert_onnx": convert.run_id},
                            configs_digest(target_file))
        # Only what the transformers flavor reads of its target counts (not the target's name), so another
        # ONNX target with the same device, dtype and generation defaults reuses it.
        tf_settings = json.dumps({"transformers": tf_target.transformers.model_dump(),
                                  "generation": tf_target.generation.model_dump()}, sort_keys=True).encode()
        transformers = chain.step("log_transformers", {"model": args.model, "target": tf_target.name, **source}, {},
                                  configs_digest(model.digest.encode(), tf_settings), not_in_key=("target",))
        models = f"{pyfunc.run_id},{transformers.run_id}"
        evaluation = chain.step("evaluate", {"models": models, "dataset": args.dataset, "limit": args.eval_limit},
                                {"log_pyfunc": pyfunc.run_id, "log_transformers": transformers.run_id},
                                configs_digest(dataset_digest(args.dataset, dataset).encode(),
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
