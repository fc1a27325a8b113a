"""The approximate-index cache of a folder index: the FAISS index (or Qdrant collection) kept beside the
catalogue, and the backend settings that choose it.

``ann/`` in the index directory holds a saved FaissIndex (index.json, index.faiss, ids.npy), ``state.json``
(the backend, the spec, the number of images and a fingerprint of the image set it covers) and
``covered.npz`` (the id and description time of each image it holds). It covers one state of the image set;
any addition, change or removal makes it stale, and a stale one is never searched. Only writers bring it up
to date (:meth:`AnnCache.update`, called by ``add_paths``/``sync``/``set_backend``): an IVF index in place
(removed and re-described images out, new ones in; no retraining) while the changes stay under
:data:`ANN_UPDATE_MAX_FRACTION` of the collection, otherwise (and for HNSW graphs, which cannot remove) by a
rebuild. Readers (:meth:`AnnCache.current`) load what is saved and never write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from tokenret.collection.catalogue import Catalogue
from tokenret.index import IndexFormatError, choose_index_spec, is_exact_spec, load_index
from tokenret.index.faiss_index import FaissIndex
from tokenret.index.qdrant_index import QdrantIndex, import_qdrant

log = logging.getLogger(__name__)

#: Folder of the approximate index inside an index directory, and its state file.
ANN_DIR = "ann"
ANN_STATE = "state.json"
#: (id, updated) of every image an approximate index holds: what an incremental update compares with.
ANN_COVERED = "covered.npz"
#: An approximate index is updated in place while the images added, changed and removed since it was built
#: stay under this fraction of the collection; beyond it it is rebuilt (retrained on the images as they are).
ANN_UPDATE_MAX_FRACTION = 0.5
#: HNSW search breadth of HNSW backends (faiss's default, 16, misses neighbours already at k = 10).
HNSW_EF_SEARCH = 128
#: Vectors upcast to float32 and added to an approximate index at a time while it is built.
BUILD_CHUNK = 65536


def qdrant_target(backend: str) -> dict[str, str | None] | None:
    """``{"url", "path", "collection"}`` of a ``qdrant:TARGET[#COLLECTION]`` backend (TARGET an http(s) URL
    of a Qdrant server or cluster, or a folder for Qdrant's local mode); None for any other backend."""
    if not isinstance(backend, str) or not backend.lower().startswith("qdrant:"):
        return None
    target, _, collection = backend[len("qdrant:") :].partition("#")
    if not target:
        raise ValueError(
            "a Qdrant backend names its server or folder: qdrant:http://HOST:6333[#COLLECTION] or "
            "qdrant:FOLDER[#COLLECTION]"
        )
    is_url = target.startswith(("http://", "https://"))
    return {
        "url": target if is_url else None,
        "path": None if is_url else target,
        "collection": collection or None,
    }


def default_qdrant_collection(index_path: Path) -> str:
    """The collection an index uses when its Qdrant backend names none: its folder name and a hash of its
    absolute path (two indexes never share one)."""
    path = Path(index_path).resolve()
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in path.name)[:40]
    return f"tokenret_{stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"


def resolve_backend(backend: str, n: int, dim: int) -> str:
    """The spec a backend setting means for ``n`` images of size ``dim``: "exact" or a FAISS string."""
    if backend == "auto":
        backend = choose_index_spec(n, dim)
    return "exact" if is_exact_spec(backend) else backend


def check_backend(backend: str, refine: int | None, dim: int) -> tuple[str, int | None]:
    """Check a backend choice; return it normalised (``"auto"``, ``"exact"`` or the FAISS string) with refine.

    Raises:
        ValueError: FAISS cannot build the spec for ``dim``, or ``refine`` is not a positive integer or is
            given for the exact backend.
    """
    if not isinstance(backend, str) or not backend.strip():
        raise ValueError(f"backend must be 'auto', 'exact' or a FAISS factory string, got {backend!r}")
    backend = backend.strip()
    if backend.lower() == "auto":
        backend = "auto"
    elif is_exact_spec(backend):
        backend = "exact"
    elif (target := qdrant_target(backend)) is not None:
        import_qdrant()  # the client is installed, or an ImportError with the install command
        if target["path"] is not None:  # a local folder: recorded absolute, whatever the working directory
            target["path"] = str(Path(target["path"]).expanduser().resolve())
        where = target["url"] or target["path"]
        backend = f"qdrant:{where}" + (f"#{target['collection']}" if target["collection"] else "")
    else:
        FaissIndex(backend, dim)  # raises ValueError naming a spec faiss cannot build
    if refine is not None:
        if isinstance(refine, bool) or not isinstance(refine, (int, np.integer)) or refine < 1:
            raise ValueError(f"refine is a number of candidates >= 1 (or None), got {refine!r}")
        if backend == "exact":
            raise ValueError(
                "refine re-scores the candidates of an approximate backend; exact search needs none"
            )
        refine = int(refine)
    return backend, refine


