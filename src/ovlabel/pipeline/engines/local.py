"""The local engine: this process labels, DataLoader workers decode and preprocess."""

from __future__ import annotations

from typing import Any

import torch

from ...common.files import fsync_dir
from ..preprocess import PreparedImages, collate
from .sink import RecordSink


def execute(pipe: Any, plan: Any, options: Any = None, config: Any = None) -> dict:
    """Decode in DataLoader workers, label batch by batch (``pipe.label_prepared``), append the records.
    ``options`` and ``config`` (the run's configuration as given) are those of every engine; this one
    needs neither: ``pipe`` plans and labels."""
    cfg = pipe.cfg
    todo_items = [it for b in plan.todo for it in b]
    loader = torch.utils.data.DataLoader(
        PreparedImages(todo_items, cfg, pipe.patch, pipe.normalization, pipe.keep_image),
        batch_size=cfg.run.batch_size, shuffle=False,
        num_workers=cfg.run.workers if len(todo_items) > 1 else 0, collate_fn=collate, persistent_workers=False)
    qs, text, bg = pipe.queries(None, plan.queries.categories)
    pipe.stats = {}
    with RecordSink(plan, progress=cfg.run.progress) as sink:
        for batch in loader:
            records = pipe.label_prepared(batch, qs, text, bg, plan.out_dir)
            for sub in pipe.output_dirs(plan.out_dir):  # outputs durable before their records
                fsync_dir(sub)
            sink.append(records)
    sink.counts.add_stats(pipe.stats)
    return sink.counts.as_dict()
