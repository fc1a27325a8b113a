"""Synthetic "landmarks" for tests: each a distinct composition of random textures and shapes.

A landmark is a canonical scene (a textured background with several textured shapes). A *view* of it is what
a visitor's photo would show: the scene under a random homography and crop, with a colour change (gains,
contrast, a little noise) and random occluders in front. Views of one landmark share structure and texture,
never pixels, so a model must learn invariance to viewpoint, colour and occlusion to match them.

Two writers produce datasets on disk:

* :func:`write_class_folders` — one folder per landmark (training data in the ``folders`` format);
* :func:`write_revisited_benchmark` — a Revisited-Oxford-style benchmark (``gnd_<name>.json`` + ``jpg/``)
  whose queries and database are views of landmarks; every database view of the query's landmark is "easy".

Landmarks are drawn from ``numpy.random.SeedSequence([seed, landmark_index])``, so different seeds give
disjoint landmark sets (for "never seen" test landmarks) and the same seed gives the same images.

Example:
    >>> write_class_folders("train", n_landmarks=40, views=8, size=64, seed=1)  # doctest: +SKIP
    >>> write_revisited_benchmark("bench", "synth", 10, db_views=4, size=64, seed=2)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["make_landmark", "make_view", "write_class_folders", "write_revisited_benchmark"]

CANVAS = 128  # side of a landmark's canonical scene, in pixels


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float32)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size, 3) float image: stripes, checks, blobs, rings or a gradient in two random colours."""
    a, b = _colour(rng), _colour(rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = int(rng.integers(0, 5))
    if kind == 0:  # stripes at a random angle and frequency
        angle, freq = rng.uniform(0, np.pi), rng.uniform(3, 10)
        t = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle))))
    elif kind == 1:  # checkerboard
        f = rng.uniform(3, 8)
        t = ((np.floor(xx * f) + np.floor(yy * f)) % 2).astype(np.float32)
    elif kind == 2:  # smooth random blobs
        small = rng.random((6, 6)).astype(np.float32)
        t = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC))
        t = (t.astype(np.float32) / 255.0 > 0.5).astype(np.float32)
    elif kind == 3:  # concentric rings around a random centre
        cx, cy, f = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(4, 12)
        t = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * f * np.hypot(xx - cx, yy - cy)))
    else:  # linear gradient
        angle = rng.uniform(0, 2 * np.pi)
        t = (xx * np.cos(angle) + yy * np.sin(angle)) % 1.0
    return a * t[..., None] + b * (1.0 - t[..., None])


