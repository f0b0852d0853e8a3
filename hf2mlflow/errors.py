"""Errors a user can fix, and the shared way a step script reports them."""

from __future__ import annotations

import contextlib
import errno
import importlib
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


def run_step(step: str, args_class, step_fn: str, argv=None):
    """Parse `args_class` (a dataclass) from argv, then import `step_fn` ("package.module:function") and run
    it on the arguments, turning StepErrors and machine faults (full disk, unreachable tracking server) into a
    clean exit that says what happened. The step's module is imported only once the arguments parse, so
    `--help` and a bad argument answer at once."""
    from hf2mlflow.step_args import parse_step_args

    args = parse_step_args(args_class, argv, prog=step)
    module, function = step_fn.split(":")
    with failures_reported(step):
        return getattr(importlib.import_module(module), function)(args)


@contextlib.contextmanager
def failures_reported(tag: str):
    """StepErrors and machine faults inside end the process with `[tag] FAILED: <what happened>`, exit code 1,
    not a traceback; anything else is a bug and raises."""
    try:
        yield
    except StepError as exc:
        print(f"\n[{tag}] FAILED: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
    except Exception as exc:
        message = fault_message(exc)
        if message is None:
            raise
        print(f"\n[{tag}] FAILED: {message}", file=sys.stderr)
        raise SystemExit(1) from exc
