"""The benchmark scripts run end to end (smoke runs) and write their figures."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import pytest

from hf2mlflow import PROJECT_ROOT


def run_quick(script: str, output_dir) -> subprocess.CompletedProcess:
    """python -m benchmarks.SCRIPT --quick --output_dir OUTPUT_DIR, in a store of its own and offline; it must
    succeed."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{script}", "--quick", "--output_dir", str(output_dir)],
                          cwd=PROJECT_ROOT, env=dict(env, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def python_path() -> str:
    """PYTHONPATH for `python -m benchmarks.NAME` run in another folder: the project root first."""
    return os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))


@pytest.mark.slow
def test_batch_infer_throughput_quick(tmp_path):
    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    env["HF_HUB_OFFLINE"] = "1"  # the script makes its own temporary store; the tiny model needs no hub
    proc = subprocess.run([sys.executable, "-m", "benchmarks.batch_infer_throughput", "--quick", "--output", str(out)],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["measurements"]) == {"spark", "loop"}
    for measurement in results["measurements"].values():
        assert measurement["rows"] == 16 and measurement["rows_per_s"] > 0
        assert measurement["completion_tokens"] > 0
    assert "| spark local[2] | 16 |" in proc.stdout and str(out) in proc.stdout


@pytest.mark.slow
def test_convert_memory_quick(tmp_path):
    out = tmp_path / "convert.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.convert_memory", "--quick", "--output", str(out)],
                          cwd=PROJECT_ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["paths"]) == {"standard", "low"} and results["same_greedy_tokens"] is True
    for path in results["paths"].values():
        assert path["peak_rss_bytes"] > 100 * 2**20 and path["seconds_median"] > 0 and path["output_bytes"] > 0
    assert "| standard |" in proc.stdout and "| low |" in proc.stdout and "low / standard: peak" in proc.stdout


