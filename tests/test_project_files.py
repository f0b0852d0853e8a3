"""The pins, conda.yaml, MLproject, README and .ci/run agree with each other."""

import dataclasses
import importlib.metadata
import re
import subprocess
import sys
import tomllib

import pytest
import yaml

from hf2mlflow import PROJECT_ROOT
from hf2mlflow.step_args import (BatchInferArgs, ConvertArgs, EvaluateArgs, LogPyfuncArgs, LogTransformersArgs,
                                 MainArgs, SweepArgs, parse_step_args)

PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
CONDA = yaml.safe_load((PROJECT_ROOT / "conda.yaml").read_text())
MLPROJECT = yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())


def conda_pip_pins():
    return next(d["pip"] for d in CONDA["dependencies"] if isinstance(d, dict))


def test_every_dependency_is_pinned_exactly():
    for requirement in PYPROJECT["project"]["dependencies"]:
        assert re.fullmatch(r"[A-Za-z0-9_.-]+==[\w.]+", requirement), requirement


def test_conda_yaml_mirrors_pyproject_pins():
    assert conda_pip_pins() == PYPROJECT["project"]["dependencies"]
    python = next(d for d in CONDA["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert PYPROJECT["project"]["requires-python"] == f">={python[7:]},<3.{int(python.split('.')[1]) + 1}"


def test_installed_versions_are_the_pinned_ones():
    for requirement in PYPROJECT["project"]["dependencies"]:
        name, version = requirement.split("==")
        installed = importlib.metadata.version(name)
        assert installed.split("+")[0] == version, f"{name}: installed {installed}, pinned {version}"


def test_conda_lock_reads_conda_yaml_for_three_platforms(tmp_path):
    # conda-lock's own parser; an empty PyPI->conda mapping keeps it offline and pip deps as pip deps.
    from conda_lock.src_parser.environment_yaml import parse_environment_file

    mapping = tmp_path / "mapping.json"
    mapping.write_text("{}")
    platforms = ["linux-64", "osx-arm64", "win-64"]
    spec = parse_environment_file(PROJECT_ROOT / "conda.yaml", platforms, mapping_url=str(mapping))
    for platform in platforms:
        names = {d.name for d in spec.dependencies[platform]}
        assert {"python", "mlflow", "onnxruntime-genai", "transformers"} <= names


ENTRY_POINTS = {"convert_onnx": ConvertArgs, "log_pyfunc": LogPyfuncArgs, "log_transformers": LogTransformersArgs,
                "evaluate": EvaluateArgs, "batch_infer": BatchInferArgs, "main": MainArgs,
                "sweep": SweepArgs}


def test_every_entry_point_is_a_step_dataclass():
    assert set(MLPROJECT["entry_points"]) == set(ENTRY_POINTS)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_mlproject_parameters_are_the_step_dataclass(entry_point):
    """MLproject's parameters, their defaults and the command line are the dataclass's fields, in order."""
    args_class = ENTRY_POINTS[entry_point]
    assert MLPROJECT["conda_env"] == "conda.yaml"
    entry = MLPROJECT["entry_points"][entry_point]
    fields = dataclasses.fields(args_class)
    assert list(entry["parameters"]) == [f.name for f in fields]
    required = [f.name for f in fields if f.default is dataclasses.MISSING]
    assert [n for n, p in entry["parameters"].items() if not isinstance(p, dict) or "default" not in p] == required
    argv = [a for n in required for a in (f"--{n}", "x")]
    defaults = dataclasses.asdict(parse_step_args(args_class, argv, entry_point))
    for field in fields:
        assert f"--{field.name} {{{field.name}}}" in entry["command"]
        if field.name in required:
            continue
        spec = entry["parameters"][field.name]
        # MLproject passes the default as text; parsed as the step parses it, it is the dataclass's default.
        parsed = parse_step_args(args_class, argv + [f"--{field.name}", str(spec["default"])], entry_point)
        assert getattr(parsed, field.name) == defaults[field.name] == field.default, field.name
    assert entry["command"].split()[1] == f"steps/{entry_point}.py"
    assert (PROJECT_ROOT / "steps" / f"{entry_point}.py").is_file()


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_step_help_imports_nothing_heavy(entry_point):
    """`--help` (and argument parsing) loads neither torch, transformers, mlflow nor onnxruntime-genai: the step's
    own module is imported only once its arguments are good."""
    proc = subprocess.run([sys.executable, "-X", "importtime", f"steps/{entry_point}.py", "--help"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(f"--{f.name}" in proc.stdout for f in dataclasses.fields(ENTRY_POINTS[entry_point]))
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"torch", "transformers", "mlflow", "onnxruntime_genai"}, sorted(imported)


def readme_command(marker: str) -> str:
    text = (PROJECT_ROOT / "README.md").read_text()
    return re.search(rf"<!-- {marker} -->\n```bash\n(.+?)\n```", text).group(1)


def test_ci_runs_the_readme_commands_in_order():
    ci_lines = (PROJECT_ROOT / ".ci" / "run").read_text().splitlines()
    setup, test = readme_command("setup-command"), readme_command("test-command")
    assert setup in ci_lines and test in ci_lines
    assert ci_lines.index(setup) < ci_lines.index(test)


def test_no_lock_file_that_conda_lock_did_not_write():
    lock = PROJECT_ROOT / "conda-lock.yml"
    if lock.exists():
        assert "generated by conda-lock" in lock.read_text()[:2000]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_is_short_and_links_every_docs_page():
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200, "README.md is the overview; reference and measurements go to docs/"
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)", readme))
    pages = {f"docs/{p.name}" for p in (PROJECT_ROOT / "docs").glob("*.md")}
    assert linked == pages


DOC_PAGES = sorted(["README.md"] + [f"docs/{p.name}" for p in (PROJECT_ROOT / "docs").glob("*.md")])


@pytest.mark.parametrize("page", DOC_PAGES)
def test_docs_links_point_at_files_and_headings_that_exist(page):
    path = PROJECT_ROOT / page
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", path.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        linked = (path.parent / target).resolve() if target else path
        assert linked.exists(), f"{page}: {target} does not exist"
        if anchor:
            prose = re.sub(r"^```.*?^```", "", linked.read_text(), flags=re.M | re.S)  # no `# comment` lines
            headings = re.findall(r"^#+ (.+)$", prose, flags=re.M)
            assert anchor in {github_anchor(h) for h in headings}, f"{page}: no heading for #{anchor} in {target}"


def test_performance_doc_holds_the_generated_blocks():
    """python -m benchmarks.{suite,batching,quantization_sweep} --update-docs rewrite these blocks."""
    text = (PROJECT_ROOT / "docs" / "performance.md").read_text()
    for section in ("benchmarks", "batching", "quantization"):
        begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
        assert text.count(begin) == text.count(end) == 1 and text.index(begin) < text.index(end), section
