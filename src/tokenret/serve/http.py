"""The HTTP layer of ``tokenret serve``: routes, multipart uploads and limits over a
:class:`~tokenret.serve.service.SearchService`.

Standard library only (``http.server``): requests are handled on threads; the service loads the index
and its model once and runs searches one at a time.

Endpoints:

* ``GET /``: a page to upload a query image (optionally a box) and see the top-k with scores.
* ``POST /search``: the query image as ``multipart/form-data`` (field ``image``; optional fields ``k``
  and ``box``) or as the raw body (``Content-Type: image/...`` or ``application/octet-stream``).
  Query parameters ``k`` (1..:data:`~tokenret.serve.service.MAX_K`, default 20) and
  ``box=x0,y0,x1,y1`` (pixels of the uploaded file) override form fields. Answers
  ``{"results": [{"path", "score", "id"}, ...], ...}``.
* ``GET /image?id=N``: the stored file of image ``N`` (only images in the index, by id; never a
  path from the request); ``&size=S`` gives a JPEG no larger than S pixels a side instead.
* ``GET /health``: index size, model and search backend, as JSON.

Refused requests get a JSON ``{"error": "..."}`` naming the problem: 400 (not an image, bad box,
``k`` out of range, malformed form), 404 (no such image or page), 411 (no Content-Length), 413
(upload over :data:`~tokenret.serve.service.MAX_UPLOAD_BYTES`), 415 (unsupported Content-Type). An
error inside a search is logged with its traceback and answered with 500; the server keeps serving.

Example:
    >>> service = SearchService.open("photos.idx")                         # doctest: +SKIP
    >>> with SearchServer(service, "127.0.0.1", 8080) as server:            # doctest: +SKIP
    ...     server.serve_forever()
"""

from __future__ import annotations

import json
import logging
import mimetypes
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tokenret.serve.page import index_html
from tokenret.serve.service import RequestError, SearchService

log = logging.getLogger(__name__)

#: An over-limit upload up to this many times the limit is read and dropped, so that the client gets
#: the 413 answer rather than a connection reset; anything larger just has its connection closed.
_DISCARD_FACTOR = 4


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
            self._send(200, index_html(), "text/html; charset=utf-8")
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
        """The server's address, ``http://HOST:PORT/`` (with the port actually bound)."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def serve(
    index: str | Path,
    host: str = "127.0.0.1",
    port: int = 8080,
    checkpoint: str | Path | None = None,
    device: str | None = None,
) -> None:
    """Serve an index until interrupted (Ctrl-C): ``tokenret serve``.

    Args:
        index: the index folder; its own model is loaded (from ``checkpoint`` when the recorded file
            moved).
        host: address to listen on (``0.0.0.0`` for every interface).
        port: port to listen on (0 picks a free one).
        device: where queries are described (default: cuda if available).

    Example:
        >>> serve("photos.idx", port=8080)   # doctest: +SKIP
        >> serving photos.idx (12345 images, token_r101, backend exact) at http://127.0.0.1:8080/ ...
    """
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
