"""The sweep entry point: a grid of conversion and runtime options over one base target, one child run per
point, and the fastest point within a quality bound registered under an alias.

Each point is a child run of the sweep's run, and its steps (convert_onnx -> log_pyfunc -> evaluate) are that
point's children, chained and reused exactly as `main` chains and reuses them: a point whose inputs did not
change costs a lookup. Options that need no new conversion (session options, batching) share the conversion
of their builder options. Quality and greedy agreement with PyTorch come from each point's evaluate run;
speed from interleaved rounds of one fresh process per point, after every point is built, so that the
points are timed side by side under the same conditions.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from hf2mlflow.config import config_file, load_dataset_config, load_sweep, load_target
from hf2mlflow.datasets import load_examples
from hf2mlflow.errors import ConfigError, StepError, fault_message
from hf2mlflow.measure import SERVED, measure_fresh
from hf2mlflow.sources.tiny import home
from hf2mlflow.tracking import check_alias, print_run_summary, step_run
from hf2mlflow.workflow.chain import Chain, ChainModel, configs_digest, dataset_digest
from hf2mlflow.workflow.sweep_grid import (BASE, REFERENCE, Measured, Point, failure_summary, pareto_front, pick,
                                           points, target_file, within_bound)
from hf2mlflow.step_args import SweepArgs

STEP = "sweep"
POINT_ORDER = ("convert_onnx", "log_pyfunc", "evaluate")
MIN_DECODED = 8  # tokens after the first: fewer make the decode rate mostly timer noise


def _validate(args: SweepArgs):
    """Every input, before anything is built: the sweep file, its targets and every point's target."""
    if args.eval_limit < 0:
        raise ConfigError(f"eval_limit must be 0 (all examples) or positive, got {args.eval_limit}")
    check_alias(args.alias)
    config = load_sweep(args.sweep)
    where = str(config_file("sweeps", args.sweep))
    try:
        base, reference = load_target(config.base_target), load_target(config.reference_target)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if (reference.execution_provider, base.execution_provider) != (base.execution_provider,) * 2:
        raise ConfigError(f"{where}: reference_target '{reference.name}' runs on {reference.execution_provider}, the "
                          f"base target '{base.name}' on {base.execution_provider}; they must share a provider")
    dataset = load_dataset_config(args.dataset)
    load_examples(dataset)
    if config.quality.metric not in dataset.metrics:
        raise ConfigError(f"{where}: key 'quality.metric': '{config.quality.metric}' is not scored by dataset "
                          f"'{dataset.name}'; it scores: {', '.join(dataset.metrics)}")
    grid = points(config, base, reference, where)
    # Last: it hashes the model's local files and asks the hub for its commit.
    return ChainModel.resolve(args.model, STEP), config, base, reference, grid, dataset_digest(args.dataset, dataset)


def _run_point(chain: Chain, args: SweepArgs, point: Point, files: dict, registered: str, model: ChainModel,
               datasets: str) -> dict:
    """The point's three steps, reused where their inputs did not change; returns its evaluate summary."""
    conversion, target = files["conversion"], files["target"]
    convert = chain.step("convert_onnx", {"model": args.model, "target": str(conversion), **model.source_params},
                         {}, configs_digest(model.digest.encode(), conversion.read_bytes()))
    pyfunc = chain.step("log_pyfunc", {"convert_run_id": convert.run_id, "target": str(target),
                                       "registered_model_name": registered, "alias": f"point-{point.key}"},
                        {"convert_onnx": convert.run_id}, configs_digest(target.read_bytes()))
    # No promotion gate: a point is judged by the sweep's own bounds against its reference, not promoted alone.
    evaluate = chain.step("evaluate", {"models": pyfunc.run_id, "dataset": args.dataset, "limit": args.eval_limit,
                                       "gate": ""}, {"log_pyfunc": pyfunc.run_id}, datasets)
    client = mlflow.MlflowClient()
    (summary,) = mlflow.artifacts.load_dict(f"runs:/{evaluate.run_id}/comparison.json")
    examples = int(client.get_run(evaluate.run_id).data.params["examples"])
    return {"summary": summary, "examples": examples, "model_uri": pyfunc.registered_model_uri,
            "version_uri": client.get_run(pyfunc.run_id).data.tags["registered_model_version_uri"],
            "runs": {r.entry_point: r.run_id for r in chain.results[-3:]},
            "reused": all(r.reused for r in chain.results[-3:])}


