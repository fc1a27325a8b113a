"""The HTTP API of ``tokenret serve``: a FastAPI application over a :class:`SearchService`.

Endpoints (the interactive OpenAPI page is ``/docs``, the schema ``/openapi.json``):

* ``GET /``: the search page (package data, ``static/index.html``; plain HTML/JS, works offline).
* ``POST /search``: the query as ``multipart/form-data`` (field ``image``, or ``id`` for an indexed image;
  optional ``k``, ``box``, ``box_frame``) or as the raw body (``Content-Type: image/...`` or
  ``application/octet-stream``); query parameters override form fields. Answers
  ``{"results": [{"id", "name", "score"}, ...], "k", "box", "query_id", "query_size", "seconds"}``.
* ``POST /attention``: the same query fields; the query with each token's attention map laid over it
  (Token models; 409 for others).
* ``GET /image?id=N[&size=S]``: an indexed file (or a JPEG thumbnail), only while it is the file that was
  indexed (same size and modification time, a regular file inside the indexed folder), else 404.
* ``GET /health``: index name and size, model, backend, limits, batching (names, never server paths).

Every refusal is JSON ``{"error": "..."}`` naming the problem, without internals: 400 (bad input), 401
(API key needed), 404, 405, 408 (upload too slow), 409, 411, 413 (upload or pixels over the limit), 415,
503 (too many searches waiting: try again), 500 (logged on the server, not shown).

Request bodies are read as they stream in: over ``max_upload_bytes`` the request is refused as soon as
the count passes it; a body that stalls longer than ``idle_timeout`` between chunks or takes longer than
``body_timeout`` in all is refused with 408. Multipart forms are parsed by python-multipart with at most a
few fields and one file.

With an API key, every request must carry it: ``X-API-Key: KEY``, ``Authorization: Bearer KEY``, or
HTTP Basic with any user name and the key as password (browsers ask for it by themselves, so the page
works unchanged).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import mimetypes
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from tokenret.serve.page import index_html
from tokenret.serve.service import RequestError, SearchService

log = logging.getLogger(__name__)

#: Fields of a search form (one of them the file).
FORM_FIELDS = ("image", "id", "k", "box", "box_frame", "rerank", "rerank_m", "rerank_k", "rerank_beta")


@dataclass(frozen=True)
class Limits:
    """What one request may cost the server.

    Args:
        idle_timeout: seconds a request body may stall between two chunks.
        body_timeout: seconds a whole request body may take to arrive.
        max_connections: connections (and running requests) at once; beyond it, 503 (uvicorn).
        keep_alive: seconds an idle kept-alive connection stays open.
        max_fields: most form fields of a multipart upload.
    """

    idle_timeout: float = 10.0
    body_timeout: float = 60.0
    max_connections: int = 256
    keep_alive: float = 5.0
    max_fields: int = 8


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'"
)

_FORM_BODY = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": "the query image"},
                        "id": {"type": "integer", "description": "or: search with this indexed image"},
                        "k": {"type": "integer", "minimum": 1, "default": 20},
                        "box": {"type": "string", "description": "x0,y0,x1,y1 in the query's pixels"},
                        "box_frame": {"type": "string", "enum": ["upright", "stored"], "default": "upright"},
                        "rerank": {
                            "type": "string",
                            "enum": ["superglobal"],
                            "description": "re-rank the best m",
                        },
                        "rerank_m": {"type": "integer", "minimum": 1, "default": 400},
                        "rerank_k": {"type": "integer", "minimum": 0, "default": 9},
                        "rerank_beta": {"type": "number", "minimum": 0, "default": 0.15},
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        }
    }
}


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": message}, status_code=status, headers={**SECURITY_HEADERS, **(headers or {})}
    )


class APIKeyMiddleware:
    """Refuses (401) every request that does not carry the key (pure ASGI: bodies are not touched)."""

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self._allowed(dict(scope["headers"])):
            await self.app(scope, receive, send)
            return
        response = error(
            401,
            "this server needs its API key: X-API-Key: KEY, Authorization: Bearer KEY, or HTTP Basic "
            "with the key as password",
            {"WWW-Authenticate": 'Basic realm="tokenret", charset="UTF-8"'},
        )
        await response(scope, receive, send)

    def _allowed(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        scheme, _, value = auth.partition(b" ")
        if given is None and scheme.lower() == b"bearer":
            given = value.strip()
        elif given is None and scheme.lower() == b"basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                given = None
        return given is not None and hmac.compare_digest(given, self.key)


async def limited_body(request: Request, limit: int, limits: Limits) -> AsyncIterator[bytes]:
    """The request body's chunks as they arrive, refused (413) past ``limit`` bytes and (408) when it
    stalls or takes too long."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.body_timeout
    stream = request.stream().__aiter__()
    received = 0
    while True:
        wait = min(limits.idle_timeout, deadline - loop.time())
        if wait <= 0:
            raise RequestError(408, f"the upload took longer than {limits.body_timeout:g} s")
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), wait)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise RequestError(
                408, f"the upload stalled (nothing received for {wait:g} s); send it at once"
            ) from None
        received += len(chunk)
        if received > limit:
            raise RequestError(413, f"the upload is over the limit of {limit} bytes")
        if chunk:
            yield chunk


