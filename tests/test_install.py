"""A non-editable install (the built wheel) holds the package, its shipped configs and data, and nothing else."""

import subprocess
import sys
import zipfile

from hf2mlflow import PROJECT_ROOT


def test_wheel_ships_configs_and_works_outside_the_checkout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(PROJECT_ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("hf2mlflow-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hf2mlflow/configs/targets/cpu-int4.yaml" in names
    assert "hf2mlflow/configs/datasets/capitals-and-facts.jsonl" in names
    assert "hf2mlflow/sources/data/tiny_corpus.txt" in names
    assert "hf2mlflow/runtime/onnx_chat_pyfunc.py" in names
    assert not [n for n in names if n.startswith(("tests/", "steps/", "benchmarks/", "configs/"))]

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    check = (
        "import hf2mlflow, pathlib\n"
        "from hf2mlflow.config import load_dataset_config, load_target, shipped\n"
        f"assert pathlib.Path(hf2mlflow.__file__).is_relative_to({str(site)!r}), hf2mlflow.__file__\n"
        "assert {'cpu-int4', 'cpu-fp32', 'cuda-fp16'} <= set(shipped('targets')), shipped('targets')\n"
        "assert load_target('cpu-int4').precision == 'int4'\n"
        "assert load_dataset_config('capitals-and-facts').path.is_file()\n"
        "from hf2mlflow.sources.tiny import tiny_model_path\n"
        "print('ok')\n")
    # A directory outside the checkout, and the wheel's files first on the path: the checkout is not found.
    proc = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
