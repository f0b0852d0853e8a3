"""A finished `sweep` run as the sweep block of docs/performance.md and benchmarks/results/sweep.{md,json,png}.

    mlflow run . -e sweep --env-manager local                       # the shipped grid (about an hour on 2 cores)
    python -m benchmarks.sweep_report                               # the newest FINISHED sweep run in the store
    python -m benchmarks.sweep_report --run_id RUN --update-docs    # that run, and rewrite the docs block

The numbers are the sweep's own (its table, its pick and the reason, its failed points); this script only
copies them out of the tracking store in use, with the machine they were measured on.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path

import mlflow

from hf2mlflow import PROJECT_ROOT
from hf2mlflow.workflow.sweep_grid import failure_summary

from benchmarks.docs_blocks import update_docs

RESULTS = PROJECT_ROOT / "benchmarks" / "results"


def newest_sweep_run():
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list", max_results=1,
                              filter_string="tags.step = 'sweep' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    if not runs:
        raise SystemExit(f"no FINISHED sweep run in the tracking store {mlflow.get_tracking_uri()}; run "
                         f"`mlflow run . -e sweep --env-manager local` first, or pass --run_id")
    return runs[0]


def block(run, result: dict) -> str:
    params = run.data.params
    minutes = (run.info.end_time - run.info.start_time) / 60000
    failed = "".join(f"- {f['label']}: {failure_summary(f['error'])}\n"
                     for f in result.get("failed", []))
    failed_count = f", {len(result['failed'])} failed" if result.get("failed") else ""
    limit = "" if params.get("eval_limit") in (None, "0") else f" (first {params['eval_limit']})"
    return (f"`mlflow run . -e sweep -P sweep={params['sweep']} -P model={params['model']}`: run {run.info.run_id}, "
            f"{minutes:.0f} min; {len(result['points'])} points measured{failed_count}; dataset "
            f"{params['dataset']}{limit}; speed: {params['speed_rounds']} interleaved rounds of fresh processes; "
            f"{platform.machine()} with {_cores()} cores.\n\n{result['table']}\n\n**Pick:** {result['reason']}\n"
            + (f"\nPoints the builder could not make:\n\n{failed}" if failed else "")
            + "\n![speed against quality](../benchmarks/results/sweep.png)\n")


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_id", default="", help="the sweep run; default: the newest FINISHED one")
    parser.add_argument("--update-docs", action="store_true", help="rewrite the sweep block of docs/performance.md")
    parser.add_argument("--output_dir", default=str(RESULTS), help="where sweep.{md,json,png} go")
    args = parser.parse_args(argv)
    run = mlflow.get_run(args.run_id) if args.run_id else newest_sweep_run()
    if run.data.tags.get("step") != "sweep":
        raise SystemExit(f"run {run.info.run_id} is not a sweep run (its step tag: {run.data.tags.get('step')})")
    result = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/sweep.json")
    text = block(run, result)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text(text)
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    chart = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="pareto.png")
    shutil.copy(chart, out / "sweep.png")
    if args.update_docs:
        update_docs(text, "sweep")
    print(text)
    print(f"results: {out.resolve()} (sweep.md, sweep.json, sweep.png)"
          + ("; docs/performance.md updated" if args.update_docs else ""))
    return text


if __name__ == "__main__":
    main()
