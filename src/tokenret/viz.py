"""Pictures of results: ranked lists with positives framed green, negatives red, junk grey."""

from __future__ import annotations

import math
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


def attention_overlays(
    model: Any, image_path: str | Path, max_size: int = 512, box=None
) -> list[Image.Image]:
    """Where each token looks: the query with each of the L tokenizer attention maps laid over it.

    Only Token models have token attention; others give an empty list.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from tokenret.data.images import to_tensor

    if not hasattr(model, "attention_maps"):
        return []
    img = load_image(image_path, max_size=max_size, box=box)
    device = next(model.parameters()).device
    with torch.inference_mode():
        maps = model.attention_maps(to_tensor(img)[None].to(device))[0].float()  # (L, h, w)
        maps = F.interpolate(maps[None], size=(img.height, img.width), mode="bilinear", align_corners=False)[
            0
        ]
    base = np.asarray(img, dtype=np.float32)
    out = []
    for m in maps.cpu().numpy():
        m = (m - m.min()) / max(float(m.max() - m.min()), 1e-8)
        heat = np.stack([m * 255, np.zeros_like(m), (1 - m) * 255], axis=-1)  # red = attended, blue = not
        out.append(Image.fromarray((0.5 * base + 0.5 * heat).clip(0, 255).astype("uint8")))
    return out


def search_page(
    query_path: str | Path,
    hits: Sequence[Any],
    out_dir: str | Path,
    model: Any = None,
    box=None,
    cell: int = 200,
) -> tuple[Path, Path]:
    """Write ``results.png`` (query, then hits with scores; below them the query's token attention maps,
    one per cell) and ``index.html`` (the same, larger maps in their own row) into ``out_dir``; returns both
    paths."""
    import html

    out_dir = Path(out_dir)
    (out_dir / "img").mkdir(parents=True, exist_ok=True)
    tiles = [_tile(Path(query_path), cell, BLUE, 4, box)] + [_tile(Path(h.path), cell, GREY, 2) for h in hits]
    overlays = attention_overlays(model, query_path, box=box) if model is not None else []
    label_h = 22
    rows = 1 + (math.ceil(len(overlays) / len(tiles)) if overlays else 0)
    grid = Image.new("RGB", (len(tiles) * cell, rows * (cell + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, t in enumerate(tiles):
        grid.paste(t, (i * cell, 0))
        label = "query" if i == 0 else f"{i}: {hits[i - 1].score:.3f}"
        draw.text((i * cell + 6, cell + 4), label, fill=(0, 0, 0))
    for j, o in enumerate(overlays):  # the token maps, fitted into cells under the results
        row, col = divmod(j, len(tiles))
        fitted = o.copy()
        fitted.thumbnail((cell - 4, cell - 4))
        x, y = col * cell, (row + 1) * (cell + label_h)
        grid.paste(fitted, (x + (cell - fitted.width) // 2, y + (cell - fitted.height) // 2))
        draw.text((x + 6, y + cell + 4), f"token {j + 1}", fill=(0, 0, 0))
    png = out_dir / "results.png"
    grid.save(png)
    for i, t in enumerate(tiles):
        t.save(out_dir / "img" / f"{i}.jpg", quality=90)
    for j, o in enumerate(overlays):
        o.save(out_dir / "img" / f"token{j}.jpg", quality=90)
    results = "\n".join(
        f'<figure><img src="img/{i}.jpg" alt="result {i}"><figcaption>{i}. {h.score:.4f}<br>'
        f"{html.escape(str(h.path))}</figcaption></figure>"
        for i, h in enumerate(hits, start=1)
    )
    tokens = "\n".join(
        f'<figure class="map"><img src="img/token{j}.jpg" alt="token {j + 1}"><figcaption>token {j + 1}'
        "</figcaption></figure>"
        for j in range(len(overlays))
    )
    title = html.escape(str(query_path))
    map_width = 2 * cell
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>tokenret: {title}</title>
<style>body{{font-family:sans-serif;margin:1em}}
.row{{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}}
figure{{margin:0;width:{cell}px}}
figure.map{{width:{map_width}px}}
figure img{{display:block;max-width:100%;height:auto}}
figcaption{{font-size:12px;word-break:break-all}}</style></head><body>
<h2>Query</h2><div class="row"><figure><img src="img/0.jpg" alt="query">
<figcaption>{html.escape(str(query_path))}</figcaption></figure></div>
{'<h2>Where each token looks</h2><div class="row">' + tokens + "</div>" if tokens else ""}
<h2>Results</h2>
<div class="row">
{results}
</div>
</body></html>"""
    page_path = out_dir / "index.html"
    page_path.write_text(page, encoding="utf-8")
    return png, page_path
