"""What ``tokenret serve`` answers, apart from HTTP: an index and its model, loaded once, searched with
uploaded images the way ``tokenret search`` searches with files, and the request checks (``k``, box,
upload) that turn a bad request into a :class:`RequestError` with a status and a message for the client.

Example:
    >>> service = SearchService.open("photos.idx", device="cpu")          # doctest: +SKIP
    >>> service.search(open("query.jpg", "rb").read(), k=5)["results"][0]  # doctest: +SKIP
    {'path': '/photos/query.jpg', 'score': 1.0, 'id': 17}
"""

from __future__ import annotations

import io
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from tokenret.collection import ImageIndex
from tokenret.data.images import ImageLoadError, check_box, load_image
from tokenret.extraction import ExtractionError

#: Largest accepted upload (bytes); larger ones are answered 413.
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
#: Most results one search returns.
MAX_K = 1000
#: Results of a search that names no ``k``.
DEFAULT_K = 20
#: Allowed ``size`` of ``GET /image`` thumbnails (pixels, longest side).
THUMBNAIL_SIDES = (16, 1024)


class RequestError(Exception):
    """A request the server refuses: the HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class SearchService:
    """An index and its model, loaded once, and what the HTTP handler asks of them.

    Searches run one at a time: the model and the index's SQLite connection are shared by the
    server's threads.

    Args:
        index: the open index.
        model: the index's model (checked against it here, once, by :meth:`ImageIndex.bind`).
        device: where queries are described (default: cuda if available).
        max_upload_bytes: largest accepted upload.
    """

    def __init__(
        self,
        index: ImageIndex,
        model: Any,
        device: str | None = None,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
    ) -> None:
        self.binding = index.bind(model)
        self.index = index
        self.model = model
        self.device = device
        self.max_upload_bytes = int(max_upload_bytes)
        self.lock = threading.Lock()  # one search at a time: shared model and SQLite connection
        index.vectors_in_memory = True  # a long-running server: single queries scan an in-memory copy
        # load the FAISS index now, not on the first query (a server never rebuilds it: while it is stale,
        # searches run exactly and `tokenret index` brings it up to date)
        index.ann_index()

    @classmethod
    def open(
        cls, index_path: str | Path, checkpoint: str | Path | None = None, device: str | None = None
    ) -> SearchService:
        """Open an index and load its model (from ``checkpoint`` when the recorded file moved)."""
        index = ImageIndex(index_path)
        try:
            return cls(index, index.load_model(checkpoint), device=device)
        except BaseException:
            index.close()
            raise

    def close(self) -> None:
        """Close the index."""
        self.index.close()

    def health(self) -> dict[str, Any]:
        """Index size, model, extraction settings, search backend and limits, as JSON-ready values."""
        with self.lock:
            s = self.index.settings
            return {
                "status": "ok",
                "index": str(self.index.path.resolve()),
                "images": len(self.index),
                "model": s["model"],
                "model_kwargs": s["model_kwargs"],
                "checkpoint": s["checkpoint"],
                "dim": self.index.dim,
                "extraction": s["extraction"],
                "backend": self.index.backend,
                "spec": self.index.backend_spec(),
                "refine": self.index.refine,
                "ann": self.index.ann_status(),
                "max_k": MAX_K,
                "max_upload_bytes": self.max_upload_bytes,
            }

    def search(self, image: bytes, k: Any = DEFAULT_K, box: Any = None) -> dict[str, Any]:
        """Search with an uploaded image (bytes of any format Pillow reads), optionally a box of it.

        The query is described and searched exactly as ``tokenret search`` does with a file
        (:meth:`ModelBinding.search_images`), from the bytes in memory.

        Args:
            image: the uploaded file's bytes.
            k: number of results, 1 to :data:`MAX_K` (a string from the request, or None for 20).
            box: ``"x0,y0,x1,y1"`` (or four numbers) in the uploaded image's pixels, or None.

        Returns:
            ``{"results": [{"path", "score", "id"}, ...], "k", "box", "query_size", "seconds"}``.

        Raises:
            RequestError: 400 for a bad ``k``, a bad box, or bytes that are not a readable image.
        """
        k = parse_k(k)
        size = image_size(image)
        box = parse_box(box, size)
        start = time.perf_counter()
        with self.lock:
            try:
                hits = self.binding.search_images(
                    [image], k=k, boxes=[box] if box else None, num_workers=0, device=self.device
                )[0]
            except ExtractionError as err:
                reason = next(iter(err.failures.values()))[1]
                raise RequestError(400, f"the upload is not a readable image: {reason}") from err
        return {
            "results": [{"path": h.path, "score": h.score, "id": h.id} for h in hits],
            "k": k,
            "box": list(box) if box else None,
            "query_size": list(size),
            "seconds": round(time.perf_counter() - start, 4),
        }

    def image_file(self, image_id: Any) -> Path:
        """The file of an image in the index, by id (never a path from the request).

        Raises:
            RequestError: 400 for an id that is not an integer, 404 for one not in the index or whose
                file is gone.
        """
        try:
            image_id = int(image_id)
        except (TypeError, ValueError):
            raise RequestError(400, f"id must be an integer image id, got {image_id!r}") from None
        with self.lock:
            path = self.index.image_path(image_id)
        if path is None:
            raise RequestError(404, f"no image with id {image_id} in the index")
        if not Path(path).is_file():
            raise RequestError(404, f"image {image_id} is indexed, but its file {path} is gone")
        return Path(path)

    def thumbnail(self, image_id: Any, side: Any) -> bytes:
        """JPEG of an indexed image, at most ``side`` pixels a side (EXIF orientation applied).

        Raises:
            RequestError: 400 for a ``side`` outside :data:`THUMBNAIL_SIDES`; as :meth:`image_file` for
                the id; 404 when the file cannot be read now.
        """
        lo, hi = THUMBNAIL_SIDES
        try:
            side = int(side)
        except (TypeError, ValueError):
            side = None
        if side is None or not lo <= side <= hi:
            raise RequestError(400, f"size must be an integer from {lo} to {hi}")
        path = self.image_file(image_id)
        try:
            img = load_image(path, side)
        except ImageLoadError as err:
            raise RequestError(404, f"image {image_id} ({path}) cannot be read now: {err.reason}") from err
        out = io.BytesIO()
        img.save(out, "JPEG", quality=85)
        return out.getvalue()


def parse_k(value: Any) -> int:
    """``k`` from a request: an integer from 1 to :data:`MAX_K`; None or empty gives :data:`DEFAULT_K`.

    Raises:
        RequestError: 400 for anything else.
    """
    if value is None or value == "":
        return DEFAULT_K
    try:
        k = int(value)
    except (TypeError, ValueError):
        k = None
    if k is None or not 1 <= k <= MAX_K:
        raise RequestError(400, f"k must be an integer from 1 to {MAX_K}, got {value!r}")
    return k


def parse_box(value: Any, size: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """A box ``"x0,y0,x1,y1"`` (or four numbers) inside an image of ``size`` = (width, height), or None.

    Raises:
        RequestError: 400 for a malformed box, one outside the image, or one empty once rounded.
    """
    if value is None or value == "":
        return None
    parts = value.split(",") if isinstance(value, str) else value
    try:
        return check_box(parts, size)  # the rule load_image applies to every query box
    except ValueError as err:
        raise RequestError(400, str(err)) from None


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an uploaded image, from its header.

    Raises:
        RequestError: 400 for an empty upload, too many pixels, or bytes Pillow does not recognise.
    """
    if not data:
        raise RequestError(400, "empty upload: send an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.size
    except Image.DecompressionBombError as err:
        raise RequestError(400, f"the upload has too many pixels: {err}") from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise RequestError(400, f"the upload is not an image Pillow can read ({type(err).__name__})") from err
