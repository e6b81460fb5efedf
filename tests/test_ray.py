"""The Ray Data engine (``--engine ray``) on local clusters: byte-identical to the local engine, a killed
actor or decode worker, a killed driver resumed, two nodes, the CPU-reservation deadlock, no GPU; and
``--shard auto`` (no Ray)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from ovlabel import InputError
from ovlabel.cli import main
from ovlabel.pipeline.engines.ray import RayOptions, parse_actors, size_actors
from ovlabel.pipeline.run import shard_from_environment
from test_pipeline import BASE, REAL, label, scenes

ray = pytest.importorskip("ray", reason="the ray extra is part of the README's install")

OUTPUTS = ("predictions.json", "dataset.json")


@pytest.fixture(scope="module")
def cluster():
    """A local 2-CPU cluster that the in-process runs join (as ``ray.init`` before ``ovlabel``)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _threads():
    """The local references run with as many torch threads as the actors (``--threads``): torch's CPU
    kernels sum in an order that depends on the thread count, so only equal counts give equal bytes."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


LOCAL2 = ["--threads", "2"]  # the default actor of a 2-CPU cluster runs 2 threads


def _same_outputs(a: Path, b: Path, extra_dirs=()) -> None:
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for sub in extra_dirs:
        fa, fb = ([str(p.relative_to(d / sub)) for p in sorted((d / sub).rglob("*")) if p.is_file()] for d in (a, b))
        assert fa == fb and fa, sub
        for name in fa:
            assert (a / sub / name).read_bytes() == (b / sub / name).read_bytes(), f"{sub}/{name}"


def _records(out: Path) -> list[dict]:
    path = out / "records" / "records.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_same_files_as_the_local_engine(cluster, tmp_path, capsys):
    src = scenes(tmp_path / "in", 9)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    common = [*BASE, "-q", "a", "-q", "b", "--batch-size", "2", "--save-heatmaps", "--overlays"]
    label([str(src), *common, *LOCAL2, "--out", str(tmp_path / "local")], capsys)
    label([str(src), *common, "--out", str(tmp_path / "ray"), "--engine", "ray"], capsys)
    _same_outputs(tmp_path / "local", tmp_path / "ray", ("heatmaps", "overlays"))
    run = yaml.safe_load((tmp_path / "ray" / "run.yaml").read_text())
    assert run["counts"]["failed"] == 1 and run["counts"]["labelled"] == 9 and len(run["counts"]["ray_nodes"]) == 1
    assert [f["file"] for f in run["failures"]] == ["broken.png"]
    if REAL.is_dir():  # real files: EXIF, alpha, misleading extensions
        common = [*BASE, "-q", "cat", "-q", "dog", "--batch-size", "3"]
        label([str(REAL), *common, *LOCAL2, "--out", str(tmp_path / "real-local")], capsys)
        label([str(REAL), *common, "--out", str(tmp_path / "real-ray"), "--engine", "ray"], capsys)
        _same_outputs(tmp_path / "real-local", tmp_path / "real-ray")


def test_coco_gt_tiling_shifts_and_formats_behave_as_locally(cluster, tmp_path, capsys):
    """The options the actors apply themselves: COCO ground truth (ids, sizes), tiles, shifts, dataset formats."""
    from PIL import Image

    src = scenes(tmp_path / "imgs", 4)
    images = []
    for i, p in enumerate(sorted(src.iterdir())):
        w, h = Image.open(p).size
        images.append({"id": 100 + 3 * i, "file_name": p.name, "width": w, "height": h})
    gt = {"images": images, "categories": [{"id": 18, "name": "dog"}, {"id": 90, "name": "kite"}], "annotations": []}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    common = ["--coco-gt", str(tmp_path / "gt.json"), "--images-dir", str(src), *BASE, "--batch-size", "2",
              "--set", "preprocess.size=32", "--set", "preprocess.tile.enabled=true", "--set", "explainer.shifts=2",
              "--format", "masks-instance", "--format", "yolo-seg"]
    label([*common, *LOCAL2, "--out", str(tmp_path / "local")], capsys)
    label([*common, "--out", str(tmp_path / "ray"), "--engine", "ray"], capsys)
    _same_outputs(tmp_path / "local", tmp_path / "ray", ("masks-instance",))
    ids = sorted(i["id"] for i in json.loads((tmp_path / "ray" / "dataset.json").read_text())["images"])
    assert ids == [100, 103, 106, 109]
    assert (tmp_path / "ray" / "yolo-seg" / "data.yaml").exists()


def test_decode_workers_do_not_import_torch(cluster, tmp_path):
    import pickle

    import ray.data

    from ovlabel.pipeline.engines.ray import decode_batch
    from ovlabel.pipeline.images import ImageItem

    src = scenes(tmp_path / "in", 2)
    items = [ImageItem(i, p, p.name) for i, p in enumerate(sorted(src.iterdir()))]
    row = {"batch": 0, "items": pickle.dumps(items), "max_pixels": 10**8, "max_aspect_ratio": None}

    def after(r):  # fused with decode_batch: runs in the same worker, right after it
        decoded = pickle.loads(r["decoded"])
        return {"torch": "torch" in sys.modules, "shapes": [d.image.shape for d in decoded]}

    out = ray.data.from_items([row]).map(decode_batch, num_cpus=0).map(after, num_cpus=0).take_all()
    assert out[0]["torch"] is False
    assert len(out[0]["shapes"]) == 2


def _ray_workers(title: str) -> list[int]:
    """PIDs of this machine's processes whose title (Ray sets ``ray::<what it runs>``) contains ``title``."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith("ray::") and title in cmd:
                pids.append(int(d.name))
    return pids


