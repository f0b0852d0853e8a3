"""The sweep's pure logic: the points a sweep config means, the target each point is, the Pareto front of
speed against closeness to the source model (teacher-forced mean KL divergence), and which point is picked and
why. No MLflow, no model."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import ValidationError

from hf2mlflow.config import SWEEP_KEYS, SweepConfig, Target
from hf2mlflow.errors import ConfigError
from hf2mlflow.thresholds import within

REFERENCE = "reference"
BASE = "base"


@dataclass(frozen=True)
class Point:
    """One set of options over the base target (or the reference target itself)."""

    key: str  # short and stable: names the point's alias and target files
    label: str  # what differs from the base, for tables and charts
    overrides: dict[str, Any]
    target: dict  # the full target as a mapping (name excluded)
    conversion: dict  # the target without the options that need no new conversion


@dataclass
class Measured:
    """A point's figures: quality and parity from its evaluate run, speed from the interleaved rounds."""

    point: Point
    quality: float  # mean per-prompt score of the sweep's quality metric
    examples: int
    greedy_agreement: float
    decode_tokens_per_s: float
    ttft_ms: float
    size_mib: float
    peak_rss_mib: float
    figures: dict = field(default_factory=dict)
    # Teacher-forced against the source model in PyTorch float32 (evaluate's figures on the held-out text).
    mean_kld: float = float("nan")
    top1_agreement: float = float("nan")

    @property
    def prompts(self) -> float:
        """The quality as prompts: the per-prompt scores summed."""
        return self.quality * self.examples


def describe(overrides: dict[str, Any]) -> str:
    return " ".join(f"{k.split('.', 1)[1]}={_text(v)}" for k, v in overrides.items()) or "as the base target"


def failure_summary(error: str, width: int = 160) -> str:
    """A failed point's error in one line: the step and run that failed, and the exception's own line (the last
    of a builder's traceback), its middle cut when longer than `width`."""
    where, _, rest = error.partition(": ") if error.startswith("step ") else ("", "", error)
    lines = [line.strip() for line in rest.splitlines() if line.strip()] or ["(no message)"]
    last = lines[-1] if len(lines) == 1 or ":" not in lines[0] else lines[0].split(": ", 1)[0] + ": " + lines[-1]
    if len(last) > width:
        last = last[:width // 2] + " ... " + last[-(width // 2):]
    return f"{where}: {last}" if where else last


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _digest(mapping: dict) -> str:
    return hashlib.sha256(json.dumps(mapping, sort_keys=True, default=str).encode()).hexdigest()[:10]


def apply(base: dict, overrides: dict[str, Any]) -> dict:
    """`base` (a target mapping) with each `section.key: value` set."""
    out = json.loads(json.dumps(base))
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        out.setdefault(section, {})[key] = value
    return out


def expand(config: SweepConfig) -> list[dict[str, Any]]:
    """Every combination of the grid, then the extra points; each once, in order."""
    keys = list(config.grid)
    combos = [dict(zip(keys, values, strict=True)) for values in itertools.product(*config.grid.values())]
    seen, out = set(), []
    for overrides in [*combos, *config.points]:
        marker = json.dumps(overrides, sort_keys=True, default=str)
        if marker not in seen:
            seen.add(marker)
            out.append(dict(overrides))
    return out


def points(config: SweepConfig, base: Target, reference: Target, source: str) -> list[Point]:
    """The reference, the base target, then every point of the grid that differs from the base; each point's
    target checked as a target file would be, so a bad combination stops the sweep before anything is built.
    `source` names the sweep file in errors."""
    base_map = base.model_dump(mode="json", exclude={"name"})
    out = [_point(REFERENCE, f"reference ({reference.name})", {}, reference.model_dump(mode="json", exclude={"name"})),
           _point(BASE, f"base ({base.name})", {}, base_map)]
    problems = []
    for overrides in expand(config):
        target = apply(base_map, overrides)
        try:
            Target.model_validate({**target, "name": "point"})
        except ValidationError as err:
            reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
                                for e in err.errors())
            problems.append(f"point {describe(overrides)}: {reasons}")
            continue
        if target == base_map:
            continue
        target["description"] = f"{base.name} with {describe(overrides)} (a sweep point)"
        out.append(_point("", describe(overrides), overrides, target))
    if problems:
        raise ConfigError(f"{source}: {len(problems)} point(s) are not valid targets over '{base.name}':\n  "
                          + "\n  ".join(problems))
    return out


# Target sections that need no new conversion when they change: the logged model reads them at load time.
RUNTIME_SECTIONS = {k.split(".")[0] for k, needs_conversion in SWEEP_KEYS.items() if not needs_conversion}


