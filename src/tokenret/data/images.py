"""Robust image loading, query-box cropping and resizing as in the Token / cirtorch test code.

Pipeline of :func:`load_image`:

1. open with Pillow (any format it reads; first frame of multi-frame files) and check the pixel count
   against a limit (decompression bombs raise :class:`ImageTooLargeError`, never a warning);
2. decode fully (truncated or broken files raise :class:`ImageLoadError`);
3. convert to RGB (:func:`to_rgb`; transparency is composited on white);
4. crop the query box, in the stored pixel grid (PIL crop of the float box: Python ``round``, right/bottom
   exclusive, outside pixels black — as the release);
5. apply the EXIF orientation;
6. shrink like the release's ``thumbnail((S, S), ANTIALIAS)``: longest side <= S, aspect kept, never enlarged;
   a query crop uses ``S * max(crop size) / max(full image size)``.

The release does not apply the EXIF orientation (the ROxf/RPar files carry none, so it makes no difference
there); pass ``exif_transpose=False`` to reproduce it on files that do. Boxes are taken in the stored
pixel grid because the benchmark annotation was drawn there.
"""

from __future__ import annotations

import io
import math
import os
import stat
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageLoadError",
    "ImageTooLargeError",
    "load_image",
    "thumbnail",
    "thumbnail_size",
    "to_rgb",
    "to_tensor",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: How far (pixels) a query box may reach past the image's edge.
BOX_EDGE_SLACK = 1.0
#: How an image given as bytes (an upload) is named in errors.
IMAGE_DATA_NAME = "<image data>"

#: Background for transparent pixels.
BACKGROUND = (255, 255, 255)

_EXIF_ORIENTATION = 0x0112  # EXIF tag number of Orientation

# EXIF orientation -> transpose that makes the image upright (EXIF 2.3 orientation semantics).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# What Pillow raises for damaged or unsupported files, besides OSError (which covers
# UnidentifiedImageError, truncation and missing files).
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    ZeroDivisionError,
)


