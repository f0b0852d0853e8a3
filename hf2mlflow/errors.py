"""Errors a user can fix, and the shared way a step script reports them."""

from __future__ import annotations

import dataclasses
import difflib
import sys


class StepError(Exception):
    """An error with a message that says what was wrong and what is allowed; no traceback needed."""


class ConfigError(StepError, ValueError):
    """A config file, key, value or parameter that is not allowed."""


def _parse_args(parser, args_class, argv):
    """The step's dataclass from argv. An argument it does not have (`mlflow run` passes a misspelled -P name on
    as one) is refused like a bad value, with the allowed ones."""
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        names = [f.name for f in dataclasses.fields(args_class)]
        flag = next((u for u in unknown if u.startswith("-")), "").lstrip("-").split("=")[0].replace("-", "_")
        hint = difflib.get_close_matches(flag, names, n=1)
        parser.error(f"unknown argument(s) {' '.join(unknown)}; allowed: {', '.join('--' + n for n in names)}"
                     + (f" (did you mean --{hint[0]}?)" if hint else ""))
    return args


def run_step(step: str, args_class, step_fn, argv=None):
    """Parse `args_class` (a dataclass) from argv, run `step_fn(args)`, turn StepErrors into a clean exit."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(args_class, prog=f"{step}")
    args = _parse_args(parser, args_class, argv)
    try:
        return step_fn(args)
    except StepError as exc:
        print(f"\n[{step}] FAILED: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