@pytest.mark.slow
def test_suite_quick(tmp_path):
    import mlflow

    out, store = tmp_path / "suite", f"sqlite:///{tmp_path}/bench.db"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--quick", "--full-conversion",
                           "--output_dir", str(out)],
                          cwd=PROJECT_ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1", MLFLOW_TRACKING_URI=store),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "suite.json").read_text())
    assert set(results["speed"]) == {"onnx-int4", "onnx-int8", "onnx-fp32", "genai-int4 (bare)", "transformers-fp32"}
    for figures in results["speed"].values():
        assert figures["decode_tps"]["median"] > 0 and figures["ttft_ms"]["median"] > 0
        assert 0 < figures["peak_rss_gib"]["median"] < 8
    assert results["parity"]["onnx-fp32"]["parity_identical_rate"] == 1.0  # fp32 ONNX = PyTorch, greedy
    assert all(s["errors"] == 0 and s["requests_per_s"] > 0 for s in results["served"].values())
    assert [p["prompt_tokens"] for p in results["prompt_lengths"].values()] == sorted(
        p["prompt_tokens"] for p in results["prompt_lengths"].values())
    # --full-conversion: with --quick, tiny-phi3 (2 layers) stands in for the 32-layer model.
    assert list(results["conversion"]) == ["onnx-int4", "onnx-int8", "onnx-fp32", "onnx-int4, 2 layers (0.00 B)"]
    assert results["conversion"]["onnx-int4, 2 layers (0.00 B)"]["peak_rss_gib"] > 0
    assert (out / "suite.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "suite.md").read_text()
    assert "| pyfunc / bare onnxruntime-genai loop, decode |" in table and table in proc.stdout

    (run,) = mlflow.MlflowClient(store).search_runs(
        [mlflow.MlflowClient(store).get_experiment_by_name("benchmarks").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["version.mlflow"] == mlflow.__version__
    assert run.data.metrics["onnx-int4.decode_tps"] == results["speed"]["onnx-int4"]["decode_tps"]["median"]
    assert {a.path for a in mlflow.MlflowClient(store).list_artifacts(run.info.run_id)} == {
        "suite.md", "suite.json", "suite.png"}
    # Section 7, llama.cpp on the trained model: its rows where llama-cpp-python is installed, else one line.
    if importlib.util.find_spec("llama_cpp") is None:
        assert ("[llama.cpp] skipped: llama-cpp-python is not installed: pip install '.[llama]' (compiles llama.cpp "
                "from source") in proc.stdout
        assert "llama-cpp-python is not installed" in results["llama_cpp"]["skipped"]
        assert "llama.cpp (section 7): skipped" in table
    else:
        llama = results["llama_cpp"]["speed"]["llama.cpp Q4_1"]
        assert llama["decode_tps"]["median"] > 0 and llama["ttft_ms"]["64"]["median"] > 0
        assert "| llama.cpp Q4_1 | Q4_1 GGUF as shipped |" in table
        assert run.data.metrics["llama_peer.llama.cpp_Q4_1.decode_tps"] == llama["decode_tps"]["median"]


def _peer_module():
    from benchmarks import llama_cpp_peer

    return llama_cpp_peer


def test_llama_cpp_peer_says_how_to_install(monkeypatch, capsys):
    """Without llama-cpp-python the llama.cpp benchmark stops at once, non-zero, saying how to install it."""
    peer, find_spec = _peer_module(), importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else find_spec(name, *a))
    try:
        peer.main([])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("llama_cpp_peer.main ran without llama-cpp-python")
    assert "llama-cpp-python is not installed: pip install '.[llama]' (compiles llama.cpp from source, about" in (
        capsys.readouterr().err)


@pytest.mark.slow
def test_llama_cpp_peer_smoke(tmp_path):
    """llama.cpp on the shipped Q4_1 GGUF alone, one short round and 3 quality prompts (where it is installed)."""
    import pytest

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (pip install '.[llama]')")
    out = tmp_path / "peer"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.llama_cpp_peer", "--onnx-targets", "",
                           "--llama-quants", "", "--rounds", "1", "--no-warmup", "--busy", "--max-tokens", "32",
                           "--limit", "3", "--output", str(out)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/m.db"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.with_suffix(".json").read_text())
    speed = results["speed"]["llama.cpp Q4_1"]
    # 32 tokens: enough that a busy machine's noise in the one-token request cannot exceed the whole answer.
    assert speed["decode_tps"]["median"] > 0 and speed["new_tokens"] == 32
    assert set(speed["ttft_ms"]) == {"64", "1024"} and speed["prompt_tokens"]["1024"] > 900
    assert results["quality"]["llama.cpp Q4_1"]["n"] == 3
    assert "| llama.cpp Q4_1 | Q4_1 GGUF as shipped |" in out.with_suffix(".md").read_text()


def test_suite_quick_cuda(tmp_path):
    """`--device cuda` benchmarks the cuda targets where a usable GPU is; elsewhere it stops at once, saying what
    is missing, and writes nothing (never the CPU figures under the cuda name)."""
    import onnxruntime_genai as og
    import torch

    out, db = tmp_path / "suite", tmp_path / "bench.db"
    start = time.perf_counter()
    command = [sys.executable, "-m", "benchmarks.suite", "--quick", "--device", "cuda", "--output_dir", str(out)]
    proc = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", MLFLOW_TRACKING_URI=f"sqlite:///{db}"))
    seconds = time.perf_counter() - start
    if not (torch.cuda.is_available() and og.is_cuda_available()):
        assert proc.returncode != 0 and seconds < 60, (proc.returncode, seconds)
        assert "--device cuda needs a usable CUDA GPU" in proc.stderr and "Nothing was built or measured" in proc.stderr
        if not torch.cuda.is_available():
            assert "torch.cuda.is_available() is False" in proc.stderr
        if not og.is_cuda_available():
            assert "onnxruntime-genai has no CUDA execution provider" in proc.stderr
            assert "onnxruntime-genai-cuda" in proc.stderr
        assert "[setup]" not in proc.stdout and not out.exists() and not db.exists()
        return
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "suite-cuda.json").read_text())
    assert results["device"] == "cuda" and results["onnx_targets"] == ["cuda-int4", "cuda-fp16"]
    assert set(results["speed"]) == {"onnx-int4", "onnx-fp16", "genai-int4 (bare)", "transformers-fp16"}
    assert all(figures["decode_tps"]["median"] > 0 for figures in results["speed"].values())
    assert all(s["errors"] == 0 for s in results["served"].values())
    assert "--device cuda" in (out / "suite-cuda.md").read_text() and not (out / "suite.json").exists()