def _speed_rounds(built: dict, config, work: Path) -> dict[str, dict]:
    """Decode tok/s and time to first token of every point: `rounds` rounds, each point once per round in a
    fresh process (A, B, C, A, B, C, ...); medians, with min and max."""
    request = {"messages": [{"role": "user", "content": config.speed.prompt}], "max_tokens": config.speed.max_tokens}
    folders = {}
    for key, point in built.items():
        folders[key] = mlflow.artifacts.download_artifacts(point["model_uri"], dst_path=str(work / key))
    samples = {key: {"decode": [], "ttft": [], "rss": []} for key in built}
    for round_number in range(1, config.speed.rounds + 1):
        print(f"[{STEP}] speed round {round_number}/{config.speed.rounds}: {len(built)} points, one fresh process each")
        for key, folder in folders.items():
            result = measure_fresh(SERVED, folder, [request], key)
            (row,) = result["rows"]
            decoded = max(row["completion_tokens"] - 1, 0)
            if decoded < MIN_DECODED:
                raise StepError(f"point {key} answered the speed prompt with {row['completion_tokens']} token(s): "
                                f"too few to time decoding (at least {MIN_DECODED + 1}); set `speed.prompt` in the "
                                f"sweep file to one the model answers at length")
            samples[key]["decode"].append(row["decode_tps"])
            samples[key]["ttft"].append(1000 * row["ttft_s"])
            samples[key]["rss"].append(result["peak_rss_bytes"] / 2**20)
    return {key: {name: {"median": statistics.median(v), "min": min(v), "max": max(v)} for name, v in s.items()}
            for key, s in samples.items()}


