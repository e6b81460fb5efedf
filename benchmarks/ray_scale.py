"""Local engine vs Ray (1 and 2 actors) on generated scenes with the shipped model: images/s, Ray's fixed
start-up cost and the peak memory of the whole process tree (driver, Ray's daemons, workers, actors).

    python benchmarks/ray_scale.py                 # 400 and 40 scenes
    python benchmarks/ray_scale.py --images 1000 --small 100

Each configuration runs as a fresh ``ovlabel label`` process twice, on ``--small`` and on ``--images``
scenes: the marginal rate ``(images − small) / (t_images − t_small)`` is the throughput, and
``t_small − small / rate`` the fixed cost (start-up: imports, Ray's cluster, actors, model loading).
The peak memory is the largest sum of the resident sets of the process and all its descendants, sampled
every 0.1 s. Outputs are checked to be byte-identical to the local engine's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            ppid = int(fields[1])
            pages = int((d / "statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
        rss[int(d.name)] = pages * os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [root]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def timed(cmd: list[str], env: dict) -> tuple[float, int]:
    """Wall seconds and peak tree RSS of one command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    stop.set()
    t.join()
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err.decode()[-3000:]}")
    return dt, peak


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--small", type=int, default=40)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of the local engine")
    args = p.parse_args(argv)
    from ovlabel.apps.demo import DEMO_SIZES
    from ovlabel.datasets.shapes import write_coco
    from ovlabel.evaluation.report import markdown_table

    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="ray-scale-") as tmp:
        root = Path(tmp)
        data = {n: write_coco(root / f"data-{n}", n, args.seed, sizes=DEMO_SIZES).parent / "images"
                for n in (args.small, args.images)}
        configs = [("local", ["--threads", str(args.threads)], {"OMP_NUM_THREADS": str(args.threads)}),
                   ("ray, 1 actor", ["--engine", "ray", "--actors", "1"], {}),
                   ("ray, 2 actors", ["--engine", "ray", "--actors", "2"], {})]
        rows = []
        base = [sys.executable, "-m", "ovlabel.cli", "label", "--config", "shapes", "--queries-file", "QUERIES",
                "--no-progress"]
        from ovlabel.datasets.shapes import CLASSES

        (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
        base[base.index("QUERIES")] = str(root / "classes.txt")
        load = os.getloadavg()
        for name, extra, env_extra in configs:
            env = {**os.environ, **env_extra}
            times, peaks = {}, {}
            for n in (args.small, args.images):
                out = root / f"out-{name.replace(' ', '').replace(',', '-')}-{n}"
                times[n], peaks[n] = timed([*base, str(data[n]), "--out", str(out), *extra], env)
            rate = (args.images - args.small) / (times[args.images] - times[args.small])
            fixed = times[args.small] - args.small / rate
            rows.append([name, rate, fixed, times[args.images], peaks[args.images] / 2**20])
            print(f"  {name}: {times[args.small]:.1f} s ({args.small}), {times[args.images]:.1f} s ({args.images})",
                  flush=True)
        # identity: against the local engine with as many torch threads as each actor (torch's CPU kernels
        # sum in an order that depends on the thread count)
        for name, extra, _ in configs[1:]:
            threads = max(1, round(cpus / int(extra[extra.index("--actors") + 1])))
            ref = root / f"out-local-{args.small}" if threads == args.threads else root / f"ref-{threads}"
            if not ref.exists():
                timed([*base, str(data[args.small]), "--out", str(ref), "--threads", str(threads)],
                      {**os.environ, "OMP_NUM_THREADS": str(threads)})
            other = root / f"out-{name.replace(' ', '').replace(',', '-')}-{args.small}"
            for f in ("predictions.json", "dataset.json"):
                if (ref / f).read_bytes() != (other / f).read_bytes():
                    raise SystemExit(f"{name}: {f} differs from the local engine's with {threads} thread(s)")
    print(f"\n{cpus} CPU(s), load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; shipped model, "
          f"{args.images} scenes; outputs byte-identical to the local engine with the actors' thread count")
    print(markdown_table(["engine", "images/s", "fixed cost (s)", f"wall, {args.images} images (s)",
                          "peak RSS of the process tree (MB)"], rows))


if __name__ == "__main__":
    main()
