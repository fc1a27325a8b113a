"""Finding the images of a folder."""

from __future__ import annotations

import os
from pathlib import Path

#: File extensions taken for images (lower case).
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .png .bmp .gif .tif .tiff .webp .ppm .pgm .pbm .jfif .heic .avif".split()
)


def find_images(root: str | Path) -> list[Path]:
    """Image files under ``root`` (recursively, by extension, hidden folders skipped), sorted."""
    root = Path(root)
    if root.is_file():
        return [root.resolve()]
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if Path(f).suffix.lower() in IMAGE_EXTENSIONS and not f.startswith("."):
                found.append((Path(dirpath) / f).resolve())
    return sorted(found)