@pytest.mark.parametrize("victim", ["Labeller", "decode_batch"])
def test_killed_worker_run_completes_identically(cluster, tmp_path, capsys, victim):
    if victim == "Labeller":
        src = scenes(tmp_path / "in", 30)
        after = 3  # records before the kill
    else:  # photos large enough that decoding takes a while: a decode task is caught while it runs
        import numpy as np
        from PIL import Image

        src = tmp_path / "in"
        src.mkdir()
        rng = np.random.default_rng(1)
        for i in range(30):
            Image.fromarray((rng.random((1200, 1600, 3)) * 255).astype(np.uint8)).save(src / f"p{i:02d}.jpg",
                                                                                        quality=95)
        after = 0
    common = [str(src), *BASE, "-q", "a", "-q", "b", "--batch-size", "1"]
    label([*common, *LOCAL2, "--out", str(tmp_path / "local")], capsys)
    out = tmp_path / "ray"
    result = {}
    t = threading.Thread(target=lambda: result.update(code=main(["label", *common, "--out", str(out),
                                                                 "--engine", "ray"])))
    t.start()
    killed = []
    deadline = time.time() + 300
    while t.is_alive() and time.time() < deadline and not killed:
        if len(_records(out)) >= after:
            for pid in _ray_workers(victim):
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, len(_records(out))))
        time.sleep(0.005)
    t.join(600)
    assert killed, f"no {victim} worker was found while the run was going on"
    assert killed[0][1] < 30, "the worker must be killed mid-run"
    assert result.get("code") == 0
    _same_outputs(tmp_path / "local", out)