def _point(key: str, label: str, overrides: dict, target: dict) -> Point:
    conversion = {k: v for k, v in target.items() if k not in RUNTIME_SECTIONS | {"description"}}
    return Point(key or _digest(target), label, overrides, target, conversion)


def target_file(folder: Path, stem: str, target: dict) -> Path:
    """The target as a YAML file named for its content, so the same options are the same file (and the step
    cache sees the same inputs) in every sweep."""
    name = f"{stem}-{_digest(target)}"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({"name": name, **target}, sort_keys=False))
        tmp.replace(path)
    return path


def pareto_front(measured: list[Measured]) -> list[Measured]:
    """Points no other point beats on both speed and closeness to the source model (at least as fast and at most
    its mean KL divergence, better on one)."""
    def dominated(m: Measured) -> bool:
        return any(o.decode_tokens_per_s >= m.decode_tokens_per_s and o.mean_kld <= m.mean_kld
                   and (o.decode_tokens_per_s > m.decode_tokens_per_s or o.mean_kld < m.mean_kld) for o in measured)

    return sorted((m for m in measured if not dominated(m)), key=lambda m: m.decode_tokens_per_s)


def within_bound(m: Measured, reference: Measured, config: SweepConfig) -> tuple[bool, str]:
    """Whether `m` keeps the sweep's quality bound, and the figures that say so."""
    bound, oks, texts = config.quality, [], []

    def check(figure: str, limit, ok: bool, sign: str, limit_text: str) -> None:
        oks.append(limit is None or ok)
        texts.append(figure if limit is None else f"{figure} ({sign if ok else _NOT[sign]} {limit_text})")

    lost = reference.prompts - m.prompts
    check(f"mean KLD {m.mean_kld:.3g}", bound.max_mean_kld,
          bound.max_mean_kld is not None and within(m.mean_kld, bound.max_mean_kld, False, 1e-12), "<=",
          f"{bound.max_mean_kld or 0:g}")
    check(f"top-1 agreement {m.top1_agreement:.1%}", bound.min_top1_agreement,
          bound.min_top1_agreement is not None and within(m.top1_agreement, bound.min_top1_agreement, True, 1e-9),
          ">=", f"{bound.min_top1_agreement or 0:.1%}")
    check(f"{bound.metric} {m.prompts:.1f}/{m.examples} against the reference's {reference.prompts:.1f}",
          bound.max_prompts_lost,
          bound.max_prompts_lost is not None and within(lost, bound.max_prompts_lost, False, 1e-9),
          "<=", f"{bound.max_prompts_lost} prompt(s) lost")
    check(f"greedy agreement with PyTorch {m.greedy_agreement:.0%}", bound.min_greedy_agreement,
          bound.min_greedy_agreement is not None
          and within(m.greedy_agreement, bound.min_greedy_agreement, True, 1e-9), ">=",
          f"{bound.min_greedy_agreement or 0:.0%}")
    return all(oks), ", ".join(texts)


_NOT = {"<=": ">", ">=": "<"}


def pick(measured: list[Measured], config: SweepConfig) -> tuple[Optional[Measured], str]:
    """The fastest point (not the reference) within the quality bound, the better quality breaking a tie, and
    why it won; None and why not when no point keeps the bound."""
    (reference,) = [m for m in measured if m.point.key == REFERENCE]
    candidates = [(m, *within_bound(m, reference, config)) for m in measured if m.point.key != REFERENCE]
    # Fastest first; at equal speed, the closer to the source model.
    eligible = sorted((c for c in candidates if c[1]), key=lambda c: (-c[0].decode_tokens_per_s, c[0].mean_kld))
    if not eligible:
        return None, "no point keeps the quality bound: " + "; ".join(f"{m.point.label}: {why}"
                                                                       for m, _, why in candidates)
    winner, _, why = eligible[0]
    base = next(m for m in measured if m.point.key == BASE)
    runner_up = (f"; next fastest within the bound: {eligible[1][0].point.label} at "
                 f"{eligible[1][0].decode_tokens_per_s:.1f} tok/s") if len(eligible) > 1 else ""
    speedup = winner.decode_tokens_per_s / base.decode_tokens_per_s
    over_reference = winner.decode_tokens_per_s / reference.decode_tokens_per_s
    return winner, (
        f"{winner.point.label}: the fastest of {len(eligible)} of {len(candidates)} points within the quality "
        f"bound, decoding {winner.decode_tokens_per_s:.1f} tok/s ({speedup:.2f}x the base target's "
        f"{base.decode_tokens_per_s:.1f}, {over_reference:.2f}x the reference's), first token "
        f"{winner.ttft_ms:.0f} ms; {why}{runner_up}")
