"""What ``tokenret serve`` answers, apart from HTTP: an index and its model, loaded once, searched with
uploaded images the way ``tokenret search`` searches with files, and the request checks (``k``, box,
upload, pixels) that turn a bad request into a :class:`RequestError` with a status and a message for the
client.

Concurrent searches are micro-batched (:class:`~tokenret.serve.batching.MicroBatcher`): the queries that
arrive together are described in one call of the extraction engine (images of equal size share a forward
pass) and searched together; the queue is bounded and a full queue answers 503 at once.

What a client sees never includes a server path: results and ``/health`` name files relative to the
indexed folder, and errors name the image by id or that name.

Example:
    >>> service = SearchService.open("photos.idx", device="cpu")          # doctest: +SKIP
    >>> service.search(open("query.jpg", "rb").read(), k=5)["results"][0]  # doctest: +SKIP
    {'id': 17, 'name': 'query.jpg', 'score': 1.0}
"""

from __future__ import annotations

import base64
import io
import os
import stat
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenret.collection import ImageIndex
from tokenret.data.images import (
    ImageLoadError,
    ImageTooLargeError,
    image_header,
    load_image,
    stored_box,
    upright_size,
)
from tokenret.extraction import extract_descriptors
from tokenret.rerank import superglobal_option
from tokenret.serve.batching import MicroBatcher, Overloaded

#: Largest accepted upload (bytes); larger ones are answered 413.
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
#: Most pixels an uploaded image may have, read from its header before anything is decoded (larger: 413).
MAX_PIXELS = 40_000_000
#: Most results one search returns.
MAX_K = 1000
#: Most candidates one search may re-rank (the work grows with its square).
MAX_RERANK_M = 2000
#: Results of a search that names no ``k``.
DEFAULT_K = 20
#: Allowed ``size`` of ``GET /image`` thumbnails (pixels, longest side).
THUMBNAIL_SIDES = (16, 1024)
#: Longest side of the query under the token attention maps.
ATTENTION_SIDE = 512
#: Files larger than this are not served by ``GET /image`` (bytes).
MAX_SERVED_FILE = 256 * 1024 * 1024


