"""HTTP API and web page over an :class:`~tokenret.collection.ImageIndex` (``tokenret serve``).

Standard library only (``http.server``): the index and its model are loaded once, requests are
handled on threads, and searches run one at a time (the model and the SQLite connection are shared).

Endpoints:

* ``GET /``: a page to upload a query image (optionally a box) and see the top-k with scores.
* ``POST /search``: the query image as ``multipart/form-data`` (field ``image``; optional fields ``k``
  and ``box``) or as the raw body (``Content-Type: image/...`` or ``application/octet-stream``).
  Query parameters ``k`` (1..:data:`MAX_K`, default 20) and ``box=x0,y0,x1,y1`` (pixels of the
  uploaded file) override form fields. Answers ``{"results": [{"path", "score", "id"}, ...], ...}``.
* ``GET /image?id=N``: the stored file of image ``N`` (only images in the index, by id; never a
  path from the request); ``&size=S`` gives a JPEG no larger than S pixels a side instead.
* ``GET /health``: index size, model and search backend, as JSON.

Refused requests get a JSON ``{"error": "..."}`` naming the problem: 400 (not an image, bad box,
``k`` out of range, malformed form), 404 (no such image or page), 411 (no Content-Length), 413
(upload over :data:`MAX_UPLOAD_BYTES`), 415 (unsupported Content-Type). An error inside a search is
logged with its traceback and answered with 500; the server keeps serving.

Example:
    >>> service = SearchService.open("photos.idx")                         # doctest: +SKIP
    >>> with SearchServer(service, "127.0.0.1", 8080) as server:            # doctest: +SKIP
    ...     server.serve_forever()
"""

from __future__ import annotations

import io
import json
import logging
import math
import mimetypes
import tempfile
import threading
import time
import warnings
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image, UnidentifiedImageError

from tokenret.collection import ImageIndex

log = logging.getLogger(__name__)

#: Largest accepted upload (bytes); larger ones are answered 413.
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
#: Most results one search returns.
MAX_K = 1000
DEFAULT_K = 20
#: Allowed ``size`` of ``GET /image`` thumbnails (pixels, longest side).
THUMBNAIL_SIDES = (16, 1024)
#: An over-limit upload up to this many times the limit is read and dropped, so that the client gets
#: the 413 answer rather than a connection reset; anything larger just has its connection closed.
_DISCARD_FACTOR = 4