def _shape_mask(rng: np.random.Generator, size: int, min_frac: float, max_frac: float) -> Image.Image:
    """A mask (mode L) with one random ellipse, rectangle or polygon."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    w, h = (rng.uniform(min_frac, max_frac, 2) * size).astype(int) + 2
    x0, y0 = rng.integers(0, size - w + 1), rng.integers(0, size - h + 1)
    kind = int(rng.integers(0, 3))
    if kind == 0:
        draw.ellipse([x0, y0, x0 + w, y0 + h], fill=255)
    elif kind == 1:
        draw.rectangle([x0, y0, x0 + w, y0 + h], fill=255)
    else:
        n = int(rng.integers(3, 7))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        cx, cy = x0 + w / 2, y0 + h / 2
        pts = [(cx + w / 2 * np.cos(t), cy + h / 2 * np.sin(t)) for t in angles]
        draw.polygon(pts, fill=255)
    return mask


def make_landmark(seed: int | np.random.SeedSequence, size: int = CANVAS) -> Image.Image:
    """The canonical scene of one landmark: a textured background and 3-6 textured or plain shapes."""
    rng = np.random.default_rng(seed)
    canvas = _texture(rng, size)
    for _ in range(int(rng.integers(3, 7))):
        fill = _texture(rng, size) if rng.random() < 0.7 else np.broadcast_to(_colour(rng), canvas.shape)
        mask = np.asarray(_shape_mask(rng, size, 0.25, 0.6), dtype=np.float32)[..., None] / 255.0
        canvas = canvas * (1.0 - mask) + fill * mask
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


def _perspective_coeffs(dst: np.ndarray, src: np.ndarray) -> list[float]:
    """PIL PERSPECTIVE coefficients mapping output points ``dst`` (4x2) to input points ``src`` (4x2)."""
    rows = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    return np.linalg.solve(np.asarray(rows, dtype=np.float64), src.reshape(-1)).tolist()


def make_view(
    landmark: Image.Image,
    seed: int | np.random.SeedSequence,
    size: int = 64,
    max_warp: float = 0.12,
    crop: tuple[float, float] = (0.6, 1.0),
    occluders: int = 2,
) -> Image.Image:
    """One photo of ``landmark``: random crop + homography, colour change, blur/noise and occluders.

    Args:
        landmark: the canonical scene (:func:`make_landmark`).
        seed: randomness of this view.
        size: output side in pixels (square).
        max_warp: each corner of the crop moves by up to this fraction of the crop side (homography).
        crop: range of the crop side as a fraction of the scene side.
        occluders: at most this many occluding shapes (0 .. occluders, uniformly).
    """
    rng = np.random.default_rng(seed)
    side = landmark.size[0]
    c = rng.uniform(*crop) * side
    x0, y0 = rng.uniform(0, side - c, 2)
    quad = np.array([[x0, y0], [x0, y0 + c], [x0 + c, y0 + c], [x0 + c, y0]], dtype=np.float64)
    quad += rng.uniform(-max_warp, max_warp, quad.shape) * c
    out = np.array([[0, 0], [0, size], [size, size], [size, 0]], dtype=np.float64)
    img = landmark.transform(
        (size, size), Image.PERSPECTIVE, _perspective_coeffs(out, quad), Image.BILINEAR, fillcolor=(0, 0, 0)
    )
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    a = np.asarray(img, dtype=np.float32)
    gains = rng.uniform(0.75, 1.25, 3).astype(np.float32)
    contrast = np.float32(rng.uniform(0.75, 1.25))
    mean = a.mean()
    a = (a - mean) * contrast + mean
    a = a * gains + rng.uniform(-20, 20) + rng.normal(0, 4, a.shape).astype(np.float32)
    for _ in range(int(rng.integers(0, occluders + 1))):
        fill = _texture(rng, size) if rng.random() < 0.5 else np.broadcast_to(_colour(rng), a.shape)
        mask = np.asarray(_shape_mask(rng, size, 0.15, 0.35), dtype=np.float32)[..., None] / 255.0
        a = a * (1.0 - mask) + fill * mask
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _landmark_seed(seed: int, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, index])


def _view_seed(seed: int, index: int, view: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, index, view, 1])


def write_class_folders(
    root: str | Path, n_landmarks: int, views: int, size: int = 64, seed: int = 0, **view_kwargs
) -> list[Path]:
    """Write ``views`` JPEG views of each of ``n_landmarks`` landmarks to ``root/landmark_XXXX/view_YY.jpg``.

    Returns:
        The class folders, in label order.
    """
    root = Path(root)
    folders = []
    for i in range(n_landmarks):
        scene = make_landmark(_landmark_seed(seed, i))
        folder = root / f"landmark_{i:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for v in range(views):
            make_view(scene, _view_seed(seed, i, v), size, **view_kwargs).save(
                folder / f"view_{v:02d}.jpg", quality=92
            )
        folders.append(folder)
    return folders


def write_revisited_benchmark(
    root: str | Path,
    name: str,
    n_landmarks: int,
    db_views: int,
    size: int = 64,
    seed: int = 1,
    **view_kwargs,
) -> Path:
    """Write a Revisited-style benchmark ``root/name/{gnd_<name>.json, jpg/}`` of unseen landmarks.

    Each landmark gives one query view and ``db_views`` database views; a query's positives ("easy") are
    its landmark's database views, "hard" and "junk" are empty, and its box is the whole image.

    Returns:
        The dataset folder ``root/name``.
    """
    folder = Path(root) / name
    images = folder / "jpg"
    images.mkdir(parents=True, exist_ok=True)
    imlist: list[str] = []
    qimlist: list[str] = []
    gnd: list[dict] = []
    for i in range(n_landmarks):
        scene = make_landmark(_landmark_seed(seed, i))
        qname = f"q_{i:04d}"
        make_view(scene, _view_seed(seed, i, 0), size, **view_kwargs).save(
            images / f"{qname}.jpg", quality=92
        )
        qimlist.append(qname)
        first = len(imlist)
        for v in range(db_views):
            dname = f"db_{i:04d}_{v:02d}"
            make_view(scene, _view_seed(seed, i, v + 1), size, **view_kwargs).save(
                images / f"{dname}.jpg", quality=92
            )
            imlist.append(dname)
        gnd.append(
            {"easy": list(range(first, len(imlist))), "hard": [], "junk": [], "bbx": [0, 0, size, size]}
        )
    (folder / f"gnd_{name}.json").write_text(json.dumps({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}))
    return folder
