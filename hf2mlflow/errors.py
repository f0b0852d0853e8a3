"""Errors a user can fix, and the shared way a step script reports them."""

from __future__ import annotations

import dataclasses
import difflib
import errno
import sys


class StepError(Exception):
    """An error with a message that says what was wrong and what is allowed; no traceback needed."""


class ConfigError(StepError, ValueError):
    """A config file, key, value or parameter that is not allowed."""


def _chain(exc: BaseException):
    """`exc` and the exceptions it was raised from or while handling."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def fault_message(exc: BaseException) -> str | None:
    """What to tell the user when the machine, not the input, failed the step: a full disk or a tracking server
    that cannot be reached. None for anything else (that keeps its traceback)."""
    import mlflow
    import requests

    for cause in _chain(exc):
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            where = cause.filename2 or cause.filename
            return (f"no space left on device{f' writing {where}' if where else ''}; free space there (or give "
                    f"the experiment another artifact location) and run again: the failed run is never reused")
        if isinstance(cause, (requests.ConnectionError, requests.Timeout)):
            return (f"cannot reach the tracking server at {mlflow.get_tracking_uri()} ({cause}); the run could "
                    f"not be ended there, so it stays unfinished and is never reused; run again when the server "
                    f"is back (MLFLOW_HTTP_REQUEST_MAX_RETRIES and MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR set how long "
                    f"a step waits for it)")
    return None


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
    """Parse `args_class` (a dataclass) from argv, run `step_fn(args)`, turn StepErrors and machine faults
    (full disk, unreachable tracking server) into a clean exit that says what happened."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(args_class, prog=f"{step}")
    args = _parse_args(parser, args_class, argv)
    try:
        return step_fn(args)
    except StepError as exc:
        print(f"\n[{step}] FAILED: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
    except Exception as exc:
        message = fault_message(exc)
        if message is None:
            raise
        print(f"\n[{step}] FAILED: {message}", file=sys.stderr)
        raise SystemExit(1) from exc
