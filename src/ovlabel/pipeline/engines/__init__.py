"""Execution engines: what labels a run's batches between planning and finishing.

An engine is an object with ``execute(pipe, plan, options, config=None) -> dict`` (the run's counts, see
:class:`~ovlabel.pipeline.engines.sink.Counts`) and, optionally, ``before_plan(pipe, options) -> (planner,
options)`` — checks to make before any work, and the pipeline that plans and finishes the run. It takes
the :class:`~ovlabel.pipeline.runner.Pipeline` as an argument (``pipe.label_batch`` labels decoded images,
``pipe.label_prepared`` prepared ones) and appends the records through
:class:`~ovlabel.pipeline.engines.sink.RecordSink`; it never imports the runner. Built in: ``local``
(this process and its DataLoader workers) and ``ray`` (a Ray cluster). ``config`` is the run's
configuration as given (an engine may plan on another pipeline, e.g. on the CPU, than the one its workers
build). A new engine is one module plus :func:`register_engine`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from ...errors import InputError

# name -> the engine, or the module that is it (imported on first use: Ray is an optional extra)
ENGINES: dict[str, Any] = {"local": ".local", "ray": ".ray"}


def register_engine(name: str, engine: Any) -> Any:
    """Make ``engine`` (an object or module with ``execute``) available as ``Pipeline.run(engine=name)``."""
    if not callable(getattr(engine, "execute", None)):
        raise TypeError(f"an engine needs execute(pipe, plan, options, config=None); {engine!r} has none")
    ENGINES[name] = engine
    return engine


def get_engine(name: str) -> Any:
    """The engine registered as ``name``; an unknown name lists the choices."""
    if name not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(sorted(ENGINES))}, got {name!r}")
    engine = ENGINES[name]
    if isinstance(engine, str):
        engine = ENGINES[name] = import_module(engine, __name__)
    return engine


def list_engines() -> list[str]:
    return sorted(ENGINES)