class ImageLoadError(RuntimeError):
    """An image file that could not be loaded; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path}: {reason}")

    def __reduce__(self):  # keep picklable across DataLoader worker processes
        return (type(self), (self.path, self.reason))


class ImageTooLargeError(ImageLoadError):
    """An image with more pixels than allowed (possible decompression bomb)."""


def thumbnail_size(size: tuple[int, int], max_side: float) -> tuple[int, int]:
    """Output size of Pillow's ``Image.thumbnail((max_side, max_side))`` for an image of ``size``.

    Same arithmetic as Pillow (13.0 checked): the bound is ``floor(max_side)``; an image already within it
    is kept; otherwise the long side becomes the bound and the short side is the floor or ceiling of the
    exact value, whichever keeps the aspect ratio closer (floor on ties), at least 1. A bound below 1 is
    treated as 1 (where Pillow would divide by zero).
    """
    width, height = size
    bound = max(math.floor(max_side), 1)
    if bound >= width and bound >= height:
        return width, height
    aspect = width / height

    def closest(value: float, error) -> int:
        return max(min(math.floor(value), math.ceil(value), key=error), 1)

    if aspect <= 1:  # portrait or square: height is the long side
        return closest(bound * aspect, lambda n: abs(aspect - n / bound)), bound
    return bound, closest(bound / aspect, lambda n: 0 if n == 0 else abs(aspect - bound / n))


def thumbnail(img: Image.Image, max_side: float) -> Image.Image:
    """Shrink ``img`` to fit ``max_side`` with LANCZOS, exactly like ``thumbnail(.., reducing_gap=None)``.

    Returns a new image (or ``img`` itself when no resize is needed); never enlarges.
    """
    target = thumbnail_size(img.size, max_side)
    if target == img.size:
        return img
    return img.resize(target, Image.Resampling.LANCZOS)


def _rescale_to_uint8(a: np.ndarray) -> np.ndarray:
    """8-bit version of a 16/32-bit or float grey image (heuristic range detection, see to_rgb)."""
    is_float = a.dtype.kind == "f"
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if is_float and lo >= 0 and hi <= 1.0:
        a = a * 255.0
    elif lo >= 0 and hi <= 255:
        pass
    elif lo >= 0 and hi <= 65535:
        a = a / 257.0
    elif hi > lo:
        a = (a - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Convert any Pillow mode to RGB.

    * transparency (RGBA, LA, PA, premultiplied modes, palette or grey images with a transparent colour)
      is composited on ``background`` (white by default): transparent pixels have no meaningful colour,
      whereas the release's ``convert('RGB')`` keeps whatever colour they store (often black);
    * 16-bit grey (``I;16*``) is scaled by 1/257; 32-bit ``I`` and float ``F`` are kept if in 0..255,
      scaled by 1/257 if in 0..65535, float images in 0..1 by 255, anything else min-max stretched;
    * every other mode (1, L, P, CMYK, YCbCr, LAB, HSV, RGBX) uses Pillow's ``convert('RGB')``
      (CMYK without colour management: ICC profiles are ignored).
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        grey = _rescale_to_uint8(np.asarray(img))
        return Image.fromarray(grey).convert("RGB")  # 2-D uint8 -> mode L
    has_alpha = "A" in img.mode or "a" in img.mode or "transparency" in img.info
    if not has_alpha:
        return img.convert("RGB")
    if img.mode == "La":  # Pillow converts La only via LA
        img = img.convert("LA")
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except (*_DECODE_ERRORS, TypeError):
        return 1  # unreadable EXIF block: treat as upright, the pixels themselves are fine


def load_image(
    path: str | Path | bytes,
    max_size: float | None = 1024,
    box: tuple[float, float, float, float] | None = None,
    *,
    max_pixels: int | None = None,
    exif_transpose: bool = True,
) -> Image.Image:
    """Load an image as RGB, optionally crop a query box, and shrink it like the Token/cirtorch test code.

    Args:
        path: image file (any format Pillow reads), or the bytes of one (an upload: decoded in memory).
        max_size: S, the bound on the longest side (database images); None keeps the full size. With a box,
            the crop is bounded by ``S * max(crop size) / max(full size)`` so it keeps its scale in the image.
        box: query box ``(x1, y1, x2, y2)`` in the stored pixel grid (right/bottom exclusive, rounded by PIL).
        max_pixels: refuse images with more pixels than this; None uses ``PIL.Image.MAX_IMAGE_PIXELS``
            (about 89.5M). Pillow itself refuses more than twice its ``MAX_IMAGE_PIXELS`` at open time;
            for a larger limit raise that global too.
        exif_transpose: rotate/flip upright by the EXIF orientation tag.

    Pillow's DecompressionBombWarning is silenced with ``warnings.catch_warnings`` (process-wide state, as
    everywhere in Python < 3.14); our own check raises instead.

    Returns:
        A PIL image in RGB mode.

    Raises:
        ImageTooLargeError: more than ``max_pixels`` pixels in the file.
        ImageLoadError: missing, truncated, unreadable or non-image file, or a box outside the image
            (:func:`check_box`).

    Example:
        >>> img = load_image("q.jpg", 1024, box=(136.5, 34.1, 648.5, 955.7))  # doctest: +SKIP
    """
    if isinstance(path, (bytes, bytearray)):
        source, path = io.BytesIO(path), Path(IMAGE_DATA_NAME)
    else:
        source = path = Path(path)
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError as e:
            raise ImageLoadError(path, "file not found") from e
        except OSError as e:
            raise ImageLoadError(path, f"{type(e).__name__}: {e}") from e
        if not stat.S_ISREG(mode):  # opening a named pipe would block until something writes to it
            raise ImageLoadError(path, "not a regular file (a folder, named pipe, socket or device)")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        # Pillow's own over-limit warning is replaced by our error below.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as opened:
                _check_pixels(path, opened.size, limit)
                opened.load()
                orientation = _orientation(opened) if exif_transpose else 1
                img = to_rgb(opened)
                full_side = max(img.size)
                if box is not None:
                    try:
                        box = check_box(box, opened.size)
                    except ValueError as e:
                        raise ImageLoadError(path, str(e)) from None
                    img = img.crop(box)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(path, f"{e} (raise PIL.Image.MAX_IMAGE_PIXELS to allow it)") from e
    except FileNotFoundError as e:
        raise ImageLoadError(path, "file not found") from e
    except _DECODE_ERRORS as e:
        raise ImageLoadError(path, f"{type(e).__name__}: {e}") from e
    if orientation in _ORIENTATION_TRANSPOSE:
        img = img.transpose(_ORIENTATION_TRANSPOSE[orientation])
    if max_size is not None:
        side = max_size if box is None else max_size * max(img.size) / full_side
        img = thumbnail(img, side)
    return img


def check_box(box: Any, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """A query box ``(x0, y0, x1, y1)`` as floats, if it lies inside an image of ``size`` = (width, height)
    and is not empty once rounded (PIL crops at rounded coordinates); else ValueError stating the rule.

    The same rule for every caller (the command line, the Python API, the server): a box outside the image
    is refused, never padded (a padded crop is mostly black and, far outside, costs minutes and gigabytes).
    A box may reach :data:`BOX_EDGE_SLACK` pixel past an edge (drawn to the edge, then rounded).
    """
    w, h = size
    t = BOX_EDGE_SLACK
    rule = f"a box is x0,y0,x1,y1 in the image's pixels with 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h}"
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"{rule}; got {box!r}") from None
    inside = (
        all(math.isfinite(v) for v in (x0, y0, x1, y1)) and -t <= x0 < x1 <= w + t and -t <= y0 < y1 <= h + t
    )
    if not inside or round(x1) <= round(x0) or round(y1) <= round(y0):
        shown = ",".join(f"{v:g}" for v in (x0, y0, x1, y1))
        raise ValueError(f"{rule}; got {shown}, {'empty once rounded' if inside else 'outside the image'}")
    return x0, y0, x1, y1


def image_header(data: bytes | str | Path) -> tuple[tuple[int, int], int]:
    """((width, height) as stored, EXIF orientation 1-8) of an image, read from its header alone (no pixel
    is decoded, so a huge image costs nothing here).

    Raises:
        ImageLoadError: bytes or a file Pillow does not recognise.
    """
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    name = Path(IMAGE_DATA_NAME) if isinstance(data, (bytes, bytearray)) else Path(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                return img.size, _orientation(img)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(name, str(e)) from e
    except _DECODE_ERRORS as e:
        raise ImageLoadError(name, f"{type(e).__name__}: {e}") from e


def upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) of an image of stored ``size`` once turned upright by its EXIF ``orientation``."""
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else tuple(size)