def add_rows(ann: Any, vecs: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> None:
    """Add the stored vectors at ``rows`` to an index (FAISS, Qdrant) under ``ids``, a chunk at a time."""
    for start in range(0, len(ids), BUILD_CHUNK):
        ann.add(
            np.asarray(vecs[rows[start : start + BUILD_CHUNK]], dtype=np.float32),
            ids[start : start + BUILD_CHUNK],
        )


class AnnCache:
    """The approximate index of one catalogue: what it must cover, its status, the loaded copy, and (for
    writers) bringing it up to date."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue
        self.path = catalogue.path
        self.dim = catalogue.dim
        self._ann: tuple[dict[str, Any], Any] | None = None  # (what it covers, the loaded index)

    @property
    def backend(self) -> str:
        return self.catalogue.settings.get("backend", "exact")

    def release(self) -> None:
        """Let go of the loaded approximate index (a Qdrant client holds a connection, or in local mode the
        folder's lock, which the next load needs)."""
        if self._ann is not None and hasattr(self._ann[1], "close"):
            self._ann[1].close()
        self._ann = None

    def wanted(self, backend: str | None = None) -> dict[str, Any] | None:
        """What a current approximate index for ``backend`` (default: the recorded one) must cover.

        None when searches are exact (or there is nothing to search).
        """
        fingerprint, n = self.catalogue.content_state()
        backend = self.backend if backend is None else backend
        spec = resolve_backend(backend, n, self.dim)
        if spec == "exact" or n == 0:
            return None
        return {"backend": backend, "spec": spec, "dim": self.dim, "n": n, "fingerprint": fingerprint}

    def status(self) -> str:
        """``"exact"`` (no approximate index needed), ``"current"``, ``"stale"`` or ``"missing"``."""
        want = self.wanted()
        if want is None:
            return "exact"
        state = self.read_state()
        if state is None:
            return "missing"
        return "current" if all(state.get(k) == v for k, v in want.items()) else "stale"

    def current(self) -> Any:
        """The approximate index over the current images, loaded if the saved one covers them; None for
        exact search, and None (with a warning) when it is missing or stale: a reader never writes, so the
        caller searches exactly until a writer (``tokenret index``) brings it up to date."""
        want = self.wanted()
        if want is None:
            return None
        if self._ann is not None and self._ann[0] == want:
            return self._ann[1]
        self.release()
        ann = self.load(want)
        if ann is None:
            log.warning(
                "%s: the approximate index %s; searching exactly (slower) until it is brought up to date "
                "with `tokenret index %s` (or ImageIndex.update_ann())",
                self.path,
                "is missing"
                if self.read_state() is None
                else "is out of date (images added, changed or removed)",
                self.path,
            )
            return None
        self._ann = (want, ann)
        return ann

    def update(self, want: dict[str, Any] | None) -> bool:
        """Bring the saved approximate index to ``want``: updated in place where possible, else rebuilt, and
        saved. Returns True if it was updated or (re)built."""
        if want is None:
            return False
        if self._ann is not None and self._ann[0] == want:
            return False
        state = self.read_state()
        if state is not None and all(state.get(k) == v for k, v in want.items()):
            return False
        self.release()
        ann = self.refresh(want, state)
        if ann is None:
            log.info(
                "building the approximate index %s over %d images in %s", want["spec"], want["n"], self.path
            )
            ann = self.build(want)
        self._ann = (want, ann)
        return True

    def read_state(self) -> dict[str, Any] | None:
        f = self.path / ANN_DIR / ANN_STATE
        try:
            state = json.loads(f.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("%s is unreadable (%s); the approximate index needs a rebuild", f, err)
            return None
        return state if isinstance(state, dict) else None

    def load(self, want: dict[str, Any]) -> Any:
        """The saved approximate index if it covers ``want``, else None."""
        state = self.read_state()
        if state is None or any(state.get(k) != v for k, v in want.items()):
            return None
        try:
            ann = load_index(self.path / ANN_DIR)
        except (IndexFormatError, OSError, RuntimeError) as err:
            log.warning("%s cannot be loaded (%s)", self.path / ANN_DIR, err)
            return None
        if ann.ntotal != want["n"] or self.read_state() != state:  # replaced while we read it
            return None
        return ann

    def build(self, want: dict[str, Any]) -> Any:
        """Build the FAISS index (or fill the Qdrant collection) over the stored vectors, save it under
        ``ann/`` and return it."""
        vecs, ids, rows, updated = self.catalogue.snapshot()
        spec = want["spec"]
        if qdrant_target(spec) is not None:
            ann = self.qdrant_index(spec)
            ann.clear()  # whatever the collection held before (an earlier build, another index's images)
        else:
            ann = FaissIndex(spec, self.dim)
            if ann.is_hnsw:
                ann.set_search_params(efSearch=HNSW_EF_SEARCH)
            n = len(ids)
            if not ann.is_trained:
                cap = max(ann.train_points_per_list * ann.nlist, BUILD_CHUNK)
                pick = np.sort(np.random.default_rng(ann.seed).choice(n, min(n, cap), replace=False))
                try:
                    ann.train(np.asarray(vecs[rows[pick]], dtype=np.float32))
                except ValueError as err:
                    raise ValueError(
                        f"{self.path}: cannot build the approximate index {spec!r} over {n} images: {err} "
                        "(set another backend: `tokenret index INDEX --backend auto`, 'exact' or 'HNSW32')"
                    ) from err
        add_rows(ann, vecs, ids, rows)
        self.save(ann, {**want, "rows": int(len(vecs)), "built": time.time()}, (ids, updated))
        return ann

    def qdrant_index(self, spec: str) -> QdrantIndex:
        """The Qdrant collection a ``qdrant:TARGET[#COLLECTION]`` backend names (by default one named after
        this index's folder)."""
        target = qdrant_target(spec)
        name = target["collection"] or default_qdrant_collection(self.path)
        where = {"url": target["url"]} if target["url"] else {"path": target["path"]}
        return QdrantIndex(self.dim, name, **where)

    def refresh(self, want: dict[str, Any], state: dict[str, Any] | None) -> Any:
        """The saved IVF index brought up to date in place: the images removed or re-described since it was
        built leave it, new and re-described ones are added (its lists and codebooks stay valid for new
        vectors of the same kind), and it is saved again. None where that does not apply (another spec, an
        HNSW graph, which cannot remove, no record of what it holds, or too many changes): rebuild then."""
        if state is None or any(state.get(k) != want[k] for k in ("backend", "spec", "dim")):
            return None
        try:
            with np.load(self.path / ANN_DIR / ANN_COVERED, allow_pickle=False) as f:
                old_ids, old_updated = f["ids"], f["updated"]
            ann = load_index(self.path / ANN_DIR)
        except (IndexFormatError, OSError, RuntimeError, KeyError, ValueError):
            return None
        # a Qdrant collection takes removals and additions as they come, however many
        qdrant = qdrant_target(want["spec"]) is not None
        updatable = qdrant or (not ann.is_hnsw and ann.nlist)
        if not updatable or ann.ntotal != len(old_ids) or self.read_state() != state:
            if hasattr(ann, "close"):
                ann.close()
            return None
        vecs, ids, rows, updated = self.catalogue.snapshot()
        common, i_old, i_new = np.intersect1d(old_ids, ids, assume_unique=True, return_indices=True)
        same = common[old_updated[i_old] == updated[i_new]]
        gone = old_ids[~np.isin(old_ids, same)]
        new = ~np.isin(ids, same)
        if not qdrant and len(gone) + int(new.sum()) > ANN_UPDATE_MAX_FRACTION * max(len(ids), 1):
            return None
        log.info(
            "updating the approximate index %s in %s: %d images out, %d in",
            *(want["spec"], self.path, len(gone), int(new.sum())),
        )
        ann.remove(gone)
        add_rows(ann, vecs, ids[new], rows[new])
        built = {"built": state.get("built"), "updated": time.time()}
        self.save(ann, {**want, "rows": int(len(vecs)), **built}, (ids, updated))
        return ann

    def save(self, ann: Any, state: dict[str, Any], covered: tuple[np.ndarray, np.ndarray]) -> None:
        """Write ``ann/`` by renaming a finished folder into place, so a reader never sees half of it."""
        tmp = self.path / f".ann-new-{os.getpid()}-{secrets.token_hex(4)}"
        old = self.path / f".ann-old-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            ann.save(tmp)
            np.savez(tmp / ANN_COVERED, ids=covered[0], updated=covered[1])
            (tmp / ANN_STATE).write_text(json.dumps(state, indent=1) + "\n")
            try:
                os.replace(self.path / ANN_DIR, old)
            except FileNotFoundError:
                pass  # first build, or another process is swapping its own build in
            os.replace(tmp, self.path / ANN_DIR)
        except OSError as err:
            log.warning(
                "could not save the approximate index in %s (%s): it is searched from memory this time",
                self.path / ANN_DIR,
                err,
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)

    def drop(self) -> None:
        """Delete the saved approximate index (the backend became exact)."""
        self.release()
        if (self.path / ANN_DIR).exists():
            shutil.rmtree(self.path / ANN_DIR)
