"""What the server tests share: small generated pictures and an index of them made with a tiny random
Token model (6 images of 96x64, max size 64, one scale)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

#: A tiny Token model (ResNet-18 trunk, 16-d descriptors).
TINY = {"backbone": "resnet18", "dim": 32, "num_heads": 4, "out_dim": 16}


def generated_image(seed: int) -> Image.Image:
    """A 96x64 picture: a coloured gradient with a few rectangles, different for each seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:64, 0:96]
    base = rng.uniform(0, 255, 3)[None, None] * (x[..., None] / 96) + rng.uniform(0, 80, 3)
    for _ in range(3):
        x0, y0 = rng.integers(0, 70), rng.integers(0, 40)
        base[y0 : y0 + 20, x0 : x0 + 25] = rng.uniform(0, 255, 3)
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


def make_index(root: Path, n: int = 6) -> Path:
    """``root/photos/img{i}.png`` for i < n and their index ``root/idx`` (seeded random weights)."""
    import torch

    import tokenret
    from tokenret.collection import ImageIndex
    from tokenret.extraction import ExtractionConfig

    photos = root / "photos"
    photos.mkdir(parents=True)
    for i in range(n):
        generated_image(i).save(photos / f"img{i}.png")
    torch.manual_seed(0)
    model = tokenret.create_model("token_r50", **TINY)
    with ImageIndex.create(root / "idx", model, ExtractionConfig(max_size=64, scales=(1.0,))) as index:
        index.sync(photos, model, progress=False, num_workers=0)
    return root / "idx"
