"""Fault injection for tests, kept out of the package: with this folder first on PYTHONPATH, every Python process
started with that environment (`mlflow run`, main, the steps it launches) imports this at startup, and the step
named by HF2MLFLOW_FAIL_STEP fails inside its run, as a real failure would: the run ends FAILED with its
`error` tag and the step exits saying why (hf2mlflow.tracking.step_run records it).

It wraps hf2mlflow.tracking.step_run as that module is imported, before any step module binds the name. A
sitecustomize found further along sys.path (a distribution's own) still runs."""

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
FAIL_STEP = os.environ.get("HF2MLFLOW_FAIL_STEP", "")


def _fail_in(module) -> None:
    from hf2mlflow.errors import StepError

    original = module.step_run

    @contextlib.contextmanager
    def step_run(step, *args, **kwargs):
        with original(step, *args, **kwargs) as run:
            if step == FAIL_STEP:
                raise StepError(f"failing on purpose: HF2MLFLOW_FAIL_STEP={step} "
                                       f"(tests/fault_injection/sitecustomize.py)")
            yield run

    module.step_run = step_run


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _fail_in(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "hf2mlflow.tracking":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def _next_sitecustomize() -> None:
    for entry in sys.path:
        if os.path.abspath(entry or os.curdir) == HERE:
            continue
        spec = importlib.machinery.PathFinder.find_spec("sitecustomize", [entry])
        if spec is not None:
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
            return


if FAIL_STEP:
    sys.meta_path.insert(0, _Finder())
_next_sitecustomize()