@pytest.mark.slow
def test_quantization_sweep_quick(tmp_path):
    out = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    env.update(HF_HUB_OFFLINE="1", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", PYTHONPATH=python_path())
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quantization_sweep", "--quick",
                           "--output", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["cpu-fp32", "cpu-int8", "int4 default", "int4 rtn", "transformers fp32"]
    assert rows[0]["same greedy answer as PyTorch"] == 1.0  # fp32 ONNX: PyTorch's answers
    assert all(r["decode tok/s"] > 0 and r["size MiB"] > 0 for r in rows)
    assert "| int4 rtn | algo_config=rtn |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_batching_quick(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=python_path())
    proc = subprocess.run([sys.executable, "-m", "benchmarks.batching", "--quick",
                           "--output_dir", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    variants = json.loads((tmp_path / "batching.json").read_text())["variants"]
    assert list(variants) == ["off", "batched"]
    assert variants["off"]["largest_batch"] == 1 and variants["batched"]["largest_batch"] > 1
    for v in variants.values():
        assert all(s["errors"] == 0 for s in v["served"].values()) and v["long"]["errors"] == 0
        assert v["batch_infer_rows_per_s"] > 0
    # A DataFrame's answers are those of its rows one by one.
    assert variants["batched"]["dataframe"]["same_answers"] == variants["batched"]["dataframe"]["rows"]
    assert "| batched | 8 |" in (tmp_path / "batching.md").read_text()


def test_update_docs_rewrites_only_its_block(tmp_path):
    """`--update-docs` (suite, batching, quantization_sweep) rewrites its block of docs/performance.md, nothing else."""
    from benchmarks.docs_blocks import PERFORMANCE_DOC, SECTIONS, update_docs

    assert PERFORMANCE_DOC == PROJECT_ROOT / "docs" / "performance.md"
    original = PERFORMANCE_DOC.read_text()
    doc = tmp_path / "performance.md"
    doc.write_text(original)
    for section in SECTIONS:
        update_docs(f"| new {section} table |\n", section, doc)
    text = doc.read_text()
    for section in SECTIONS:
        assert f"<!-- {section}:begin -->\n| new {section} table |\n<!-- {section}:end -->" in text

    def prose(markdown):
        return re.sub(r"<!-- (\w+):begin -->.*?<!-- \1:end -->", "", markdown, flags=re.S)

    assert prose(text) == prose(original)  # the hand-written text around the blocks is unchanged
    doc.write_text("no blocks")
    try:
        update_docs("x\n", "batching", doc)
    except SystemExit as exc:
        assert "has no <!-- batching:begin -->" in str(exc)
    else:
        raise AssertionError("update_docs wrote a file without the block")


def test_cuda_check_refuses_without_a_gpu(tmp_path):
    """benchmarks/cuda_check.py runs every cuda path on a GPU (a GPU machine runs it: see its docstring); where
    the GPU or a CUDA build is missing it stops at once with exit 2, saying what is missing, and writes nothing."""
    from hf2mlflow.cuda import cuda_problems

    problems = cuda_problems()
    if not problems:
        pytest.skip("a GPU and the CUDA builds are here: run python -m benchmarks.cuda_check itself (minutes), not "
                    "this test")
    out = tmp_path / "out"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cuda_check", "--out", str(out)], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and time.perf_counter() - start < 60
    assert "the CUDA check needs an NVIDIA GPU" in proc.stderr
    assert "Nothing was run and nothing was written" in proc.stderr
    assert all(p in proc.stderr for p in problems) and "onnxruntime-genai-cuda==" in proc.stderr
    assert "benchmarks/cuda_check_pack.py" in proc.stderr and not out.exists() and proc.stdout == ""


def test_cuda_check_sh_stages_each_carried_part_then_runs_the_check(tmp_path):
    """benchmarks/cuda_check.sh, as each call on a GPU machine runs it: rc 3 while parts are to come; once the
    last is in, it unpacks them and runs python -m benchmarks.cuda_check (here it refuses: no GPU)."""
    import io
    import tarfile

    from hf2mlflow.cuda import cuda_problems

    if not cuda_problems():
        pytest.skip("a GPU is here: the check would run in full")
    from benchmarks.cuda_check_pack import write_parts

    archive = tmp_path / "pack.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        data = b"# a package from the pack\n" + bytes(4000)
        info = tarfile.TarInfo("site/packed_marker.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    parts = tmp_path / "pack"
    write_parts(archive, parts, archive.stat().st_size // 2 + 1, ["packed_marker-1.0-py3-none-any.whl"], "")
    stage, out = tmp_path / "stage", tmp_path / "out"
    env = dict(os.environ, CUDA_CHECK_STAGE=str(stage), OUT=str(out))
    results = []
    for k in (1, 2):
        carried = tmp_path / f"call-{k}"
        (carried / f"part-{k}").mkdir(parents=True)
        for f in (parts / f"part-{k}").iterdir():
            (carried / f"part-{k}" / f.name).write_bytes(f.read_bytes())
        results.append(subprocess.run(["bash", "benchmarks/cuda_check.sh"], cwd=PROJECT_ROOT, capture_output=True,
                                      text=True, timeout=120, env=dict(env, CUDA_CHECK_PARTS=str(carried))))
    first, last = results
    assert first.returncode == 3 and "1 of 2 chunks staged" in first.stdout
    assert "still to come: chunk-02" in first.stdout
    assert "unpacked 1 packages" in last.stdout and (stage / "site" / "packed_marker.py").is_file()
    assert last.returncode == 2 and "the CUDA check needs an NVIDIA GPU" in last.stderr and not out.exists()


@pytest.mark.slow
def test_served_speed_quick(tmp_path):
    """The logged pyfunc beside the bare loop and the transformers flavor on the same model, and staggered clients
    behind `mlflow models serve` whose greedy answers are those of the same requests alone, in one table."""
    proc = run_quick("served_speed", tmp_path)
    results = json.loads((tmp_path / "served_speed.json").read_text())
    (lone,) = results["lone"].values()
    assert list(lone) == ["bare onnxruntime-genai loop", "pyfunc, after (continuous batching)",
                          "transformers flavor, float32"]
    assert all(figures["decode_tps"]["median"] > 0 for figures in lone.values())
    for load in results["load"]["pyfunc, after (continuous batching)"].values():
        if isinstance(load, dict):
            assert load["same_as_alone"] == load["clients"] == 3 and load["new_tokens"] > 0
    table = (tmp_path / "served_speed.md").read_text()
    assert "| bare onnxruntime-genai loop |" in table and "| 1.00x |" in table and table in proc.stdout


@pytest.mark.slow
def test_quality_kld_quick(tmp_path):
    """The teacher-forced table: fp32 ONNX reads the held-out text as PyTorch float32 does; int4 departs."""
    run_quick("quality_kld", tmp_path)
    results = json.loads((tmp_path / "quality_kld.json").read_text())
    rows = results["rows"]
    assert list(rows) == ["PyTorch float32 (reference)", "ours cpu-fp32", "ours cpu-int8", "ours cpu-int4"]
    assert results["positions"] > 1000 and rows["ours cpu-fp32"]["mean_kld"] < 1e-6
    assert rows["ours cpu-fp32"]["top1_agreement"] >= 0.99
    assert rows["ours cpu-int4"]["mean_kld"] > rows["ours cpu-int8"]["mean_kld"] > rows["ours cpu-fp32"]["mean_kld"]
    assert "| ours cpu-int4 |" in (tmp_path / "quality_kld.md").read_text()