def stored_box(box: Any, size: tuple[int, int], orientation: int) -> tuple[float, float, float, float]:
    """A box drawn on the upright image (EXIF orientation applied, as viewers show it) in the stored pixel
    grid that ``load_image``'s ``box`` and the revisitop files use; ``size`` is the stored (width, height).

    Checked first against the upright image by :func:`check_box` (ValueError when outside it).
    """
    w, h = size
    x0, y0, x1, y1 = check_box(box, upright_size(size, orientation))
    # where an upright point (u, v) lies in the stored grid, for each orientation (pixel-edge coordinates)
    to_stored = {
        1: lambda u, v: (u, v),
        2: lambda u, v: (w - u, v),
        3: lambda u, v: (w - u, h - v),
        4: lambda u, v: (u, h - v),
        5: lambda u, v: (v, u),
        6: lambda u, v: (v, h - u),
        7: lambda u, v: (w - v, h - u),
        8: lambda u, v: (w - v, u),
    }.get(orientation, lambda u, v: (u, v))
    (a, b), (c, d) = to_stored(x0, y0), to_stored(x1, y1)
    return min(a, c), min(b, d), max(a, c), max(b, d)


def _check_pixels(path: Path, size: tuple[int, int], limit: int | None) -> None:
    if limit is not None and size[0] * size[1] > limit:
        raise ImageTooLargeError(
            path,
            f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels exceeds the limit of {limit} "
            "(possible decompression bomb; pass a larger max_pixels if the file is trusted)",
        )


def to_tensor(
    img: Image.Image, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W), scaled to [0, 1] then normalised by ``mean`` and ``std``."""
    import torch

    if img.mode != "RGB":
        img = to_rgb(img)
    array = np.array(img, dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
