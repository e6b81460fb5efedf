"""Shared helpers for the benchmark scripts: model building, timing, one subprocess per measurement.

Each measurement runs in a fresh Python process so that its peak RSS (whole process, model included) is
its own; each process also times the plain ``encode_image`` forward, so ratios are measured within one
process on the same (shared, noisy) machine.
"""

from __future__ import annotations

import json
import logging
import resource
import statistics
import subprocess
import sys
import time
import warnings


def build_model(name: str, size: int):
    import open_clip
    import torch

    logging.getLogger().setLevel(logging.ERROR)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(name, pretrained=None, force_image_size=size)
    return model.eval()


def timeit(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_isolated(script: str, spec: dict) -> dict:
    """Run ``script --worker SPEC`` in a fresh interpreter and return the JSON it prints last."""
    res = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"worker failed for {spec}:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def in_folder(out: str | None, prefix: str, fn) -> None:
    """``fn(folder)`` in ``out`` (kept), or in a temporary folder removed afterwards."""
    import tempfile
    from pathlib import Path

    if out:
        fn(Path(out))
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        fn(Path(tmp))
