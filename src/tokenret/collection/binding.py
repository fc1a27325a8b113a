"""The model of a folder index: rebuilt from the index's record, checked against it once, and used to
describe query images exactly as the stored ones were described.

Checking a model means hashing every weight (:func:`tokenret.extraction.model_fingerprint`); a binding does
it once, so a search, a series of searches or a server pays it once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tokenret.aggregate.pipeline import LocalAggregateModel
from tokenret.collection.catalogue import IndexMismatchError
from tokenret.extraction import ExtractionConfig, extract_descriptors, model_fingerprint
from tokenret.extraction.network import weights_state
from tokenret.models.checkpoints import sha256sum
from tokenret.models.registry import create_model
from tokenret.rerank import alpha_query_expansion, superglobal_option

#: alpha of the alpha-QE that ``qe`` applies.
QE_ALPHA = 3.0


def extraction_config(settings: dict[str, Any], **runtime: Any) -> ExtractionConfig:
    """An index's extraction settings, with run-time options (device, batch size, workers) added."""
    return ExtractionConfig.from_fingerprint(settings["extraction"], **runtime)


def check_model(path: Path, settings: dict[str, Any], model: Any, config: Any = None) -> None:
    """Refuse a model or extraction settings other than the ones the index at ``path`` was made with."""
    if model_fingerprint(model) != settings["model_sha256"]:
        raise IndexMismatchError(
            f"{path} was made with {settings['model']} weights {settings['checkpoint']} "
            f"(sha256 {settings['model_sha256'][:12]}...); this model differs, so its descriptors "
            "are not comparable. Use the index's own model (ImageIndex.load_model / leave out --model)."
        )
    check_config(path, settings, config)


def check_config(path: Path, settings: dict[str, Any], config: Any) -> None:
    """Refuse extraction settings other than the index's (None: nothing to check)."""
    if config is not None and config.fingerprint() != settings["extraction"]:
        raise IndexMismatchError(
            f"{path} was made with extraction settings {settings['extraction']}, not {config.fingerprint()}"
        )


def load_index_model(settings: dict[str, Any], checkpoint: str | Path | None = None) -> Any:
    """Rebuild an index's model from its recorded checkpoint (or ``checkpoint``, another copy of the weights
    when the recorded file moved or was converted). The caller checks it against the index."""
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        if not ckpt.is_file():
            raise FileNotFoundError(f"no such weights file: {ckpt}")
    else:
        ckpt = Path(settings["checkpoint"])
        if not ckpt.is_file():
            raise FileNotFoundError(
                f"the index's weights {ckpt} are gone; pass the same file with --checkpoint"
            )
        if sha256sum(ckpt) != settings["checkpoint_sha256"]:
            raise IndexMismatchError(f"{ckpt} changed since the index was made (sha256 differs)")
    if settings["model"].startswith("local:"):  # local features + aggregator, one file
        return LocalAggregateModel.load(ckpt)
    return create_model(settings["model"], checkpoint=ckpt, **settings["model_kwargs"])


def check_search_options(qe: int, rerank: str | None, m: int, k: int, beta: float) -> None:
    """Refuse a re-ranking that does not exist or is out of range, and alpha-QE mixed with SuperGlobal's
    re-ranking (which expands the query its own way)."""
    if superglobal_option(rerank, m, k, beta) is not None and qe > 0:
        raise ValueError(
            "qe and rerank='superglobal' do not combine: SuperGlobal's re-ranking does its own query "
            "expansion (and database-side augmentation); use one of them"
        )


class ModelBinding:
    """An index and its model, checked against each other once.

    Args:
        index: the :class:`~tokenret.collection.ImageIndex`.
        model: the index's model; refused (:class:`IndexMismatchError`) when its weights differ.

    Example:
        >>> binding = index.bind(model)                                               # doctest: +SKIP
        >>> binding.search_images(["query.jpg", open("q2.jpg", "rb").read()], k=5)    # doctest: +SKIP
    """

    def __init__(self, index: Any, model: Any) -> None:
        check_model(index.path, index.settings, model)
        self.index = index
        self.model = model
        self.weights = weights_state(model)

    def still_valid(self, model: Any) -> bool:
        """True while ``model`` is the bound model with its weights unchanged since the check."""
        return model is self.model and weights_state(model) == self.weights

    def extraction_config(self, **runtime: Any) -> ExtractionConfig:
        return extraction_config(self.index.settings, **runtime)

    def describe(
        self, sources: Sequence[str | Path | bytes], boxes: Sequence[Any] | None = None, **runtime: Any
    ) -> np.ndarray:
        """Descriptors of query images (paths, or the bytes of image files), made like the stored ones.

        Raises:
            tokenret.extraction.ExtractionError: a query image could not be read.
        """
        config = self.extraction_config(**runtime)
        check_config(self.index.path, self.index.settings, config)
        return extract_descriptors(self.model, sources, boxes, config, progress=False).descriptors

    def search_images(
        self,
        sources: Sequence[str | Path | bytes],
        k: int = 20,
        boxes: Sequence[Any] | None = None,
        qe: int = 0,
        rerank: str | None = None,
        rerank_m: int = 400,
        rerank_k: int = 9,
        rerank_beta: float = 0.15,
        **runtime: Any,
    ) -> list[list[Any]]:
        """Search with query images (optionally a box each).

        Args:
            qe: > 0 adds alpha-QE over that many hits.
            rerank: ``"superglobal"`` re-ranks the best ``rerank_m`` hits by SuperGlobal's re-ranking
                (``rerank_k``, ``rerank_beta``; see :meth:`ImageIndex.search`). It does its own query
                expansion, so it is refused together with ``qe``.
        """
        check_search_options(qe, rerank, rerank_m, rerank_k, rerank_beta)  # before describing the queries
        q = self.describe(sources, boxes, **runtime)
        if qe > 0:
            _, ids = self.index.knn(q, qe)
            stored = self.index.vector_index()
            expanded = []
            for qi, row in zip(q, ids, strict=True):
                nb = stored.reconstruct(row[row >= 0]).astype(np.float32)
                expanded.append(alpha_query_expansion(qi[None], nb, len(nb), QE_ALPHA)[0])
            q = np.stack(expanded).astype(np.float32)
        return self.index.search(
            q, k, rerank=rerank, rerank_m=rerank_m, rerank_k=rerank_k, rerank_beta=rerank_beta
        )