def _driver(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ovlabel.cli", "label", *args], stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_killed_driver_resumes_without_redoing_batches(cluster, tmp_path, capsys, caplog):
    src = scenes(tmp_path / "in", 24)
    common = [str(src), *BASE, "-q", "a", "-q", "b", "--batch-size", "2", "--save-heatmaps"]
    label([*common, *LOCAL2, "--out", str(tmp_path / "local")], capsys)
    out = tmp_path / "ray"
    proc = _driver([*common, "--out", str(out), "--engine", "ray"], tmp_path / "driver.log")
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and len(_records(out)) < 6:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local cluster it started: a crashed machine
    proc.wait()
    done = {r["image"]["id"] for r in _records(out)}
    assert 6 <= len(done) < 24, (len(done), (tmp_path / "driver.log").read_text()[-2000:])
    before = len(_records(out))
    label([*common, "--out", str(out), "--engine", "ray", "--resume"], capsys)
    finished_batches = len(done) // 2  # batches of 2, appended whole
    assert f"resuming: {finished_batches} of 12 batches already have records and are not redone" in caplog.text
    redone = [r["image"]["id"] for r in _records(out)[before:]]
    assert not set(redone) & done and len(redone) == 24 - len(done)
    _same_outputs(tmp_path / "local", out, ("heatmaps",))


def test_work_crosses_nodes_of_a_two_node_cluster(tmp_path, capsys):
    from ray.cluster_utils import Cluster

    src = scenes(tmp_path / "in", 8)
    common = [str(src), *BASE, "-q", "a", "-q", "b", "--batch-size", "2"]
    label([*common, *LOCAL2, "--out", str(tmp_path / "local")], capsys)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        c.add_node(num_cpus=2)
        c.wait_for_nodes()
        head = c.head_node.node_id
        # an actor of 2 CPUs fits only on the second node; decode tasks may run on either
        proc = _driver([*common, "--out", str(tmp_path / "ray"), "--engine", "ray", "--ray-address", c.address,
                        "--cpus-per-actor", "2"], tmp_path / "driver.log")
        assert proc.wait(300) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        c.shutdown()
    run = yaml.safe_load((tmp_path / "ray" / "run.yaml").read_text())
    assert run["counts"]["ray_nodes"] and head not in run["counts"]["ray_nodes"]
    _same_outputs(tmp_path / "local", tmp_path / "ray")


def test_actors_holding_every_cpu_do_not_deadlock(tmp_path, capsys):
    """2 actors of 1 CPU on a 2-CPU cluster: Ray Data would wait forever for a decode task; ovlabel's
    decode tasks need no CPU, so the run finishes."""
    src = scenes(tmp_path / "in", 6)
    common = [str(src), *BASE, "-q", "a", "--batch-size", "1"]
    label([*common, "--threads", "1", "--out", str(tmp_path / "local")], capsys)  # actors of 1 CPU: 1 thread
    proc = _driver([*common, "--out", str(tmp_path / "ray"), "--engine", "ray", "--actors", "2", "--cpus-per-actor",
                    "1"], tmp_path / "driver.log")
    try:
        assert proc.wait(300) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _same_outputs(tmp_path / "local", tmp_path / "ray")


def test_gpu_actors_on_a_cluster_without_gpus_fail_fast(cluster, tmp_path, capsys):
    src = scenes(tmp_path / "in", 2)
    t0 = time.time()
    err = label([str(src), *BASE, "-q", "a", "--out", str(tmp_path / "o"), "--engine", "ray", "--gpus-per-actor", "1"],
                capsys, 2)
    assert time.time() - t0 < 60
    assert "--gpus-per-actor 1: the Ray cluster has 0 GPU(s)" in err
    err = label([str(src), *BASE, "-q", "a", "--out", str(tmp_path / "o2"), "--actors", "2"], capsys, 2)
    assert "need --engine ray" in err


def test_cuda_actors_on_a_cluster_without_gpus_fail_fast(cluster, tmp_path, capsys):
    """--device cuda reserves a GPU per actor, so a cluster without GPUs is refused before any work (not a
    Ray traceback around the model's load error on a worker)."""
    src = scenes(tmp_path / "in", 2)
    t0 = time.time()
    err = label([str(src), *BASE, "-q", "a", "--out", str(tmp_path / "o"), "--engine", "ray", "--device", "cuda"],
                capsys, 2)
    assert time.time() - t0 < 60
    assert "the Ray cluster has 0 GPU(s)" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "records" / "records.jsonl").exists() or \
        not (tmp_path / "o" / "records" / "records.jsonl").read_text()


def test_driver_plans_on_the_cpu_for_gpu_actors(tmp_path, monkeypatch):
    """With model.device cuda, the driver (text embeddings, settings, merge) stays on the CPU, so a head node
    without a GPU can drive GPU actors; the actors get the configuration as given."""
    from ovlabel import Pipeline
    from ovlabel.pipeline.engines import local as local_engine
    from ovlabel.pipeline.engines import ray as ray_engine

    seen = {}

    def fake_execute(planner, plan, options, config=None):
        seen.update(planner=planner.cfg.model.device, actors=config.model.device, loaded=str(planner.model.device))
        return local_engine.execute(planner, plan)  # the batches, locally: what matters here is who planned

    monkeypatch.setattr(ray_engine, "execute", fake_execute)
    pipe = Pipeline.from_config(None, **{"model.name": BASE[1], "model.pretrained": "none", "model.device": "cuda",
                                         "preprocess.size": 32, "run.progress": False, "run.workers": 0})
    summary = pipe.run([str(scenes(tmp_path / "in", 2))], tmp_path / "out", queries=["a"], engine="ray")
    assert seen == {"planner": "cpu", "actors": "cuda", "loaded": "cpu"}
    assert summary["counts"]["labelled"] == 2


