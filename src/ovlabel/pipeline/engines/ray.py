"""The Ray Data engine: ``ovlabel label --engine ray`` (``Pipeline.run(..., engine="ray")``).

The driver plans the run exactly as the local engine does (inputs, ids, manifest, the batches without
records) and finishes it the same way (``run.yaml``, the merge into the COCO files). In between, Ray Data
streams the batches still to do through two stages:

* **decode** — Ray tasks read and decode one ovlabel batch each with ovlabel's own decoder
  (:func:`ovlabel.pipeline.images.decode_item`: by content, EXIF, alpha, 16-bit, size limits). This
  module and the decoder do not import torch, so these workers stay small and start fast;
* **label** — a pool of actors (:class:`Labeller`), each loading the model and encoding the queries
  once, explains and post-processes a decoded batch (:meth:`Pipeline.label_batch`), writes its heatmaps
  and overlays into the output folder (shared storage on a cluster; atomic writes, synced before the
  records are returned) and returns the batch's records.

The driver appends the records with ovlabel's record writer as they arrive (in any order: the merge is
order-free), so ``--resume`` keeps its meaning: a killed driver resumes from the batches with records.
One row of the Ray dataset is one ovlabel batch, so the labels equal the local engine's byte for byte.
Ray restarts lost actors and retries lost tasks (Ray Data's defaults); a batch that arrives twice is
appended twice and merged once (the merge keeps an image's last record).

Resources: decode tasks request no CPU, so they can always be scheduled, even when the actors hold every
CPU of the cluster (Ray Data otherwise waits forever for a read task that cannot start); the actors
request ``cpus_per_actor`` (default: the cluster's CPUs shared among them) and ``gpus_per_actor``, and a
cluster that cannot host the minimum number of actors is refused before any work.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...common.files import fsync_dir
from ...config import load_config
from ...errors import EngineError, InputError, OutputError, OvlabelError
from ..images import decode_item
from ..manifest import digest
from .sink import Counts, RecordSink

log = logging.getLogger(__name__)

DECODE_CPUS = 0  # decode tasks never wait for a CPU that the actors hold


@dataclass(frozen=True)
class RayOptions:
    """How the Ray engine places its work (see the module docstring)."""

    address: str | None = None  # None: a local cluster sized to this machine; else join that cluster
    actors: tuple[int, int] | None = None  # (min, max) actors; None: one per GPU, else one per 4 CPUs
    gpus_per_actor: float = 0.0
    cpus_per_actor: float | None = None  # None: the cluster's CPUs shared among the actors (1 with GPUs)
    decode_concurrency: int | None = None  # decode tasks at once; None: 2 per actor

    def __post_init__(self) -> None:
        if self.actors is not None:
            lo, hi = self.actors
            if not 1 <= lo <= hi:
                raise InputError(f"--actors must be N or MIN:MAX with 1 <= MIN <= MAX, got {lo}:{hi}")
        if self.gpus_per_actor < 0:
            raise InputError(f"--gpus-per-actor must be >= 0, got {self.gpus_per_actor}")
        if self.cpus_per_actor is not None and self.cpus_per_actor <= 0:
            raise InputError(f"--cpus-per-actor must be > 0, got {self.cpus_per_actor}")


def parse_actors(text: str) -> tuple[int, int]:
    """``"N"`` → ``(N, N)``; ``"MIN:MAX"`` → ``(MIN, MAX)``."""
    try:
        parts = [int(p) for p in str(text).split(":")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise InputError(f"--actors must be N or MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return parts[0], parts[1]


@dataclass(frozen=True)
class Sizing:
    min_actors: int
    max_actors: int
    cpus: float
    gpus: float
    threads: int  # CPU threads of each actor's torch


def size_actors(options: RayOptions, nodes: list[dict]) -> Sizing:
    """The actors' resource requests on a cluster whose alive nodes have the resources ``nodes`` (Ray's
    ``ray.nodes()[i]["Resources"]``). Refuses (``InputError``) what the cluster cannot host."""
    cpu = sum(n.get("CPU", 0.0) for n in nodes)
    gpu = sum(n.get("GPU", 0.0) for n in nodes)
    g = float(options.gpus_per_actor)
    if g > 0 and gpu < g:
        raise InputError(f"--gpus-per-actor {g:g}: the Ray cluster has {gpu:g} GPU(s) on {len(nodes)} node(s), so "
                         "not even one actor can be placed; use --gpus-per-actor 0 for CPU actors, or a cluster "
                         "with GPUs")
    if options.actors is not None:
        lo, hi = options.actors
    elif g > 0:
        lo = hi = max(1, int(gpu // g))
    else:
        lo = hi = max(1, int(cpu // 4))
    if options.cpus_per_actor is not None:
        c = float(options.cpus_per_actor)
    elif g > 0:
        c = 1.0
    else:  # the cluster's CPUs shared among the actors: at least one CPU each
        c = cpu / hi
        if c < 1:
            raise InputError(f"--actors {lo}:{hi} on a Ray cluster of {cpu:g} CPU(s): {hi} actor(s) would get "
                             f"{c:.2g} CPU each; a model replica needs at least 1 — ask for at most {int(cpu)} "
                             "actor(s), or set --cpus-per-actor to share CPUs deliberately")
    fits = sum(int(min(n.get("CPU", 0.0) // c if c > 0 else hi,
                       n.get("GPU", 0.0) // g if g > 0 else hi)) for n in nodes)
    if fits < hi:
        raise InputError(f"the Ray cluster ({cpu:g} CPU, {gpu:g} GPU on {len(nodes)} node(s)) can host {fits} "
                         f"actor(s) of {c:g} CPU and {g:g} GPU, but --actors asks for "
                         f"{'up to ' if lo < hi else ''}{hi}; ask for fewer actors or smaller ones "
                         "(--cpus-per-actor, --gpus-per-actor)")
    return Sizing(lo, hi, c, g, max(1, round(c)))


def decode_batch(row: dict[str, Any]) -> dict[str, Any]:
    """Ray task: decode one ovlabel batch (``items``: pickled ``ImageItem`` list) with ovlabel's decoder.
    A bad image becomes a ``DecodedImage`` with its error, as in the local engine."""

    items = pickle.loads(row["items"])
    decoded = [decode_item(it, int(row["max_pixels"]), row["max_aspect_ratio"]) for it in items]
    return {"batch": row["batch"], "decoded": pickle.dumps(decoded, protocol=pickle.HIGHEST_PROTOCOL)}


class Labeller:
    """Ray actor: one model replica. Built once (model loaded, queries encoded, the run's settings
    checked against the driver's manifest); called once per decoded batch. Its arguments travel in the
    class (see :func:`labeller_for`): an actor that Ray restarts needs nothing from the object store."""

    args: dict = {}

    def __init__(self) -> None:
        self._setup(**self.args)

    def _setup(self, pipeline: type, config: dict, out_dir: str, categories: bytes, settings_sha256: str,
               threads: int) -> None:
        import cv2
        import torch

        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
        self.pipe = pipeline(load_config(config, model_preset=False))
        self.categories = pickle.loads(categories)
        qs, _, _ = self.pipe.queries(None, self.categories)
        mine = digest(self.pipe.settings(qs))
        if mine != settings_sha256:
            raise InputError("this Ray worker's model or settings differ from the driver's (settings sha256 "
                             f"{mine[:12]} vs {settings_sha256[:12]}): every node must see the same weights and "
                             "ovlabel version")
        self.out_dir = Path(out_dir)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        import ray

        decoded = pickle.loads(row["decoded"])
        self.pipe.stats = {}
        records = self.pipe.label_batch(decoded, self.out_dir, categories=self.categories)
        for sub in self.pipe.output_dirs(self.out_dir):  # outputs durable before their records
            fsync_dir(sub)
        return {"batch": row["batch"], "records": pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL),
                "stats": pickle.dumps(dict(self.pipe.stats)), "node": ray.get_runtime_context().get_node_id()}


def labeller_for(**args: Any) -> type:
    """A :class:`Labeller` subclass that carries ``args`` (pickled with the class by Ray)."""
    return type("Labeller", (Labeller,), {"args": args, "__module__": __name__})


def _connect_check() -> None:
    """Refuse ``--engine ray`` without Ray installed."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise InputError("--engine ray needs Ray: pip install 'ovlabel[ray]'")


def _connect(options: RayOptions) -> bool:
    """Join ``options.address`` or start a local cluster (unless this process is already connected).
    Returns whether this call connected (and so must disconnect)."""
    _connect_check()
    import ray

    if ray.is_initialized():
        return False
    # Ray's own notices stay off the console (token authentication, ...): ovlabel reports what matters,
    # and Ray's errors as its own
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR,
             "configure_logging": True}
    try:
        if options.address:
            _probe(options.address)
            ray.init(address=options.address, **quiet)
        else:
            ray.init(num_cpus=os.cpu_count() or 1, **quiet)
    except ConnectionError as e:
        raise InputError(f"cannot join the Ray cluster at {options.address!r}: {e}") from None
    return True


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds when nothing answers at ``address`` (``host:port`` or ``ray://host:port``): Ray
    itself retries a dead address for minutes. ``auto`` and other forms are left to Ray."""
    import socket

    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise InputError(f"cannot join the Ray cluster at {address!r}: nothing answers there ({reason}); start it "
                         "(ray start --head) or check --ray-address") from None


def _data_context() -> None:
    import warnings

    import ray.data

    # Ray Data's own deprecation notices about settings ovlabel does not use
    warnings.filterwarnings("ignore", message=r".*(deprecated|Deprecated).*", module=r"ray(\.|$)")
    warnings.filterwarnings("ignore", message=r"`\w+` is deprecated")
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")  # Ray Data's one notice that its bars are off: ovlabel has its own
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows one bar of its own
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def before_plan(pipe: Any, options: RayOptions | None) -> tuple[Any, RayOptions]:
    """Checks before any work, and the pipeline that plans: Ray must be installed; a CUDA model reserves a
    GPU per actor (so that a cluster without GPUs is refused at once, not by a worker failing to load the
    model); and with ``model.device`` cuda the driver plans and merges on the CPU, so that a head node
    without a GPU can drive GPU actors (the actors get the configuration as given)."""
    import dataclasses

    options = options if options is not None else RayOptions()
    if str(pipe.cfg.model.device).startswith("cuda") and not options.gpus_per_actor:
        options = dataclasses.replace(options, gpus_per_actor=1.0)
        log.info("--device %s with --engine ray: one GPU per actor (--gpus-per-actor 1)", pipe.cfg.model.device)
    _connect_check()
    if pipe.has_model_loaded or not str(pipe.cfg.model.device).startswith("cuda"):
        return pipe, options
    cfg = pipe.cfg.model_copy(deep=True)
    cfg.model.device = "cpu"
    return type(pipe)(cfg), options


def execute(pipe: Any, plan: Any, options: RayOptions | None = None, config: Any = None) -> dict:
    """Label ``plan.todo`` on Ray and append the records (the counterpart of the local engine).
    ``config``: the actors' configuration (default ``pipe.cfg``; the driver may plan on the CPU while the
    actors use a GPU)."""

    options = options if options is not None else RayOptions()
    done_batches = len(plan.batches) - len(plan.todo)
    if done_batches:
        log.warning("resuming: %d of %d batches already have records and are not redone; labelling %d",
                    done_batches, len(plan.batches), len(plan.todo))
    nodes_used: set[str] = set()
    counts = Counts.of(plan)
    hidden = RayLogLines()
    with hidden:
        try:
            return _execute(pipe, plan, options, config, nodes_used, counts)
        finally:
            if hidden.count:
                log.info("Ray: %d log line(s) of its core worker hidden (Ray's logs: /tmp/ray/session_latest/logs)",
                         hidden.count)


def _execute(pipe: Any, plan: Any, options: RayOptions, config: Any, nodes_used: set[str], counts: Counts) -> dict:
    connected = _connect(options)
    try:
        import ray
        import ray.data

        _data_context()
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        sizing = size_actors(options, nodes)
        log.info("Ray: %d node(s); %d-%d actor(s) of %g CPU, %g GPU, %d thread(s)", len(nodes), sizing.min_actors,
                 sizing.max_actors, sizing.cpus, sizing.gpus, sizing.threads)
        cfg = pipe.cfg
        rows = [{"batch": k, "items": pickle.dumps(b), "max_pixels": int(cfg.run.max_pixels),
                 "max_aspect_ratio": cfg.run.max_aspect_ratio} for k, b in enumerate(plan.todo)]
        with RecordSink(plan, progress=cfg.run.progress, desc=" (ray)", log_failures=True) as sink:
            counts = sink.counts
            if rows:
                # never more decode tasks than batches (Ray Data warns of a limit it cannot reach)
                concurrency = min(options.decode_concurrency or 2 * sizing.max_actors, len(rows))
                ds = ray.data.from_items(rows, override_num_blocks=len(rows))
                ds = ds.map(decode_batch, num_cpus=DECODE_CPUS,
                            compute=ray.data.TaskPoolStrategy(size=max(1, concurrency)))
                actor = labeller_for(pipeline=type(pipe), config=(config or cfg).model_dump(exclude={"extends"}),
                                     out_dir=str(plan.out_dir.absolute()),
                                     categories=pickle.dumps(plan.queries.categories),
                                     settings_sha256=digest(plan.manifest["settings"]), threads=sizing.threads)
                ds = ds.map(actor, compute=ray.data.ActorPoolStrategy(min_size=sizing.min_actors,
                                                                       max_size=sizing.max_actors),
                            num_cpus=sizing.cpus, num_gpus=sizing.gpus or None)
                for row in ds.iter_rows():
                    sink.append(pickle.loads(row["records"]))
                    nodes_used.add(row["node"])
                    counts.add_stats(pickle.loads(row["stats"]))
    except OutputError:
        raise
    except Exception as e:
        cause = _root_cause(e)
        if isinstance(cause, OvlabelError) and cause is not e:
            raise type(cause)(f"{cause}\n(raised on a Ray worker; finished batches are kept in {plan.records}: "
                              "rerun with --resume once fixed)") from None
        if type(e).__module__.split(".")[0] == "ray" or type(cause).__module__.split(".")[0] == "ray":
            first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            raise EngineError(f"Ray failed: {type(cause).__name__}: {first}; finished batches are kept in "
                              f"{plan.records}: rerun with --resume") from e
        raise
    finally:
        if connected:
            import ray

            ray.shutdown()
    if rows:
        counts.extra["ray_nodes"] = sorted(nodes_used)  # the nodes whose actors labelled
    return counts.as_dict()


class RayLogLines:
    """Drops the log lines Ray's C++ core worker prints on this process's stderr (``[2026-… E 123 123]
    core_worker.cc:…``) while Ray runs, counting them; everything else written to stderr (Python's own
    messages, the progress bar) passes through unchanged, unbuffered."""

    PREFIX = re.compile(rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] ")

    def __init__(self) -> None:
        self.count = 0
        self._saved: int | None = None

    def __enter__(self) -> RayLogLines:
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
        except (OSError, ValueError):  # no usable fd 2 (an embedding host): nothing to filter
            return self
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self._thread = threading.Thread(target=self._pump, args=(read,), daemon=True, name="ovlabel-ray-stderr")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is None:
            return
        sys.stderr.flush()
        os.dup2(self._saved, 2)  # the pipe's last writer closes: the pump sees the end and writes the rest
        self._thread.join(timeout=5)
        os.close(self._saved)
        self._saved = None

    def _pump(self, read: int) -> None:
        out, buf = self._saved, b""
        try:
            while True:
                chunk = os.read(read, 65536)
                if not chunk:
                    break
                buf += chunk
                buf = self._forward(buf, out, final=False)
            self._forward(buf, out, final=True)
        except OSError:
            pass
        finally:
            os.close(read)

    def _forward(self, buf: bytes, out: int, final: bool) -> bytes:
        """Write what is not a Ray log line; keep a possibly unfinished Ray line for the next chunk."""
        while buf:
            if buf[:1] == b"[":
                end = buf.find(b"\n")
                if end < 0 and not final and len(buf) < 4096:
                    return buf  # wait for the rest of the line
                line, buf = (buf, b"") if end < 0 else (buf[: end + 1], buf[end + 1 :])
                if self.PREFIX.match(line):
                    self.count += 1
                else:
                    os.write(out, line)
                continue
            cut = buf.find(b"\n[")
            part, buf = (buf, b"") if cut < 0 else (buf[: cut + 1], buf[cut + 1 :])
            os.write(out, part)
        return b""


def _root_cause(e: BaseException) -> BaseException:
    """The user's exception behind Ray's wrappers (``RayTaskError(...).cause``, chained errors)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        nxt = getattr(e, "cause", None) or e.__cause__
        if nxt is None or not isinstance(nxt, BaseException):
            break
        e = nxt
    return e