def _chart(measured: list[Measured], front: list[Measured], winner, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for m in measured:
        on_front = m in front
        ax.scatter(m.decode_tokens_per_s, m.mean_kld, s=70 if on_front else 40,
                   color="tab:blue" if on_front else "tab:gray", zorder=3)
        ax.annotate(m.point.label, (m.decode_tokens_per_s, m.mean_kld), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    ax.plot([m.decode_tokens_per_s for m in front], [m.mean_kld for m in front], color="tab:blue", alpha=0.6,
            label="Pareto front")
    if winner is not None:
        ax.scatter(winner.decode_tokens_per_s, winner.mean_kld, marker="*", s=300, color="tab:orange", zorder=4,
                   label=f"pick: {winner.point.label}")
    ax.set_xlabel("decode tokens/s (median of interleaved fresh-process rounds; higher is faster)")
    ax.set_ylabel("mean KL divergence from the source model, teacher-forced (lower is better)")
    ax.set_title("Sweep: speed against closeness to the source model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(measured: list[Measured], front: list[Measured], winner, reference: Measured, config,
          failed: dict) -> str:
    """The sweep's results as a markdown table, fastest first."""
    lines = [f"| point | decode tok/s (min-max) | first token ms | mean KLD | top-1 agreement | "
             f"{config.quality.metric} (prompts) | greedy agreement | size MiB | peak RSS MiB | within bound | "
             "Pareto |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in sorted(measured, key=lambda m: -m.decode_tokens_per_s):
        ok = "reference" if m is reference else ("yes" if within_bound(m, reference, config)[0] else "no")
        speed = m.figures["decode"]
        lines.append(
            f"| {'**' + m.point.label + '** (pick)' if m is winner else m.point.label} | {m.decode_tokens_per_s:.1f} "
            f"({speed['min']:.1f}-{speed['max']:.1f}) | {m.ttft_ms:.0f} | {m.mean_kld:.3g} | {m.top1_agreement:.1%} | "
            f"{m.prompts:.1f}/{m.examples} | "
            f"{m.greedy_agreement:.0%} | {m.size_mib:.0f} | {m.peak_rss_mib:.0f} | {ok} | "
            f"{'yes' if m in front else ''} |")
    for entry in failed.values():
        lines.append(f"| {entry['label']} | failed: {failure_summary(entry['error'], 100)} | | | | | | | | no | |")
    return "\n".join(lines)


def run_sweep(args: SweepArgs) -> dict:
    model, config, base, reference, grid, datasets = _validate(args)
    registered = args.registered_model_name or f"{args.model}-{base.name}-sweep"
    folder = home() / "sweep-targets"
    files = {}
    for point in grid:
        stem = reference.name if point.key == REFERENCE else base.name
        files[point.key] = {"conversion": target_file(folder, stem, point.conversion),
                            "target": target_file(folder, stem, point.target)}
    params = {**dataclasses.asdict(args), "base_target": base.name, "reference_target": reference.name,
              "points": len(grid), "quality_metric": config.quality.metric,
              **{f"quality.{k}": v for k, v in config.quality.model_dump(exclude_none=True).items()},
              "speed_rounds": config.speed.rounds}
    tags = {"model": args.model, "sweep": config.name}
    with step_run(STEP, f"{STEP}-{args.model}-{config.name}", tags, params) as run:
        experiment_id = run.info.experiment_id
        print(f"[{STEP}] {len(grid)} points over '{base.name}' (reference '{reference.name}'), "
              f"registered as '{registered}'")
        built, failed = {}, {}
        for number, point in enumerate(grid, start=1):
            print(f"\n[{STEP}] point {number}/{len(grid)}: {point.label}")
            child = mlflow.start_run(run_name=f"point-{point.key}", nested=True)
            mlflow.set_tags({"step": f"{STEP}.point", "sweep.point": point.label, "sweep.point_key": point.key})
            mlflow.log_params({"point": point.label, **{k: str(v) for k, v in point.overrides.items()},
                               "target_file": str(files[point.key]["target"])})
            chain = Chain(experiment_id, f"{STEP} {number}/{len(grid)}", set(POINT_ORDER) if args.force else set(),
                          POINT_ORDER)
            try:
                built[point.key] = {**_run_point(chain, args, point, files[point.key], registered, model,
                                                       datasets),
                                    "child_run_id": child.info.run_id}
            except StepError as exc:
                # A point the builder or runtime cannot make is a result of the sweep, not the end of it: its
                # runs end FAILED (never reused) and it is left out of the pick. The two the others are
                # measured against are needed.
                mlflow.set_tag("error", str(exc)[:4000])
                mlflow.end_run("FAILED")
                if point.key in (REFERENCE, BASE):
                    raise StepError(f"{point.label}: {exc}") from None
                failed[point.key] = {"label": point.label, "overrides": point.overrides, "error": str(exc),
                                     "child_run_id": child.info.run_id}
                print(f"[{STEP}] point {number}/{len(grid)} FAILED, left out of the pick: {exc}")
                continue
            mlflow.end_run()
        grid = [p for p in grid if p.key not in failed]
        with tempfile.TemporaryDirectory(prefix=f"{STEP}-") as work:
            speed = _speed_rounds(built, config, Path(work))
        measured = []
        for point in grid:
            summary, figures = built[point.key]["summary"], speed[point.key]
            m = Measured(point, float(summary[config.quality.metric]), built[point.key]["examples"],
                         float(summary.get("parity_identical_rate", float("nan"))), figures["decode"]["median"],
                         figures["ttft"]["median"], float(summary["size_mib"]), figures["rss"]["median"], figures,
                         float(summary.get("mean_kld", float("nan"))),
                         float(summary.get("top1_agreement", float("nan"))))
            measured.append(m)
            mlflow.MlflowClient().log_batch(built[point.key]["child_run_id"], metrics=[
                mlflow.entities.Metric(name, value, 0, 0) for name, value in (
                    ("decode_tokens_per_s", m.decode_tokens_per_s), ("ttft_ms", m.ttft_ms),
                    (config.quality.metric, m.quality), ("greedy_agreement", m.greedy_agreement),
                    ("mean_kld", m.mean_kld), ("top1_agreement", m.top1_agreement),
                    ("size_mib", m.size_mib), ("peak_rss_mib", m.peak_rss_mib))])
        reference_m = next(m for m in measured if m.point.key == REFERENCE)
        front = pareto_front(measured)
        winner, reason = pick(measured, config)
        text = table(measured, front, winner, reference_m, config, failed)
        result = {"sweep": config.name, "model": args.model, "reason": reason, "table": text,
                  "pick": None, "points": [], "failed": list(failed.values())}
        for m in measured:
            entry = built[m.point.key]
            result["points"].append({
                "key": m.point.key, "label": m.point.label, "overrides": m.point.overrides,
                "decode_tokens_per_s": m.figures["decode"], "ttft_ms": m.figures["ttft"],
                "peak_rss_mib": m.figures["rss"], "mean_kld": m.mean_kld, "top1_agreement": m.top1_agreement,
                config.quality.metric: m.quality, "prompts": m.prompts,
                "examples": m.examples, "greedy_agreement": m.greedy_agreement, "size_mib": m.size_mib,
                "pareto": m in front, "within_bound": m is not reference_m and within_bound(m, reference_m, config)[0],
                "model_uri": entry["model_uri"], "version_uri": entry["version_uri"], "runs": entry["runs"],
                "child_run_id": entry["child_run_id"], "reused": entry["reused"]})
        if winner is not None:
            version = built[winner.point.key]["version_uri"].rsplit("/", 1)[1]
            mlflow.MlflowClient().set_registered_model_alias(registered, args.alias, version)
            uri = f"models:/{registered}@{args.alias}"
            result["pick"] = {"key": winner.point.key, "label": winner.point.label, "overrides": winner.point.overrides,
                              "registered_model_uri": uri, "version": version,
                              "target": {"name": f"{base.name}-sweep-pick", **winner.point.target}}
            mlflow.set_tags({"registered_model_uri": uri, "sweep.pick": winner.point.label,
                             "sweep.reason": reason[:4000]})
            mlflow.log_metrics({"pick.decode_tokens_per_s": winner.decode_tokens_per_s, "pick.ttft_ms": winner.ttft_ms,
                                "pick.mean_kld": winner.mean_kld, "pick.top1_agreement": winner.top1_agreement,
                                f"pick.{config.quality.metric}": winner.quality})
        with tempfile.TemporaryDirectory() as out:
            out = Path(out)
            (out / "sweep.md").write_text(f"{text}\n\n{reason}\n")
            (out / "sweep.json").write_text(json.dumps(result, indent=2, default=str))
            if winner is not None:
                import yaml

                (out / "pick_target.yaml").write_text(yaml.safe_dump(result["pick"]["target"], sort_keys=False))
            _chart(measured, front, winner, out / "pareto.png")
            mlflow.log_artifacts(str(out))
        if winner is None:
            raise StepError(f"{reason}. Every point is logged in run {run.info.run_id} (sweep.md); loosen "
                            f"`quality` in the sweep file or try other options")
    print(f"\n[{STEP}] results\n{text}\n\n[{STEP}] pick: {reason}")
    print_run_summary(STEP, run, {"registered": result["pick"]["registered_model_uri"],
                                  "table": f"{run.info.artifact_uri}/sweep.md",
                                  "chart": f"{run.info.artifact_uri}/pareto.png",
                                  "pick's target": f"{run.info.artifact_uri}/pick_target.yaml"})
    return result


def main(args: SweepArgs) -> dict:
    try:
        return run_sweep(args)
    except MlflowException as exc:
        if fault_message(exc):
            raise
        raise StepError(f"tracking error: {exc.message}") from None
