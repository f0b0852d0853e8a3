"""Errors a user can fix, and the shared way a step script reports them."""

from __future__ import annotations

import sys


class StepError(Exception):
    """An error with a message that says what was wrong and what is allowed; no traceback needed."""


class ConfigError(StepError, ValueError):
    """A config file, key, value or parameter that is not allowed."""


def run_step(step: str, args_class, step_fn, argv=None):
    """Parse `args_class` (a dataclass) from argv, run `step_fn(args)`, turn StepErrors into a clean exit."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(args_class, prog=f"{step}")
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    try:
        return step_fn(args)
    except StepError as exc:
        print(f"\n[{step}] FAILED: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
