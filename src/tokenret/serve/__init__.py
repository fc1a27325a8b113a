"""Search an image index over HTTP: a JSON API (FastAPI on uvicorn) and a web page.

``service`` holds the index and its model and answers searches (micro-batched by ``batching``); ``app``
is the API (routes, uploads, limits, API key); ``http`` runs it with uvicorn; ``page`` is the web page,
shipped as package data in ``static/``.

Example:
    >>> from tokenret.serve import serve
    >>> serve("photos.idx", port=8080)   # doctest: +SKIP
    >> serving photos.idx (12345 images, token_r101, backend exact) at http://127.0.0.1:8080/
"""

from tokenret.serve.app import Limits, create_app
from tokenret.serve.batching import MicroBatcher, Overloaded
from tokenret.serve.http import API_KEY_ENV, SearchServer, serve
from tokenret.serve.service import MAX_K, MAX_PIXELS, MAX_UPLOAD_BYTES, RequestError, SearchService

__all__ = [
    "API_KEY_ENV",
    "MAX_K",
    "MAX_PIXELS",
    "MAX_UPLOAD_BYTES",
    "Limits",
    "MicroBatcher",
    "Overloaded",
    "RequestError",
    "SearchServer",
    "SearchService",
    "create_app",
    "serve",
]
