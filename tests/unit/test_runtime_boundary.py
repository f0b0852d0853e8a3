"""The package's boundaries, read from the source with `ast` (imports inside functions count too):

- hf2mlflow/runtime/ ships inside every logged model, so it imports only the standard library, itself and what
  the logged model's environment holds (its pip requirements);
- the step subpackages import no other step subpackage: only shared modules, sources and the runtime.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path
from typing import Iterator

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "hf2mlflow"
RUNTIME = "hf2mlflow.runtime"

# What a logged model's environment provides besides the standard library, by import name, with the
# distribution that brings it. These are hf2mlflow.log_model.pyfunc.requirements() (checked below):
#   the builder's models on CPU: mlflow, onnxruntime, tokenizers, jinja2, numpy; on GPUs: mlflow,
#   onnxruntime-genai (-cuda, -directml: same import name), numpy;
#   optimum exports: mlflow, onnxruntime (-gpu: same import name), optimum (+ optimum-onnx), transformers,
#   tokenizers, torch and numpy;
# and pandas, which the runtime may import because mlflow itself depends on it.
MODEL_ENV_IMPORTS = {
    "mlflow": "mlflow",
    "numpy": "numpy",
    "onnxruntime_genai": "onnxruntime-genai",
    "onnxruntime": "onnxruntime",
    "optimum": "optimum",
    "transformers": "transformers",
    "tokenizers": "tokenizers",
    "jinja2": "jinja2",
    "torch": "torch",
    "pandas": "mlflow",  # a dependency of mlflow, not a requirement of its own
}

STEPS = {"convert", "log_model", "evaluate", "batch", "workflow", "serve", "databricks", "azureml"}
# What every step may import besides itself: the package root (PROJECT_ROOT, CONFIGS_DIR), the shared modules,
# the model sources and the runtime.
SHARED = {"config", "contract", "errors", "step_args", "tracking", "parity", "quality", "thresholds", "builder_graph",
          "logged_models", "datasets", "measure", "sources", "runtime", "cuda", "digest"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_project_module(name: str) -> bool:
    path = PACKAGE_DIR.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in the module at `path`, wherever it stands: module level,
    functions, branches; relative imports resolved; `from hf2mlflow.x import y` also as hf2mlflow.x.y when y
    is a module of the project; importlib.import_module/__import__ calls with a literal name."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            yield node.lineno, module
            for alias in node.names:
                if is_project_module(f"{module}.{alias.name}"):
                    yield node.lineno, f"{module}.{alias.name}"
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            yield node.lineno, node.args[0].value


def modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(PACKAGE_DIR.parent)}:{line}"


def test_the_runtime_imports_only_the_standard_library_itself_and_the_model_requirements():
    allowed = set(sys.stdlib_module_names) | set(MODEL_ENV_IMPORTS)
    found, outside = set(), []
    for path in modules(PACKAGE_DIR / "runtime"):
        for line, name in imports(path):
            found.add(name)
            top = name.partition(".")[0]
            if top == "hf2mlflow":
                ok = name == RUNTIME or name.startswith(RUNTIME + ".")
            else:
                ok = top in allowed
            if not ok:
                outside.append(f"{where(path, line)} imports {name}")
    assert not outside, ("hf2mlflow/runtime/ ships alone inside logged models, whose environment holds only "
                         "their requirements:\n" + "\n".join(outside))
    assert {"mlflow", "onnxruntime_genai", "hf2mlflow.runtime.chat_schema"} <= found  # the walk saw the imports


def test_the_allowed_imports_are_the_logged_models_requirements():
    """MODEL_ENV_IMPORTS stays what hf2mlflow.log_model.pyfunc.requirements() installs, for both routes and
    every execution provider."""
    from hf2mlflow.contract import GENAI_PACKAGE, OPTIMUM_ROUTE, ORT_PACKAGE
    from hf2mlflow.log_model.pyfunc import requirements

    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    def names(reqs: list[str]) -> set[str]:
        return {canonical(re.split(r"[=<>!~\[; ]", r, maxsplit=1)[0]) for r in reqs if not r.startswith("-")}

    genai_cpu, genai = names(requirements("cpu")), names(requirements("cuda"))
    optimum = names(requirements("cpu", OPTIMUM_ROUTE.artifact_format))
    assert genai_cpu == {"mlflow", "onnxruntime", "tokenizers", "jinja2", "numpy"}
    # GPU execution providers swap the runtime package for one imported under the same name.
    for provider, package in GENAI_PACKAGE.items():
        if provider != "cpu":
            assert names(requirements(provider)) == genai - {GENAI_PACKAGE["cuda"]} | {canonical(package)}
    for provider, package in ORT_PACKAGE.items():
        assert (names(requirements(provider, OPTIMUM_ROUTE.artifact_format))
                == optimum - {ORT_PACKAGE["cpu"]} | {canonical(package)})
    # GPU models' runtime packages, which import as onnxruntime_genai (onnxruntime-genai here)
    gpu_runtimes = {canonical(package) for package in GENAI_PACKAGE.values()}
    mlflow_deps = names(importlib.metadata.requires("mlflow") or [])
    for import_name, distribution in MODEL_ENV_IMPORTS.items():
        assert canonical(distribution) in genai_cpu | genai | optimum | gpu_runtimes, (
            f"{import_name} ({distribution}) is allowed in the runtime but no logged model requires it")
        if distribution == "mlflow" and import_name != "mlflow":
            assert canonical(import_name) in mlflow_deps, f"mlflow no longer brings {import_name}"
    # and each requirement is what one of the allowed names imports (optimum-onnx installs `optimum`)
    installed = importlib.metadata.packages_distributions()
    provided = {canonical(d) for name in MODEL_ENV_IMPORTS for d in installed.get(name, [])}
    unnamed = (genai_cpu | genai | optimum) - provided - gpu_runtimes
    assert not unnamed, f"requirements that MODEL_ENV_IMPORTS does not name: {unnamed}"


def step_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "hf2mlflow" and len(parts) > 1 else None


def test_every_subpackage_and_module_is_a_step_or_shared():
    entries = {p.stem for p in PACKAGE_DIR.iterdir()
               if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and p.name != "__pycache__")}
    assert not entries - STEPS - SHARED, "classify new parts of hf2mlflow/ in STEPS or SHARED here"
    assert not (STEPS | SHARED) - entries, "STEPS and SHARED name parts that hf2mlflow/ no longer has"


def test_no_step_imports_another_step():
    crossings = []
    for step in sorted(STEPS):
        for path in modules(PACKAGE_DIR / step):
            for line, name in imports(path):
                other = step_of(name)
                if other is not None and other != step and other not in SHARED:
                    crossings.append(f"{where(path, line)} ({step}) imports {name}")
    assert not crossings, "steps import shared modules, sources and the runtime, never each other:\n" + "\n".join(
        crossings)


def test_shared_modules_import_no_step():
    """Else a step would reach another step through them."""
    crossings = []
    for shared in sorted(SHARED):
        paths = modules(PACKAGE_DIR / shared) if (PACKAGE_DIR / shared).is_dir() else [PACKAGE_DIR / f"{shared}.py"]
        for path in paths + [PACKAGE_DIR / "__init__.py"]:
            for line, name in imports(path):
                if step_of(name) in STEPS:
                    crossings.append(f"{where(path, line)} imports {name}")
    assert not crossings, "shared modules import no step:\n" + "\n".join(sorted(set(crossings)))
