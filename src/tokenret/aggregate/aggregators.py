"""The three ways of turning descriptor sets into a ranking, behind one small interface.

* :class:`AsmkAggregator` - ASMK / ASMK* over a large codebook, scored through an inverted file;
* :class:`VladAggregator` - VLAD over a small codebook, one global vector per image;
* :class:`TokenAggregator` - Token's head applied to the set (a trained ``token_set_*`` model), one
  global vector per image.

Each has ``prepare(database_sets)`` (learns what it must from the database when nothing was given, e.g.
a codebook, with a warning: HOW trains it on other images), and either ``encode(sets) -> (n, D)``
(``global_vectors = True``: ranked by dot product, so QE/DBA apply) or ``scores(database_sets, query_sets)
-> (n_db, n_q)``.

Example:
    >>> agg = AsmkAggregator(Codebook.load("how_r50_65k.npy"))                      # doctest: +SKIP
    >>> scores = agg.scores(database_sets, query_sets)                               # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from tokenret.aggregate.asmk import AsmkIndex
from tokenret.aggregate.codebook import DEFAULT_SEED, MAX_POINTS_PER_CENTROID, Codebook
from tokenret.aggregate.vlad import VladEncoder
from tokenret.data.local_store import pad_sets

log = logging.getLogger(__name__)

#: Descriptors drawn per visual word when a codebook is learned from a database (faiss's own cap).
CODEBOOK_SAMPLES_PER_WORD = MAX_POINTS_PER_CENTROID


def learn_codebook(sets: Sequence[np.ndarray], size: int, seed: int = DEFAULT_SEED) -> Codebook:
    """k-means codebook from the union of ``sets`` (sub-sampled to 256 descriptors per word)."""
    non_empty = [np.asarray(s, np.float32) for s in sets if len(s)]
    if not non_empty:
        raise ValueError(
            "no local descriptors to learn a codebook from: every set is empty (unreadable images, or a "
            "selection that keeps nothing, e.g. DELF's score threshold with untrained attention)"
        )
    x = np.concatenate(non_empty)
    return Codebook.train(x, size, seed=seed, max_descriptors=CODEBOOK_SAMPLES_PER_WORD * int(size))


class _CodebookAggregator:
    def __init__(self, codebook: Codebook | None, codebook_size: int | None, seed: int) -> None:
        if codebook is None and codebook_size is None:
            raise ValueError(
                "give a codebook (a file from `tokenret codebook`) or a codebook_size to learn one"
            )
        self.codebook, self.codebook_size, self.seed = codebook, codebook_size, seed
        self._given = codebook is not None
        self._learned_from: Sequence[np.ndarray] | None = None

    @property
    def needs_preparation(self) -> bool:
        return not self._given

    def prepare(self, database_sets: Sequence[np.ndarray]) -> None:
        """Without a given codebook, learn one from this database (each evaluated database its own: one
        dataset's words are not carried over to the next); a given codebook is used as it is."""
        if self._given or self._learned_from is database_sets:
            return
        log.warning(
            "learning a %d-word codebook from the evaluated database itself: numbers are not comparable "
            "with published ones (HOW learns it on SfM-120k); pass --codebook FILE made on other images",
            self.codebook_size,
        )
        self.codebook = learn_codebook(database_sets, int(self.codebook_size), self.seed)
        self._learned_from = database_sets


class AsmkAggregator(_CodebookAggregator):
    """ASMK* (``binary=True``, HOW's setting) or ASMK over a codebook; defaults are HOW's."""

    name = "asmk"
    global_vectors = False

    def __init__(
        self,
        codebook: Codebook | None = None,
        *,
        codebook_size: int | None = None,
        binary: bool = True,
        alpha: float = 3.0,
        tau: float = 0.0,
        use_idf: bool = False,
        query_assignment: int = 5,
        database_assignment: int = 1,
        seed: int = DEFAULT_SEED,
    ) -> None:
        super().__init__(codebook, codebook_size, seed)
        self.options = {
            "binary": binary,
            "alpha": alpha,
            "tau": tau,
            "use_idf": use_idf,
            "query_assignment": query_assignment,
            "database_assignment": database_assignment,
        }

    def build_index(self, database_sets: Sequence[np.ndarray]) -> AsmkIndex:
        self.prepare(database_sets)
        opts = dict(self.options)
        k = self.codebook.size
        opts["query_assignment"] = min(opts["query_assignment"], k)
        opts["database_assignment"] = min(opts["database_assignment"], k)
        index = AsmkIndex(self.codebook, **opts)
        index.add([np.asarray(s, np.float32) for s in database_sets])
        return index

    def scores(self, database_sets: Sequence[np.ndarray], query_sets: Sequence[np.ndarray]) -> np.ndarray:
        """(n_db, n_q) ASMK similarities."""
        index = self.build_index(database_sets)
        out = np.zeros((len(database_sets), len(query_sets)), np.float32)
        for j, q in enumerate(query_sets):
            out[:, j] = index.score_all(np.asarray(q, np.float32))
        return out

    def settings(self) -> dict[str, Any]:
        return {
            "aggregator": self.name,
            "codebook_size": self.codebook.size if self.codebook else None,
            **self.options,
        }


class VladAggregator(_CodebookAggregator):
    """VLAD (hard assignment, optional signed power and intra-normalisation, global L2)."""

    name = "vlad"
    global_vectors = True

    def __init__(
        self,
        codebook: Codebook | None = None,
        *,
        codebook_size: int | None = None,
        power: float | None = None,
        intra_normalize: bool = True,
        seed: int = DEFAULT_SEED,
    ) -> None:
        super().__init__(codebook, codebook_size, seed)
        self.power, self.intra_normalize = power, intra_normalize

    def encode(self, sets: Sequence[np.ndarray]) -> np.ndarray:
        if self.codebook is None:
            raise RuntimeError("VLAD has no codebook yet: call prepare(database_sets) or give one")
        encoder = VladEncoder(self.codebook, power=self.power, intra_normalize=self.intra_normalize)
        return encoder.encode_many([np.asarray(s, np.float32) for s in sets])

    def settings(self) -> dict[str, Any]:
        return {
            "aggregator": self.name,
            "codebook_size": self.codebook.size if self.codebook else None,
            "power": self.power,
            "intra_normalize": self.intra_normalize,
        }


class TokenAggregator:
    """Token's head on descriptor sets: a model mapping (B, N, C) + padding mask to L2-normalised (B, D).

    Args:
        model: e.g. ``create_model("token_set_how_r101", checkpoint=...)``.
        max_n: descriptors used per set (the strongest first, as stores keep them); None: all.
        batch_size: sets per forward pass (sorted by size so padding stays small).
    """

    name = "token"
    global_vectors = True
    needs_preparation = False

    def __init__(
        self, model: nn.Module, *, max_n: int | None = None, batch_size: int = 32, device: str | None = None
    ) -> None:
        self.model, self.max_n, self.batch_size = model.eval(), max_n, int(batch_size)
        self.device = torch.device(device) if device else next(model.parameters()).device

    def prepare(self, database_sets: Sequence[np.ndarray]) -> None:
        return None

    @torch.inference_mode()
    def encode(self, sets: Sequence[np.ndarray]) -> np.ndarray:
        self.model.to(self.device)
        dim = int(self.model.descriptor_dim)
        out = np.zeros((len(sets), dim), np.float32)
        lengths = np.array([min(len(s), self.max_n or len(s)) for s in sets])
        empty = np.flatnonzero(lengths == 0)
        if len(empty):
            log.warning("%d set(s) are empty (unreadable images?): their descriptors are zero", len(empty))
        order = [i for i in np.argsort(-lengths, kind="stable") if lengths[i] > 0]
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            x, padding = pad_sets([sets[i] for i in idx], max_n=self.max_n)
            d = self.model(x.to(self.device), padding.to(self.device))
            out[idx] = d.float().cpu().numpy()
        return out

    def settings(self) -> dict[str, Any]:
        return {
            "aggregator": self.name,
            "model": getattr(self.model, "model_name", type(self.model).__name__),
            "model_kwargs": getattr(self.model, "model_kwargs", {}),
            "max_n": self.max_n,
        }


AGGREGATORS = ("asmk", "vlad", "token")

__all__ = ["AGGREGATORS", "AsmkAggregator", "TokenAggregator", "VladAggregator", "learn_codebook"]
