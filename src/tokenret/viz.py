"""Pictures of results: ranked lists with positives framed green, negatives red, junk grey."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from tokenret.data.images import ImageLoadError, load_image
from tokenret.evaluate import PROTOCOLS

GREEN, RED, GREY, BLUE = (40, 170, 60), (210, 40, 40), (150, 150, 150), (40, 90, 220)


def _tile(path: Path, cell: int, frame: tuple[int, int, int], border: int, box=None) -> Image.Image:
    tile = Image.new("RGB", (cell, cell), (255, 255, 255))
    try:
        img = load_image(path, max_size=None)
    except ImageLoadError:
        img = Image.new("RGB", (cell, cell), (230, 230, 230))
        box = None
    scale = (cell - 2 * border) / max(img.size)
    small = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    ox, oy = (cell - small.width) // 2, (cell - small.height) // 2
    tile.paste(small, (ox, oy))
    draw = ImageDraw.Draw(tile)
    if box is not None:  # the query region
        x1, y1, x2, y2 = (v * scale for v in box)
        draw.rectangle((ox + x1, oy + y1, ox + x2, oy + y2), outline=(255, 220, 0), width=2)
    draw.rectangle((0, 0, cell - 1, cell - 1), outline=frame, width=border)
    return tile


def label_of(gnd_entry: dict[str, Any], index: int, protocol: str) -> str:
    """'positive', 'junk' or 'negative' for a database index under a protocol."""
    pos_keys, junk_keys = PROTOCOLS[protocol]
    if any(index in gnd_entry.get(k, ()) for k in pos_keys):
        return "positive"
    if any(index in gnd_entry.get(k, ()) for k in junk_keys):
        return "junk"
    return "negative"


def result_grid(
    dataset: Any,
    queries: Sequence[int],
    ranks: Sequence[Sequence[int]],
    protocol: str = "medium",
    top: int = 10,
    cell: int = 160,
    border: int = 6,
) -> Image.Image:
    """One row per query: the query (box in yellow, blue frame), then its top results framed by label.

    Args:
        dataset: a RevisitedDataset (image paths and ground truth).
        queries: query indices to show.
        ranks: per query index, database indices best first (e.g. a report's ``top_ranks``).
    """
    colours = {"positive": GREEN, "negative": RED, "junk": GREY}
    grid = Image.new("RGB", ((top + 1) * cell, len(queries) * cell), (255, 255, 255))
    for row, q in enumerate(queries):
        grid.paste(_tile(dataset.query_path(q), cell, BLUE, border, dataset.query_box(q)), (0, row * cell))
        for col, idx in enumerate(list(ranks[q])[:top], start=1):
            if idx >= len(dataset.imlist):  # an R1M distractor: a negative without a local file here
                tile = Image.new("RGB", (cell, cell), (235, 235, 235))
                ImageDraw.Draw(tile).rectangle((0, 0, cell - 1, cell - 1), outline=RED, width=border)
            else:
                frame = colours[label_of(dataset.gnd[q], int(idx), protocol)]
                tile = _tile(dataset.image_path(int(idx)), cell, frame, border)
            grid.paste(tile, (col * cell, row * cell))
    return grid