class RequestError(Exception):
    """A request the server refuses: the HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class SearchService:
    """An index and its model, loaded once, and what the HTTP handler asks of them.

    Args:
        index: the open index.
        model: the index's model (checked against it here, once).
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
        index.check_model(model)
        self.index = index
        self.model = model
        self.device = device
        self.max_upload_bytes = int(max_upload_bytes)
        self.lock = threading.Lock()  # one search at a time: shared model and SQLite connection
        index.vectors_in_memory = True  # a long-running server: single queries scan an in-memory copy
        index.ann_index()  # load (or bring up to date) the FAISS index now, not on the first query

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
        self.index.close()

    def health(self) -> dict[str, Any]:
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

        Raises:
            RequestError: 400 for a bad ``k``, a bad box, or bytes that are not a readable image.
        """
        from tokenret.extraction import ExtractionError, extract_descriptors

        k = parse_k(k)
        size = image_size(image)
        box = parse_box(box, size)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="tokenret-query-") as tmp:
            query = Path(tmp) / "query"
            query.write_bytes(image)
            with self.lock:
                # As ImageIndex.search_images, without re-hashing the model's weights on every query:
                # the model was checked against the index when the service started.
                config = self.index.extraction_config(num_workers=0, device=self.device)
                try:
                    q = extract_descriptors(
                        self.model, [query], [box] if box else None, config, progress=False
                    ).descriptors
                except ExtractionError as err:
                    reason = next(iter(err.failures.values()))[1]
                    raise RequestError(400, f"the upload is not a readable image: {reason}") from err
                hits = self.index.search(q, k)[0]
        return {
            "results": [{"path": h.path, "score": h.score, "id": h.id} for h in hits],
            "k": k,
            "box": list(box) if box else None,
            "query_size": list(size),
            "seconds": round(time.perf_counter() - start, 4),
        }

    def image_file(self, image_id: Any) -> Path:
        """The file of an image in the index, by id.

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
        """JPEG of an indexed image, at most ``side`` pixels a side (EXIF orientation applied)."""
        from tokenret.data.images import ImageLoadError, load_image

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
    """``k`` from a request: an integer from 1 to :data:`MAX_K` (400 otherwise)."""
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
    """A box ``"x0,y0,x1,y1"`` (or four numbers) inside an image of ``size`` = (width, height), or None."""
    if value is None or value == "":
        return None
    w, h = size
    rule = f"box must be x0,y0,x1,y1 with 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h} (query pixels)"
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        x0, y0, x1, y1 = (float(v) for v in parts)
    except (TypeError, ValueError):
        raise RequestError(400, f"{rule}, got {value!r}") from None
    ok = all(math.isfinite(v) for v in (x0, y0, x1, y1))
    # load_image crops at rounded coordinates: the rounded box must not be empty either
    if not (
        ok and 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and round(x1) > round(x0) and round(y1) > round(y0)
    ):
        raise RequestError(400, f"{rule}, got {value!r}")
    return (x0, y0, x1, y1)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an uploaded image, from its header; 400 if Pillow does not recognise it."""
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


def parse_multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    """Fields of a ``multipart/form-data`` body, name -> bytes (the last of repeated names)."""
    header = b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
    msg = BytesParser(policy=HTTP).parsebytes(header + body)
    if not msg.is_multipart():
        raise RequestError(400, "malformed multipart/form-data body (no boundary or no parts)")
    fields = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[str(name)] = part.get_payload(decode=True) or b""
    return fields


class SearchHandler(BaseHTTPRequestHandler):
    """Routes requests to the server's :class:`SearchService`."""

    server: SearchServer
    server_version = "tokenret"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch(self._post)

    def _dispatch(self, handle) -> None:
        try:
            url = urlsplit(self.path)
            handle(url.path, {k: v[-1] for k, v in parse_qs(url.query).items()})
        except RequestError as err:
            self._send_json({"error": err.message}, err.status)
        except ConnectionError as err:
            log.info("%s went away: %s", self.address_string(), err)
        except Exception as err:
            log.exception("error answering %s %s", self.command, self.path)
            self._send_json({"error": f"internal error: {type(err).__name__}: {err}"}, 500)

    def _get(self, path: str, params: dict[str, str]) -> None:
        service = self.server.service
        if path == "/":
            self._send(200, PAGE.encode(), "text/html; charset=utf-8")
        elif path == "/health":
            self._send_json(service.health())
        elif path == "/image":
            if "size" in params:
                self._send(200, service.thumbnail(params.get("id"), params["size"]), "image/jpeg")
            else:
                file = service.image_file(params.get("id"))
                ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
                self._send(200, file.read_bytes(), ctype)
        elif path == "/search":
            raise RequestError(
                405, "search with POST /search (the image as the body or a form field 'image')"
            )
        else:
            raise RequestError(404, f"no page {path}: try /, /health, POST /search or /image?id=N")

    def _post(self, path: str, params: dict[str, str]) -> None:
        if path != "/search":
            raise RequestError(404, f"no endpoint POST {path}: use POST /search")
        body = self._read_body()
        ctype = self.headers.get_content_type()
        if ctype == "multipart/form-data":
            fields = parse_multipart(self.headers["Content-Type"], body)
            if "image" not in fields:
                raise RequestError(400, "the form has no 'image' field")
            image = fields["image"]
            for name in ("k", "box"):
                if name not in params and name in fields:
                    params[name] = fields[name].decode("utf-8", "replace").strip()
        elif ctype.startswith("image/") or ctype == "application/octet-stream":
            image = body
        else:
            raise RequestError(
                415,
                f"unsupported Content-Type {ctype}: send multipart/form-data with an 'image' field, "
                "or the image itself as the body (Content-Type image/... or application/octet-stream)",
            )
        self._send_json(self.server.service.search(image, params.get("k"), params.get("box")))

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError(
                411, "send the upload with a Content-Length (chunked uploads are not supported)"
            )
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "the request has no Content-Length")
        try:
            n = int(length)
        except ValueError:
            n = -1
        if n < 0:
            raise RequestError(400, f"bad Content-Length {length!r}")
        limit = self.server.service.max_upload_bytes
        if n > limit:
            self._discard(n, limit)
            raise RequestError(413, f"the upload has {n} bytes; the limit is {limit} bytes")
        data = self.rfile.read(n)
        if len(data) < n:
            raise RequestError(400, f"the upload ended after {len(data)} of {n} bytes")
        return data

    def _discard(self, n: int, limit: int) -> None:
        """Read and drop an over-limit body (closing with unread data would reset the connection)."""
        self.close_connection = True
        if n > _DISCARD_FACTOR * limit:
            return
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 20))
            if not chunk:
                return
            n -= len(chunk)

    def _send_json(self, obj: Any, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.info("%s %s", self.address_string(), format % args)


class SearchServer(ThreadingHTTPServer):
    """A threading HTTP server answering with a :class:`SearchService` (port 0 picks a free port)."""

    daemon_threads = True

    def __init__(self, service: SearchService, host: str = "127.0.0.1", port: int = 8080) -> None:
        self.service = service
        super().__init__((host, port), SearchHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def serve(
    index: str | Path,
    host: str = "127.0.0.1",
    port: int = 8080,
    checkpoint: str | Path | None = None,
    device: str | None = None,
) -> None:
    """Serve an index until interrupted (Ctrl-C)."""
    service = SearchService.open(index, checkpoint, device)
    try:
        with SearchServer(service, host, port) as server:
            s = service.index.settings
            print(
                f">> serving {service.index.path} ({len(service.index)} images, {s['model']}, backend "
                f"{service.index.backend_spec()}) at {server.url} (Ctrl-C stops)",
                flush=True,
            )
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                print(">> stopped")
    finally:
        service.close()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tokenret search</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; }
form { display: flex; flex-wrap: wrap; gap: .6em; align-items: center; margin-bottom: 1em; }
input[type=number], .box input { width: 5em; }
#hits { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 200px; }
figure img { max-width: 200px; max-height: 200px; display: block; }
figcaption { font-size: 12px; word-break: break-all; }
#error { color: #b00020; }
#info { color: #555; }
</style></head>
<body>
<h1>tokenret search</h1>
<p id="info"></p>
<form id="form">
  <input type="file" name="image" accept="image/*" required>
  <label>k <input type="number" name="k" value="20" min="1" max="1000"></label>
  <span class="box">box (optional, query pixels)
    <input name="x0" placeholder="x0"> <input name="y0" placeholder="y0">
    <input name="x1" placeholder="x1"> <input name="y1" placeholder="y1"></span>
  <button type="submit">Search</button>
</form>
<p id="error"></p>
<div id="hits"></div>
<script>
const form = document.getElementById("form"), hits = document.getElementById("hits");
const error = document.getElementById("error"), info = document.getElementById("info");
fetch("/health").then(r => r.json()).then(h => {
  info.textContent = `${h.images} images, model ${h.model}, backend ${h.spec}`;
});
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  error.textContent = "";
  const data = new FormData(form);
  const box = ["x0", "y0", "x1", "y1"].map(n => data.get(n).trim());
  ["x0", "y0", "x1", "y1"].forEach(n => data.delete(n));
  if (box.some(v => v !== "")) data.set("box", box.join(","));
  const response = await fetch("/search", {method: "POST", body: data});
  const answer = await response.json();
  if (!response.ok) { error.textContent = answer.error; hits.replaceChildren(); return; }
  hits.replaceChildren(...answer.results.map(hit => {
    const figure = document.createElement("figure"), link = document.createElement("a");
    const img = document.createElement("img"), caption = document.createElement("figcaption");
    link.href = `/image?id=${hit.id}`;
    img.src = `/image?id=${hit.id}&size=200`;
    img.alt = hit.path;
    caption.textContent = `${hit.score.toFixed(4)}  ${hit.path}`;
    link.append(img);
    figure.append(link, caption);
    return figure;
  }));
});
</script>
</body></html>
"""