def test_actor_sizing():
    node = {"CPU": 2.0}
    assert size_actors(RayOptions(), [node]) == size_actors(RayOptions(actors=(1, 1)), [node])
    s = size_actors(RayOptions(), [node])
    assert (s.min_actors, s.max_actors, s.cpus, s.threads) == (1, 1, 2.0, 2)
    s = size_actors(RayOptions(actors=(1, 4)), [{"CPU": 8.0}, {"CPU": 8.0}])
    assert s.cpus == 4.0 and s.max_actors == 4  # 16 CPUs shared by at most 4 actors
    s = size_actors(RayOptions(gpus_per_actor=1), [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}])
    assert (s.min_actors, s.max_actors, s.cpus, s.gpus) == (3, 3, 1.0, 1.0)
    with pytest.raises(InputError, match="can host 1 actor"):
        size_actors(RayOptions(actors=(2, 2), cpus_per_actor=1.5), [{"CPU": 2.0}])
    with pytest.raises(InputError, match="0 GPU"):
        size_actors(RayOptions(gpus_per_actor=0.5), [{"CPU": 2.0}])
    assert parse_actors("3") == (3, 3) and parse_actors("1:4") == (1, 4)
    for bad in ("0", "4:2", "x", "1:2:3"):
        with pytest.raises(InputError, match="--actors"):
            parse_actors(bad)


def test_shard_auto_from_slurm_and_torchrun(tmp_path, capsys, monkeypatch):
    assert shard_from_environment({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == (3, 4)
    assert shard_from_environment({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4",
                                   "SLURM_ARRAY_TASK_MIN": "2"}) == (3, 4)
    assert shard_from_environment({"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    for env, msg in [({}, "found no scheduler"), ({"RANK": "2", "WORLD_SIZE": "2"}, "not a valid shard"),
                     ({"RANK": "x", "WORLD_SIZE": "2"}, "not integers"),
                     ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_STEP": "2"},
                      "step of 2")]:
        with pytest.raises(InputError, match=msg):
            shard_from_environment(env)
    src = scenes(tmp_path / "in", 5)
    # one image per batch: shards split by image and batch exactly as the single process (identical bytes)
    common = [str(src), *BASE, "-q", "a", "--batch-size", "1"]
    label([*common, "--out", str(tmp_path / "single")], capsys)
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        label([*common, "--out", str(tmp_path / "shards"), "--shard", "auto"], capsys)
    assert main(["merge", str(tmp_path / "shards"), "--out", str(tmp_path / "merged")]) == 0
    for name in OUTPUTS:
        merged, single = (json.loads((tmp_path / d / name).read_text()) for d in ("merged", "single"))
        assert merged == single, name


def test_ray_stays_quiet_and_its_failures_are_ovlabel_errors(cluster, tmp_path, capfd, monkeypatch):
    from ovlabel.pipeline.engines.ray import RayLogLines

    # the core worker's log lines are dropped (and counted); everything else on stderr passes unchanged
    capfd.readouterr()
    with RayLogLines() as hidden:
        os.write(2, b"[2026-12-04 15:23:59,487 E 24507 24507] core_worker.cc:2465: Actor with class name\n")
        os.write(2, b"progress 1/3\r")
        os.write(2, b"warning: keep me\n[not a ray line]\n")
    assert hidden.count == 1 and capfd.readouterr().err == "progress 1/3\rwarning: keep me\n[not a ray line]\n"
    # a real driver that starts its own cluster, as a user runs it: no Ray notice reaches the console
    src = scenes(tmp_path / "in", 3)
    proc = subprocess.run([sys.executable, "-m", "ovlabel.cli", "label", str(src), *BASE, "-q", "a", "--out",
                           str(tmp_path / "out"), "--engine", "ray"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for noise in ("core_worker", "Progress bars disabled", "Token authentication", "concurrent tasks", "WARNING"):
        assert noise not in proc.stderr, proc.stderr
    # Ray's own failures come out as one ovlabel error line, with what to do
    def lost(*args, **kwargs):
        raise ray.exceptions.RaySystemError("the node running the actors was lost")

    monkeypatch.setattr(ray.data, "from_items", lost)
    capfd.readouterr()
    assert main(["label", str(src), *BASE, "-q", "a", "--out", str(tmp_path / "lost"), "--engine", "ray"]) == 2
    err = capfd.readouterr().err
    assert "error: Ray failed: RaySystemError" in err and "rerun with --resume" in err
