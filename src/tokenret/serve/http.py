"""Running the API: uvicorn serving :func:`~tokenret.serve.app.create_app`, in the foreground
(``tokenret serve``) or on a background thread (:class:`SearchServer`, for programs and tests).

uvicorn caps connections (``Limits.max_connections``: beyond it new requests get 503) and closes idle
kept-alive connections (``Limits.keep_alive``); the application bounds each request body (size, stall,
total time) and the search queue.

Example:
    >>> service = SearchService.open("photos.idx")                    # doctest: +SKIP
    >>> with SearchServer(service, "127.0.0.1", 0) as server:          # doctest: +SKIP
    ...     print(server.url)                                           # a free port was picked
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from tokenret.serve.app import Limits, create_app
from tokenret.serve.service import SearchService

log = logging.getLogger(__name__)

#: Environment variable holding the API key when ``--api-key`` is not given.
API_KEY_ENV = "TOKENRET_API_KEY"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SearchServer:
    """The API on a socket bound at construction (port 0 picks a free port), served by uvicorn.

    Use :meth:`serve_forever` in the foreground, or ``with SearchServer(...) as server:`` to run it on a
    background thread until the block ends.

    Args:
        service: what the server answers with (not closed by the server).
        host: address to listen on.
        port: port to listen on (0: a free one).
        api_key: required on every request when set.
        limits: timeouts and caps (:class:`~tokenret.serve.app.Limits`).
        log_level: uvicorn's log level.
    """

    def __init__(
        self,
        service: SearchService,
        host: str = "127.0.0.1",
        port: int = 8080,
        api_key: str | None = None,
        limits: Limits | None = None,
        log_level: str = "warning",
    ) -> None:
        self.service = service
        self.limits = limits or Limits()
        self.app = create_app(service, api_key=api_key, limits=self.limits)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=512)
        config = uvicorn.Config(
            self.app,
            log_level=log_level,
            access_log=False,
            lifespan="off",
            server_header=False,
            limit_concurrency=self.limits.max_connections,
            timeout_keep_alive=int(max(1, self.limits.keep_alive)),
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The server's address, ``http://HOST:PORT/`` (with the port actually bound)."""
        host, port = self.socket.getsockname()[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def serve_forever(self) -> None:
        """Serve until interrupted (Ctrl-C) or :meth:`shutdown`."""
        self.server.run(sockets=[self.socket])

    def start(self, timeout: float = 30) -> SearchServer:
        """Serve on a background thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self.serve_forever, name="tokenret-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.01)
        return self

    def shutdown(self) -> None:
        """Stop serving (finishing the requests in flight) and close the socket."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        self.socket.close()

    def __enter__(self) -> SearchServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def serve(
    index: str | Path,
    host: str = "127.0.0.1",
    port: int = 8080,
    checkpoint: str | Path | None = None,
    device: str | None = None,
    api_key: str | None = None,
    limits: Limits | None = None,
    model: Any = None,
    **options: Any,
) -> None:
    """Serve an index until interrupted (Ctrl-C): ``tokenret serve``.

    Args:
        index: the index folder; its own model is loaded (from ``checkpoint`` when the recorded file
            moved).
        host: address to listen on (``0.0.0.0`` for every interface: warns unless an API key is set).
        port: port to listen on (0 picks a free one).
        device: where queries are described (default: cuda if available).
        api_key: required on every request (default: ``$TOKENRET_API_KEY``; empty: none).
        limits: request timeouts and the connection cap.
        model: the index's model already built and checked (default: loaded from the index).
        options: :class:`SearchService` options (``max_upload_bytes``, ``max_pixels``, ``max_batch``,
            ``batch_window``, ``max_queue``).

    Example:
        >>> serve("photos.idx", port=8080)   # doctest: +SKIP
        >> serving photos.idx (12345 images, token_r101, backend exact) at http://127.0.0.1:8080/ ...
    """
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    if not is_loopback(host) and not api_key:
        print(
            f"tokenret: warning: serving on {host} with no authentication: anyone who can reach port {port} "
            f"can search the index and download its images; set --api-key or ${API_KEY_ENV}",
            file=sys.stderr,
            flush=True,
        )
    service = SearchService.open(index, checkpoint, device, model=model, **options)
    try:
        server = SearchServer(service, host, port, api_key=api_key, limits=limits)
        s = service.index.settings
        print(
            f">> serving {service.index.path} ({len(service.index)} images, {s['model']}, backend "
            f"{service.index.backend_spec()}) at {server.url}"
            f"{' (API key required)' if api_key else ''} (Ctrl-C stops)",
            flush=True,
        )
        try:
            server.serve_forever()  # uvicorn stops on Ctrl-C by itself (SIGINT handler)
        except KeyboardInterrupt:
            pass
        finally:
            server.socket.close()
        print(">> stopped")
    finally:
        service.close()
