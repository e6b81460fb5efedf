"""Figures and a Markdown report of a labelled, evaluated run (used by ``ovlabel demo``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from ..common.files import atomic_write


def overlay_grid(paths: list[Path], out: Path, columns: int = 4, width: int = 1200) -> Path:
    """Tile overlay pictures into one PNG."""
    images = [Image.open(p).convert("RGB") for p in paths]
    if not images:
        raise ValueError("no overlays to show")
    cell_w = width // columns
    cells = [im.resize((cell_w, max(1, round(im.height * cell_w / im.width)))) for im in images]
    rows = math.ceil(len(cells) / columns)
    row_h = [max(c.height for c in cells[r * columns : (r + 1) * columns]) for r in range(rows)]
    grid = Image.new("RGB", (cell_w * columns, sum(row_h)), (255, 255, 255))
    y = 0
    for r in range(rows):
        for c, cell in enumerate(cells[r * columns : (r + 1) * columns]):
            grid.paste(cell, (c * cell_w, y))
        y += row_h[r]

    with atomic_write(out, "wb") as f:
        grid.save(f, format="PNG")
    return out


def _figure(size: tuple[float, float]):
    """A matplotlib figure drawn by the Agg renderer, without pyplot: the caller's backend is untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out: Path) -> None:
    fig.tight_layout()
    with atomic_write(out, "wb") as f:
        fig.savefig(f, dpi=110, format=Path(out).suffix.lstrip(".") or "png")


def per_class_ap_chart(per_class: dict[str, float], out: Path, title: str) -> Path:
    names = [n for n in per_class if not math.isnan(per_class[n])]
    values = [100 * per_class[n] for n in names]
    fig = _figure((max(6, 0.28 * len(names)), 3.6))
    ax = fig.subplots()
    ax.bar(range(len(names)), values, color="#3b7dd8")
    ax.set_xticks(range(len(names)), names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("AP (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    _save(fig, out)
    return out


def pr_curves(precision: dict[str, np.ndarray], out: Path, title: str) -> Path:
    """``precision``: name → precision at the 101 COCO recall points (−1 where undefined)."""
    recall = np.linspace(0, 1, 101)
    fig = _figure((4.6, 3.6))
    ax = fig.subplots()
    for name, p in precision.items():
        p = np.where(p < 0, np.nan, p)
        ax.plot(recall, p, label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=7)
    _save(fig, out)
    return out


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
