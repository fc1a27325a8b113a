"""Search beyond one machine: a tokenret index kept in a Qdrant collection.

Qdrant (https://qdrant.tech) is an existing vector search engine that shards and replicates a collection
over a cluster of machines. :class:`QdrantIndex` puts it behind tokenret's index interface (``add``,
``search``, ``remove``, ``save``, ``load``), so everything written for :class:`~tokenret.index.ExactIndex`
or :class:`~tokenret.index.FaissIndex` works with a cluster: descriptors are scored by inner product
(``Distance.DOT``, the cosine of unit descriptors) and results follow the same conventions (best first, ties
by increasing id among the returned points, padding ``-inf`` / ``-1``).

Where the data lives: in the Qdrant server (``url=``), in a local folder (``path=``, Qdrant's embedded
"local mode", one process at a time) or in memory (``location=":memory:"``, for tests). ``save(dir)`` writes
only the connection (url or path, collection, search settings) into ``dir/index.json``; the vectors stay in
Qdrant. API keys are never written: they are read from ``$QDRANT_API_KEY`` when an index is loaded.

Needs ``pip install qdrant-client`` (the ``qdrant`` extra).

Example:
    >>> from tokenret.index.qdrant_index import QdrantIndex                          # doctest: +SKIP
    >>> index = QdrantIndex(1024, url="http://qdrant-1:6333", collection="photos",
    ...                     shard_number=6, replication_factor=2)                    # doctest: +SKIP
    >>> index.add(descriptors, ids)                                                   # doctest: +SKIP
    >>> scores, ids = index.search(query_descriptors, 100)                            # doctest: +SKIP
    >>> index.save("photos.qdrant")      # later: tokenret.index.load_index("photos.qdrant")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from tokenret.index.base import (
    IndexFormatError,
    VectorIndex,
    as_float32_matrix,
    as_id_array,
    check_k,
    new_ids,
    sort_results,
    write_header,
)

#: Points sent to Qdrant per request when adding.
UPSERT_BATCH = 512
#: Queries sent per batched search request.
QUERY_BATCH = 64


def import_qdrant():
    """(qdrant_client, qdrant_client.models), or an ImportError naming the install command."""
    try:
        import qdrant_client
        from qdrant_client import models
    except ImportError as err:  # optional dependency
        raise ImportError(
            "QdrantIndex needs the Qdrant client: pip install qdrant-client (or 'tokenret[qdrant]')"
        ) from err
    return qdrant_client, models


class QdrantIndex(VectorIndex):
    """A k-NN index stored in a Qdrant collection (a cluster, a local folder or memory).

    Args:
        dim: descriptor dimension; an existing collection must have vectors of this size.
        collection: collection name; created (``Distance.DOT``) when missing, else reused.
        url: a Qdrant server or cluster, e.g. ``"http://qdrant-1:6333"``.
        path: a folder for Qdrant's embedded local mode (no server; one process at a time).
        location: ``":memory:"`` for an in-memory local mode (tests; cannot be saved).
        api_key: for a secured server (default ``$QDRANT_API_KEY``); never written to disk.
        exact: search by a full scan instead of Qdrant's HNSW graph (recall 1, slower).
        hnsw_ef: HNSW search breadth (Qdrant's default when None); ignored with ``exact``.
        shard_number, replication_factor: how a new collection is spread over a cluster.
        timeout: seconds per request to a server.

    Exactly one of ``url``, ``path`` and ``location`` is given.
    """

    kind = "qdrant"

    def __init__(
        self,
        dim: int,
        collection: str = "tokenret",
        *,
        url: str | None = None,
        path: str | os.PathLike | None = None,
        location: str | None = None,
        api_key: str | None = None,
        exact: bool = False,
        hnsw_ef: int | None = None,
        shard_number: int | None = None,
        replication_factor: int | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__(dim)
        if sum(x is not None for x in (url, path, location)) != 1:
            raise ValueError(
                "give exactly one of url= (a Qdrant server), path= (local mode) or location=':memory:'"
            )
        if location is not None and location != ":memory:":
            raise ValueError(f"location must be ':memory:' (use url= or path= otherwise), got {location!r}")
        if not isinstance(collection, str) or not collection:
            raise ValueError(f"collection must be a non-empty name, got {collection!r}")
        if hnsw_ef is not None and int(hnsw_ef) < 1:
            raise ValueError(f"hnsw_ef must be >= 1, got {hnsw_ef}")
        qdrant_client, self._models = import_qdrant()
        self.collection = collection
        self.url = url
        self.path = str(Path(path).resolve()) if path is not None else None
        self.location = location
        self.exact = bool(exact)
        self.hnsw_ef = int(hnsw_ef) if hnsw_ef is not None else None
        api_key = api_key if api_key is not None else os.environ.get("QDRANT_API_KEY")
        if url is not None:
            self._client = qdrant_client.QdrantClient(url=url, api_key=api_key, timeout=timeout)
        elif path is not None:
            try:
                self._client = qdrant_client.QdrantClient(path=self.path)
            except RuntimeError as err:  # the folder's lock: local mode serves one client at a time
                raise ConnectionError(
                    f"Qdrant's local folder {self.path} is in use by another client ({err}) Local mode "
                    "allows one at a time: stop the other process (a running `tokenret serve`, say), or use "
                    "a Qdrant server (qdrant:http://HOST:6333) for concurrent access."
                ) from err
        else:
            self._client = qdrant_client.QdrantClient(location=":memory:")
        self._next_id: int | None = None  # max id + 1, found on the first add() without ids
        try:
            self._open_collection(shard_number, replication_factor)
        except IndexFormatError:
            raise
        except Exception as err:
            if url is None:
                raise
            raise ConnectionError(
                f"cannot use Qdrant at {url} (collection {collection!r}): {type(err).__name__}: {err}. "
                "Is the server running and reachable, and is $QDRANT_API_KEY set if it needs a key?"
            ) from err

    def _open_collection(self, shard_number: int | None, replication_factor: int | None) -> None:
        m = self._models
        if not self._client.collection_exists(self.collection):
            self._client.create_collection(
                self.collection,
                vectors_config=m.VectorParams(size=self.dim, distance=m.Distance.DOT),
                shard_number=shard_number,
                replication_factor=replication_factor,
            )
            return
        params = self._client.get_collection(self.collection).config.params.vectors
        if not isinstance(params, m.VectorParams):
            raise IndexFormatError(
                f"Qdrant collection {self.collection!r} has named or multiple vectors ({params}); "
                "tokenret needs one unnamed vector per point: choose another collection name"
            )
        if params.size != self.dim or params.distance != m.Distance.DOT:
            raise IndexFormatError(
                f"Qdrant collection {self.collection!r} holds {params.size}-d vectors scored by "
                f"{params.distance.value}; this index needs {self.dim}-d vectors scored by Dot: "
                "choose another collection name or delete that collection"
            )

    # -- the interface ------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return int(self._client.count(self.collection, exact=True).count)

    def _present(self, ids: np.ndarray) -> np.ndarray:
        """The ids among ``ids`` that the collection holds."""
        found = []
        for start in range(0, len(ids), 4096):
            part = [int(i) for i in ids[start : start + 4096]]
            found += [int(p.id) for p in self._client.retrieve(self.collection, part, with_payload=False)]
        return np.asarray(found, dtype=np.int64)

    def _max_id(self) -> int:
        """The largest id in the collection, -1 when empty (one scroll over the ids, no vectors)."""
        best, offset = -1, None
        while True:
            points, offset = self._client.scroll(
                self.collection, limit=10_000, offset=offset, with_payload=False, with_vectors=False
            )
            if points:
                best = max(best, max(int(p.id) for p in points))
            if offset is None:
                return best

    def add(self, vectors: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        x = as_float32_matrix(vectors, self.dim, "vectors")
        if ids is None:
            if self._next_id is None:
                self._next_id = self._max_id() + 1
            ids = new_ids(None, len(x), np.empty(0, np.int64), self._next_id)
        else:
            ids = as_id_array(ids)
            ids = new_ids(ids, len(x), self._present(ids), 0)
        m = self._models
        for start in range(0, len(x), UPSERT_BATCH):
            stop = start + UPSERT_BATCH
            batch = m.Batch(ids=ids[start:stop].tolist(), vectors=x[start:stop].tolist())
            self._client.upsert(self.collection, points=batch, wait=True)
        if len(ids) and self._next_id is not None:
            self._next_id = max(self._next_id, int(ids.max()) + 1)
        return ids

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = check_k(k)
        q = as_float32_matrix(np.atleast_2d(queries), self.dim, "queries")
        m = self._models
        params = None  # Qdrant's local mode always scans every vector (and warns about search params)
        if self.url is not None and (self.exact or self.hnsw_ef is not None):
            params = m.SearchParams(exact=True) if self.exact else m.SearchParams(hnsw_ef=self.hnsw_ef)
        scores = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        for start in range(0, len(q), QUERY_BATCH):
            requests = [
                m.QueryRequest(query=row.tolist(), limit=k, params=params, with_payload=False)
                for row in q[start : start + QUERY_BATCH]
            ]
            for i, answer in enumerate(self._client.query_batch_points(self.collection, requests=requests)):
                points = answer.points[:k]
                scores[start + i, : len(points)] = [p.score for p in points]
                ids[start + i, : len(points)] = [int(p.id) for p in points]
        return sort_results(scores, ids, k)

    def remove(self, ids: np.ndarray) -> int:
        ids = np.unique(as_id_array(ids))
        present = self._present(ids)
        if len(present):
            selector = self._models.PointIdsList(points=present.tolist())
            self._client.delete(self.collection, points_selector=selector, wait=True)
        return len(present)

    def save(self, path: str | os.PathLike) -> None:
        if self.location == ":memory:":
            raise ValueError(
                "an in-memory Qdrant collection cannot be saved: create the QdrantIndex with url= (a server) "
                "or path= (local mode)"
            )
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_header(
            path,
            self.kind,
            self.dim,
            self.ntotal,
            collection=self.collection,
            url=self.url,
            qdrant_path=self.path,
            exact=self.exact,
            hnsw_ef=self.hnsw_ef,
        )

    @classmethod
    def _load_dir(cls, path: Path, header: dict[str, Any]) -> QdrantIndex:
        url, qdrant_path = header.get("url"), header.get("qdrant_path")
        if (url is None) == (qdrant_path is None) or not header.get("collection"):
            raise IndexFormatError(
                f"{path}/index.json: a qdrant index needs a collection and one of url or qdrant_path"
            )
        return cls(
            int(header["dim"]),
            header["collection"],
            url=url,
            path=qdrant_path,
            exact=bool(header.get("exact", False)),
            hnsw_ef=header.get("hnsw_ef"),
        )

    def clear(self) -> None:
        """Remove every point: the collection is dropped and created again, empty, with the same settings."""
        info = self._client.get_collection(self.collection).config.params
        self._client.delete_collection(self.collection)
        self._open_collection(info.shard_number, info.replication_factor)
        self._next_id = 0

    def close(self) -> None:
        """Release the client (in local mode, the folder's lock, so another process may open it)."""
        self._client.close()

    def __repr__(self) -> str:
        where = self.url or self.path or self.location
        return f"QdrantIndex(dim={self.dim}, collection={self.collection!r}, at={where!r})"


__all__ = ["QdrantIndex"]