async def read_query(request: Request, service: SearchService, limits: Limits) -> dict[str, Any]:
    """The query fields of a search request (form fields, or the raw body as ``image``), query parameters
    overriding form fields."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise RequestError(400, "bad Content-Length") from None
        if n > service.max_upload_bytes:
            raise RequestError(
                413, f"the upload has {n} bytes; the limit is {service.max_upload_bytes} bytes"
            )
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";")[0].strip().lower()
    fields: dict[str, Any] = {}
    body = limited_body(request, service.max_upload_bytes, limits)
    upload = media.startswith("image/") or media == "application/octet-stream"
    if not upload and (length == "0" or (length is None and "transfer-encoding" not in request.headers)):
        pass  # no body: a search by id in the query string
    elif media == "multipart/form-data":
        parser = MultiPartParser(
            request.headers, body, max_files=1, max_fields=limits.max_fields, max_part_size=64 * 1024
        )
        try:
            form = await parser.parse()
        except MultiPartException as err:
            raise RequestError(400, f"malformed multipart/form-data body: {err.message}") from None
        try:
            for name in FORM_FIELDS:
                value = form.get(name)
                if value is None:
                    continue
                if hasattr(value, "read"):  # an uploaded file
                    fields[name] = await value.read()
                else:
                    fields[name] = value.strip()
        finally:
            await form.close()
        if isinstance(fields.get("image"), str):
            raise RequestError(400, "the form field 'image' must be a file")
    elif upload:
        fields["image"] = b"".join([chunk async for chunk in body])
    elif media == "application/x-www-form-urlencoded":  # a search by id from a plain form
        try:
            form = await FormParser(request.headers, body).parse()
        except MultiPartException as err:
            raise RequestError(400, f"malformed form: {err.message}") from None
        fields.update({name: str(form[name]).strip() for name in FORM_FIELDS[1:] if name in form})
    else:
        raise RequestError(
            415,
            f"unsupported Content-Type {media or '(none)'}: send multipart/form-data with an 'image' field, "
            "or the image itself as the body (Content-Type image/... or application/octet-stream)",
        )
    for name in FORM_FIELDS[1:]:
        if name in request.query_params:
            fields[name] = request.query_params[name]
    return fields


def create_app(service: SearchService, api_key: str | None = None, limits: Limits | None = None) -> FastAPI:
    """The ASGI application answering with ``service`` (``api_key``: required on every request)."""
    limits = limits or Limits()
    app = FastAPI(
        title="tokenret search",
        summary="Search an image index by example: upload an image (or a region of it), get the nearest.",
        version="1",
    )

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError) -> JSONResponse:
        return error(err.status, err.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 404:
            return error(404, f"no page {request.url.path}: try /, /health, POST /search, /image?id=N, /docs")
        if err.status_code == 405:
            return error(
                405, f"{request.method} is not allowed on {request.url.path}", dict(err.headers or {})
            )
        return error(err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(400, f"bad request: {where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, err: ClientDisconnect) -> Response:
        log.info("%s went away during %s %s", request.client, request.method, request.url.path)
        return Response(status_code=499)  # nobody is there to read it

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception) -> JSONResponse:
        log.error("error answering %s %s", request.method, request.url.path, exc_info=err)
        return error(500, "internal error (the details are in the server's log)")

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(index_html(), headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/health", summary="Index, model, backend and limits")
    async def health() -> dict[str, Any]:
        return await run_in_threadpool(service.health)

    @app.post(
        "/search",
        summary="Search with an image, a region of it, or an indexed image",
        openapi_extra=_FORM_BODY,
    )
    async def search(request: Request) -> dict[str, Any]:
        q = await read_query(request, service, limits)
        rerank = {name: q[name] for name in FORM_FIELDS[5:] if name in q}
        future = await run_in_threadpool(
            service.submit, q.get("image"), q.get("k"), q.get("box"), q.get("id"), q.get("box_frame"), rerank
        )
        return await asyncio.wrap_future(future)

    @app.post(
        "/attention", summary="The query's token attention maps (Token models)", openapi_extra=_FORM_BODY
    )
    async def attention(request: Request) -> dict[str, Any]:
        q = await read_query(request, service, limits)
        return await run_in_threadpool(
            service.attention, q.get("image"), q.get("box"), q.get("id"), q.get("box_frame")
        )

    @app.get("/image", summary="An indexed image (or a JPEG thumbnail with size=S)")
    async def image(id: str, size: str | None = None) -> Response:  # noqa: A002 - the API's name
        if size is not None:
            data = await run_in_threadpool(service.thumbnail, id, size)
            return Response(data, media_type="image/jpeg")
        data, name = await run_in_threadpool(service.image_file, id)
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if not ctype.startswith("image/"):
            ctype = "application/octet-stream"
        return Response(data, media_type=ctype)

    if api_key:
        app.add_middleware(APIKeyMiddleware, key=api_key)
    return app
