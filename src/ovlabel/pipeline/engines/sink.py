"""What every engine does with the records it gets: append them durably, tally them, show progress.

:class:`RecordSink` opens the run's record file (cutting a record torn by an earlier kill), appends each
batch's records as complete lines (fsynced), counts labelled and failed images and detections, drives the
progress bar, and turns a failed write (a full disk) into an error that says the finished batches are
kept and the same command with ``--resume`` continues.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ...errors import OutputError
from ...export.records import RecordWriter

log = logging.getLogger(__name__)


@dataclass
class Counts:
    """A run's tallies, as ``run.yaml`` reports them (:meth:`as_dict`)."""

    images: int  # in this shard
    resumed_skipped: int  # done by an earlier attempt
    labelled: int = 0
    failed: int = 0
    detections: int = 0
    postprocess: dict[str, int] = field(default_factory=dict)  # where candidates went
    extra: dict[str, Any] = field(default_factory=dict)  # engine-specific (e.g. ray_nodes)

    @classmethod
    def of(cls, plan: Any) -> Counts:
        images = sum(len(b) for b in plan.batches)
        return cls(images, images - sum(len(b) for b in plan.todo))

    def add(self, records: list[dict]) -> None:
        for r in records:
            if "error" in r:
                self.failed += 1
            else:
                self.labelled += 1
                self.detections += len(r["results"])

    def add_stats(self, stats: dict[str, int]) -> None:
        for k, v in stats.items():
            self.postprocess[k] = self.postprocess.get(k, 0) + int(v)

    def as_dict(self) -> dict:
        return {"images": self.images, "resumed_skipped": self.resumed_skipped, "labelled": self.labelled,
                "failed": self.failed, "detections": self.detections, "postprocess": dict(self.postprocess),
                **self.extra}


class RecordSink:
    """``with RecordSink(plan, progress=…) as sink: sink.append(records)`` — see the module docstring."""

    def __init__(self, plan: Any, *, progress: bool = True, desc: str = "", log_failures: bool = False) -> None:
        self.plan = plan
        self.counts = Counts.of(plan)
        self.done = 0
        self._progress_on, self._desc, self._log_failures = progress, desc, log_failures
        self._writer: RecordWriter | None = None
        self._bar = None

    def __enter__(self) -> RecordSink:
        from tqdm import tqdm

        self._bar = tqdm(total=sum(len(b) for b in self.plan.todo), unit="img", disable=not self._progress_on,
                         dynamic_ncols=True, desc=f"ovlabel{self.plan.tag}{self._desc}")
        try:
            self._writer = RecordWriter(self.plan.records)
        except BaseException:
            self._bar.close()
            raise
        if self._writer.torn_bytes:
            log.warning("%s ended with a partial record (%d bytes, cut off by an interruption); removed",
                        self.plan.records, self._writer.torn_bytes)
        return self

    def append(self, records: list[dict]) -> None:
        """Append one batch's records (complete lines, fsynced) and count them."""
        self._writer.append(records)
        self.done += len(records)
        self.counts.add(records)
        if self._log_failures:
            for r in records:
                if "error" in r:
                    log.warning("skipped %s: %s", r["image"]["file_name"], r["error"])
        self._bar.update(len(records))
        self._bar.set_postfix(failed=self.counts.failed, dets=self.counts.detections)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if isinstance(exc, OutputError):
            raise OutputError(f"{exc}\n{self.done} image(s) labelled in this attempt are kept in {self.plan.records}; "
                              "once the problem is fixed, rerun the same command with --resume") from None
