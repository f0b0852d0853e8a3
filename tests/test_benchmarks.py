"""The benchmark scripts run end to end (smoke runs) and write their figures."""

import json
import os
import subprocess
import sys

from hf2mlflow import PROJECT_ROOT


def test_batch_infer_throughput_quick(tmp_path):
    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    env["HF_HUB_OFFLINE"] = "1"  # the script makes its own temporary store; the tiny model needs no hub
    proc = subprocess.run([sys.executable, "benchmarks/batch_infer_throughput.py", "--quick", "--output", str(out)],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["measurements"]) == {"spark", "loop"}
    for measurement in results["measurements"].values():
        assert measurement["rows"] == 16 and measurement["rows_per_s"] > 0
        assert measurement["completion_tokens"] > 0
    assert "| spark local[2] | 16 |" in proc.stdout and str(out) in proc.stdout


def test_convert_memory_quick(tmp_path):
    out = tmp_path / "convert.json"
    proc = subprocess.run([sys.executable, "benchmarks/convert_memory.py", "--quick", "--output", str(out)],
                          cwd=PROJECT_ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["paths"]) == {"standard", "low"} and results["same_greedy_tokens"] is True
    for path in results["paths"].values():
        assert path["peak_rss_bytes"] > 100 * 2**20 and path["seconds_median"] > 0 and path["output_bytes"] > 0
    assert "| standard |" in proc.stdout and "| low |" in proc.stdout and "low / standard: peak" in proc.stdout