class RequestError(Exception):
    """A request the server refuses: the HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Query:
    """One search waiting for its batch: an uploaded image (or an indexed file's bytes), or a stored
    vector (a search with an indexed image, no box)."""

    k: int
    image: bytes | None = None
    box: tuple[float, float, float, float] | None = None
    vector: np.ndarray | None = None
    rerank: tuple[int, int, float] | None = None  # SuperGlobal's (m, k, beta)


class SearchService:
    """An index and its model, loaded once, and what the HTTP layer asks of them.

    Searches go through a micro-batching queue served by one worker thread (the model runs there);
    short reads of the index (a file's record, health) take ``db_lock``, never the model's time.

    Args:
        index: the open index.
        model: the index's model (checked against it here, once, by :meth:`ImageIndex.bind`).
        device: where queries are described (default: cuda if available).
        max_upload_bytes: largest accepted upload.
        max_pixels: most pixels of an uploaded image (checked from its header, before decoding).
        max_batch: most queries described in one call.
        batch_window: seconds an idle worker waits for more queries after the first (queries that arrive
            while a batch runs form the next batch without waiting).
        max_queue: most queries waiting; beyond it, searches are refused at once (503).
    """

    def __init__(
        self,
        index: ImageIndex,
        model: Any,
        device: str | None = None,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
        max_pixels: int = MAX_PIXELS,
        max_batch: int = 8,
        batch_window: float = 0.005,
        max_queue: int = 64,
    ) -> None:
        self.binding = index.bind(model)
        self.index = index
        self.model = model
        self.device = device
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_pixels = int(max_pixels)
        self.config = self.binding.extraction_config(num_workers=0, device=device, batch_size=max_batch)
        # one forward pass per micro-batch (per group of equal-size images), on all of torch's threads: the
        # engine's CPU streams would start their threads anew for every micro-batch and split a small one
        # unevenly (measured: bench/README.md, "serve")
        self.config.streams = 1
        self.db_lock = threading.Lock()  # the index's SQLite connection is shared by threads
        index.vectors_in_memory = True  # a long-running server: single queries scan an in-memory copy
        # load the FAISS index now, not on the first query (a server never rebuilds it: while it is stale,
        # searches run exactly and `tokenret index` brings it up to date)
        index.ann_index()
        self.batcher = MicroBatcher(
            self._run_batch, max_batch=max_batch, window=batch_window, max_queue=max_queue
        )

    @classmethod
    def open(
        cls,
        index_path: str | Path,
        checkpoint: str | Path | None = None,
        device: str | None = None,
        model: Any = None,
        **options: Any,
    ) -> SearchService:
        """Open an index and load its model (from ``checkpoint`` when the recorded file moved), or use
        ``model``, one already built and checked to be the index's (the command line checks it first)."""
        index = ImageIndex(index_path)
        try:
            return cls(
                index, model if model is not None else index.load_model(checkpoint), device=device, **options
            )
        except BaseException:
            index.close()
            raise

    def close(self) -> None:
        """Answer the queued searches, then close the index."""
        self.batcher.close()
        self.index.close()

    # -- what a client may know ------------------------------------------------------------------

    @property
    def has_attention(self) -> bool:
        """Whether the model has token attention maps (Token models)."""
        return hasattr(self.model, "attention_maps")

    def health(self) -> dict[str, Any]:
        """Index name and size, model, extraction settings, search backend, limits and batching."""
        with self.db_lock:
            s = self.index.settings
            checkpoint = s.get("checkpoint")
            return {
                "status": "ok",
                "index": self.index.path.resolve().name,
                "images": len(self.index),
                "model": s["model"],
                "model_kwargs": s["model_kwargs"],
                "checkpoint": Path(checkpoint).name if checkpoint else None,
                "dim": self.index.dim,
                "extraction": s["extraction"],
                "backend": self.index.backend,
                "spec": _no_paths(self.index.backend_spec()),
                "refine": self.index.refine,
                "ann": self.index.ann_status(),
                "attention": self.has_attention,
                "max_k": MAX_K,
                "max_upload_bytes": self.max_upload_bytes,
                "max_pixels": self.max_pixels,
                "batching": self.batcher.stats(),
            }

    def name_of(self, path: str) -> str:
        """How a client sees an indexed file: its path relative to the indexed folder holding it (the
        file name alone for a file indexed by path)."""
        root = self._root_of(path)
        return path[len(root) + 1 :] if root else Path(path).name

    def _root_of(self, path: str) -> str | None:
        for root in self.index.roots():
            if path.startswith(root.rstrip(os.sep) + os.sep):
                return root.rstrip(os.sep)
        return None

    # -- searching -------------------------------------------------------------------------------

    def submit(
        self,
        image: bytes | None = None,
        k: Any = DEFAULT_K,
        box: Any = None,
        image_id: Any = None,
        box_frame: str | None = None,
        rerank: Any = None,
    ) -> Future:
        """Check a search request and queue it; the future's result is the answer of :meth:`search`.

        Raises:
            RequestError: as :meth:`search` (bad request: 4xx; queue full: 503).
        """
        k = parse_k(k)
        frame = parse_frame(box_frame)
        rerank = parse_rerank(rerank)
        start = time.perf_counter()
        if image_id is not None and image_id != "":
            if image is not None:
                raise RequestError(400, "send either an image or the id of an indexed image, not both")
            image_id = parse_id(image_id)
            if box is None or box == "":  # the stored vector: no forward pass
                query = Query(k, vector=self.stored_vector(image_id), rerank=rerank)
                size = None
            else:
                image = self.indexed_bytes(image_id)
        if image is not None:
            (size, orientation) = self.check_upload(image)
            stored = parse_box(box, size, orientation, frame)
            query = Query(k, image=image, box=stored, rerank=rerank)
            size = upright_size(size, orientation)
        elif image_id is None or image_id == "":
            raise RequestError(400, "no query: send an image (form field 'image' or the body) or an id")
        try:
            future = self.batcher.submit(query)
        except Overloaded:
            raise RequestError(503, "the server is busy: too many searches are waiting; try again") from None
        answer: Future = Future()

        def done(f: Future) -> None:
            err = f.exception()
            if err is not None:
                answer.set_exception(err)
                return
            answer.set_result(
                {
                    "results": f.result(),
                    "k": k,
                    "box": _box_out(box),
                    "query_id": image_id if image_id not in (None, "") else None,
                    "query_size": list(size) if size else None,
                    "rerank": None if rerank is None else dict(zip(("m", "k", "beta"), rerank, strict=True)),
                    "seconds": round(time.perf_counter() - start, 4),
                }
            )

        future.add_done_callback(done)
        return answer

    def search(
        self,
        image: bytes | None = None,
        k: Any = DEFAULT_K,
        box: Any = None,
        image_id: Any = None,
        box_frame: str | None = None,
        rerank: Any = None,
    ) -> dict[str, Any]:
        """Search with an uploaded image (bytes of any format Pillow reads), optionally a box of it, or
        with an indexed image by id.

        The query is described as ``tokenret search`` describes a file, from the bytes in memory, in a
        batch with the searches that arrive at the same time; an id without a box searches with the
        image's stored vector (no forward pass).

        Args:
            image: the uploaded file's bytes.
            k: number of results, 1 to :data:`MAX_K` (a string from the request, or None for 20).
            box: ``"x0,y0,x1,y1"`` (or four numbers) in the query's pixels, or None.
            image_id: search with this indexed image instead of an upload.
            box_frame: ``"upright"`` (default: the image as viewers show it, EXIF orientation applied) or
                ``"stored"`` (the file's pixel grid, as ``tokenret search --box`` and revisitop use).
            rerank: None, or ``{"rerank": "superglobal", "rerank_m": 400, "rerank_k": 9, "rerank_beta":
                0.15}`` (missing settings take these defaults): SuperGlobal's re-ranking of the best m, as
                ``tokenret search --rerank superglobal``.

        Returns:
            ``{"results": [{"id", "name", "score"}, ...], "k", "box", "query_id", "query_size", "rerank",
            "seconds"}``.

        Raises:
            RequestError: 400 for a bad ``k``, box or id, or bytes that are not a readable image; 404 for an
                id not in the index; 413 for too many pixels; 503 when too many searches wait.
        """
        return self.submit(image, k, box, image_id, box_frame, rerank).result()

    def _run_batch(self, queries: list[Query]) -> list[Any]:
        """Describe the uploaded queries together, search all of them, one result list (or error) each."""
        vectors = np.zeros((len(queries), self.index.dim), dtype=np.float32)
        errors: dict[int, Exception] = {}
        uploads = [i for i, q in enumerate(queries) if q.vector is None]
        if uploads:
            boxes = [queries[i].box for i in uploads]
            result = extract_descriptors(
                self.model,
                [queries[i].image for i in uploads],
                boxes if any(b is not None for b in boxes) else None,
                self.config,
                on_error="record",
                progress=False,
            )
            for j, i in enumerate(uploads):
                if j in result.failures:
                    reason = result.failures[j][1]
                    errors[i] = RequestError(400, f"the upload is not a readable image: {reason}")
                else:
                    vectors[i] = result.descriptors[j]
        for i, q in enumerate(queries):
            if q.vector is not None:
                vectors[i] = q.vector
        ok = [i for i in range(len(queries)) if i not in errors]
        answers: list[Any] = [errors.get(i) for i in range(len(queries))]
        groups: dict[Any, list[int]] = {}
        for i in ok:  # one search per re-ranking setting (a smaller k is a prefix of a larger one's)
            groups.setdefault(queries[i].rerank, []).append(i)
        for rerank, members in groups.items():
            k = max(queries[i].k for i in members)
            options = {}
            if rerank is not None:
                options = {"rerank": "superglobal", "rerank_m": rerank[0], "rerank_k": rerank[1]}
                options["rerank_beta"] = rerank[2]
            with self.db_lock:
                hits = self.index.search(vectors[members], k, **options)
            for i, row in zip(members, hits, strict=True):
                answers[i] = [
                    {"id": h.id, "name": self.name_of(h.path), "score": h.score} for h in row[: queries[i].k]
                ]
        return answers

    # -- indexed files ---------------------------------------------------------------------------

    def stored_vector(self, image_id: int) -> np.ndarray:
        """The stored descriptor of an indexed image (float32).

        Raises:
            RequestError: 404 for an id not in the index.
        """
        with self.db_lock:
            if self.index.image_path(image_id) is None:
                raise RequestError(404, f"no image with id {image_id} in the index")
            return self.index.vector_index().reconstruct(np.array([image_id]))[0].astype(np.float32)

    def indexed_bytes(self, image_id: Any) -> bytes:
        """The bytes of an indexed image's file (see :meth:`image_file` for what is refused)."""
        return self.image_file(image_id)[0]

    def image_file(self, image_id: Any) -> tuple[bytes, str]:
        """(bytes, name) of an indexed image's file, if it is still the file that was indexed.

        Served only when the file is still a regular file inside the indexed folder holding it (its real
        path: a symlink pointing out of the folder is refused), with the size and modification time
        recorded when it was described; the file is opened once and checked on the open descriptor.

        Raises:
            RequestError: 400 for an id that is not an integer; 404 for one not in the index, or whose file
                is gone, changed, replaced or outside the indexed folder (the client learns no more).
        """
        image_id = parse_id(image_id)
        with self.db_lock:
            record = self.index.image_record(image_id)
        if record is None:
            raise RequestError(404, f"no image with id {image_id} in the index")
        path, size, mtime_ns = record
        gone = RequestError(404, f"image {image_id} ({self.name_of(path)}) is no longer available as indexed")
        root = self._root_of(path)
        root_real = os.path.realpath(root) if root else os.path.realpath(os.path.dirname(path))
        real = os.path.realpath(path)
        if os.path.commonpath([real, root_real]) != root_real:
            raise gone
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            raise gone from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != size or st.st_mtime_ns != mtime_ns:
                raise gone
            if st.st_size > MAX_SERVED_FILE:
                raise RequestError(413, f"image {image_id} is larger than {MAX_SERVED_FILE} bytes")
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read()
        finally:
            os.close(fd)
        if len(data) != size:
            raise gone
        return data, self.name_of(path)

    def thumbnail(self, image_id: Any, side: Any) -> bytes:
        """JPEG of an indexed image, at most ``side`` pixels a side (EXIF orientation applied).

        Raises:
            RequestError: 400 for a ``side`` outside :data:`THUMBNAIL_SIDES`; as :meth:`indexed_bytes`.
        """
        lo, hi = THUMBNAIL_SIDES
        try:
            side = int(side)
        except (TypeError, ValueError):
            side = None
        if side is None or not lo <= side <= hi:
            raise RequestError(400, f"size must be an integer from {lo} to {hi}")
        data = self.indexed_bytes(image_id)
        try:
            img = load_image(data, side, max_pixels=self.max_pixels)
        except ImageLoadError as err:
            raise RequestError(404, f"image {image_id} cannot be read now: {err.reason}") from err
        out = io.BytesIO()
        img.save(out, "JPEG", quality=85)
        return out.getvalue()

    def attention(self, image: bytes | None = None, box: Any = None, image_id: Any = None, box_frame=None):
        """The query with each token's attention map laid over it, as ``data:image/jpeg`` URLs.

        Raises:
            RequestError: 409 when the model has no token attention; as :meth:`search` for the query.
        """
        from tokenret.viz import attention_overlays

        if not self.has_attention:
            raise RequestError(409, f"the model {self.index.settings['model']} has no token attention maps")
        if image_id is not None and image_id != "":
            if image is not None:
                raise RequestError(400, "send either an image or the id of an indexed image, not both")
            image = self.indexed_bytes(image_id)
        if image is None:
            raise RequestError(400, "no query: send an image (form field 'image' or the body) or an id")
        size, orientation = self.check_upload(image)
        stored = parse_box(box, size, orientation, parse_frame(box_frame))
        try:
            overlays = attention_overlays(self.model, image, max_size=ATTENTION_SIDE, box=stored)
        except ImageLoadError as err:
            raise RequestError(400, f"the upload is not a readable image: {err.reason}") from err
        maps = []
        for o in overlays:
            out = io.BytesIO()
            o.save(out, "JPEG", quality=85)
            maps.append("data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii"))
        return {"maps": maps, "box": _box_out(box)}

    def check_upload(self, data: bytes) -> tuple[tuple[int, int], int]:
        """(stored size, EXIF orientation) of an uploaded image, from its header, within the pixel limit.

        Raises:
            RequestError: 400 for an empty upload or bytes Pillow does not recognise; 413 for more than
                ``max_pixels`` pixels.
        """
        if not data:
            raise RequestError(400, "empty upload: send an image file")
        try:
            size, orientation = image_header(data)
        except ImageTooLargeError:
            size, orientation = None, 1
        except ImageLoadError as err:
            reason = err.reason.split(":")[0]
            raise RequestError(400, f"the upload is not an image Pillow can read ({reason})") from None
        if size is None or size[0] * size[1] > self.max_pixels:
            shown = f"{size[0]}x{size[1]} pixels" if size else "too many pixels"
            raise RequestError(413, f"the upload has {shown}; the limit is {self.max_pixels} pixels")
        return size, orientation


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
        raise RequestError(400, f"k must be an integer from 1 to {MAX_K}, got {_short(value)}")
    return k


def parse_id(value: Any) -> int:
    """An image id from a request (a non-negative integer that SQLite can hold).

    Raises:
        RequestError: 400 for anything else.
    """
    try:
        image_id = int(value)
    except (TypeError, ValueError):
        image_id = None
    if image_id is None or not 0 <= image_id < 2**63:
        raise RequestError(400, f"id must be an integer image id, got {_short(value)}")
    return image_id


def parse_rerank(value: Any) -> tuple[int, int, float] | None:
    """SuperGlobal's re-ranking settings (m, k, beta) from a request's ``rerank``, ``rerank_m``,
    ``rerank_k`` and ``rerank_beta`` (a dict of them, or a string: the method alone), or None.

    Raises:
        RequestError: 400 for another method or settings out of range.
    """
    if value is None or value == "":
        return None
    fields = value if isinstance(value, dict) else {"rerank": value}
    method = fields.get("rerank")
    if method in (None, "", "none"):
        if any(fields.get(f"rerank_{n}") not in (None, "") for n in ("m", "k", "beta")):
            raise RequestError(400, "rerank_m, rerank_k and rerank_beta need rerank=superglobal")
        return None
    try:
        m = int(fields.get("rerank_m") or 400)
        k = int(fields.get("rerank_k") if fields.get("rerank_k") not in (None, "") else 9)
        beta = float(fields.get("rerank_beta") if fields.get("rerank_beta") not in (None, "") else 0.15)
        settings = superglobal_option(str(method), m, k, beta)
    except (TypeError, ValueError) as err:
        raise RequestError(400, f"bad re-ranking: {err}") from None
    if settings.m > MAX_RERANK_M:
        raise RequestError(400, f"rerank_m must be at most {MAX_RERANK_M}, got {settings.m}")
    return settings.m, settings.k, settings.beta


def parse_frame(value: Any) -> str:
    """``box_frame``: ``"upright"`` (default) or ``"stored"``."""
    if value is None or value == "":
        return "upright"
    if value not in ("upright", "stored"):
        raise RequestError(400, f"box_frame must be 'upright' or 'stored', got {_short(value)}")
    return value


def parse_box(
    value: Any, size: tuple[int, int], orientation: int = 1, frame: str = "stored"
) -> tuple[float, float, float, float] | None:
    """A box ``"x0,y0,x1,y1"`` (or four numbers) inside an image of stored ``size`` = (width, height), in
    the stored pixel grid, or None. ``frame`` "upright": the box is on the image turned upright by its EXIF
    ``orientation`` (as a browser shows it) and is mapped to the stored grid.

    Raises:
        RequestError: 400 for a malformed box, one outside the image, or one empty once rounded.
    """
    if value is None or value == "":
        return None
    parts = value.split(",") if isinstance(value, str) else value
    try:  # the rule load_image applies to every query box (check_box)
        return stored_box(parts, size, orientation if frame == "upright" else 1)
    except ValueError as err:
        raise RequestError(400, str(err)) from None


def _box_out(box: Any) -> list[float] | None:
    if box is None or box == "":
        return None
    parts = box.split(",") if isinstance(box, str) else box
    return [float(v) for v in parts]


def _short(value: Any, n: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _no_paths(spec: str) -> str:
    """A backend spec without a local file path (``faiss:/x/y.index`` shows ``faiss:y.index``)."""
    head, sep, tail = spec.partition(":")
    return f"{head}{sep}{Path(tail).name}" if sep and tail.startswith(os.sep) else spec
