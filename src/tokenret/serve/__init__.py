"""Search an image index over HTTP: a JSON API and a small web page, standard library only.

``service`` holds the index and its model and answers searches; ``http`` routes requests to it;
``page`` is the web page, shipped as package data in ``static/``.

Example:
    >>> from tokenret.serve import serve
    >>> serve("photos.idx", port=8080)   # doctest: +SKIP
    >> serving photos.idx (12345 images, token_r101, backend exact) at http://127.0.0.1:8080/
"""

from tokenret.serve.http import SearchServer, serve
from tokenret.serve.service import MAX_K, MAX_UPLOAD_BYTES, RequestError, SearchService

__all__ = ["MAX_K", "MAX_UPLOAD_BYTES", "RequestError", "SearchServer", "SearchService", "serve"]
