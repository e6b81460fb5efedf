"""benchmarks/gpu_check.py's dry run (``--device cpu --tiny``): every step of the GPU check runs here, so that
only what needs CUDA is untested without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--repeats", "1", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["tests", "precision", "throughput", "onnx", "ray"]
    assert all(s["ok"] for s in steps.values()), {n: s.get("error") for n, s in steps.items()}
    assert "2/" in steps["tests"]["summary"]  # the gpu-marked tests are selected
    for name in ("tiny float16", "tiny bfloat16"):
        assert steps["precision"][name]["finite"] and steps["precision"][name]["max_abs"] < 0.1
    rows = [row for name, row in steps["throughput"].items() if name.startswith("batch")]
    assert len(rows) == 2 and all(v["ratio_to_forward"] > 0 for row in rows for k, v in row.items()
                                  if k.startswith("K="))
    assert steps["onnx"]["maps_max_abs"] <= 1e-4 and steps["onnx"]["providers"] == ["CPUExecutionProvider"]
    assert steps["onnx"]["cuda_provider"] is False  # the report says the CUDA provider did not run
    assert steps["ray"]["same_files_as_local"]
    assert "## ray: ok" in (tmp_path / "gpu_check.md").read_text()
    # without CUDA, the real check says how to dry-run instead of failing later
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "--device cpu --tiny" in r.stderr
