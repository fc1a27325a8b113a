"""Local-feature aggregators at one collection size: memory per image and query time of ASMK*, VLAD, Token.

The three ways tokenret turns sets of local descriptors (HOW / DELF style, 128-d, n per image) into a
ranking, on the same synthetic collection of N images:

* **ASMK*** (HOW's setting: binary codes, alpha 3, tau 0, 5 words per query descriptor, 1 per database
  descriptor) over a large k-means codebook, scored through :class:`tokenret.aggregate.AsmkIndex`;
* **VLAD** over a small codebook (64 words -> 8192-d), intra-normalised, in an :class:`ExactIndex`;
  also **VLAD + PCA** to 1024-d (PCA learned on held-out images);
* **Token**: :class:`~tokenret.models.token.SetTokenModel` (Token's head on a set, 1024-d out) with
  RANDOM weights, in an :class:`ExactIndex`. Random weights cost the same time as trained ones (the
  same matrix products), but its rankings mean nothing; its quality column is only a sanity number.

For each it measures: offline training (codebook k-means, PCA), database build (aggregation or encoding
of every image + index build), memory per image as the index stores it (and the sizes it would take in
other layouts), and per-query latency of ONE query at a time, end to end: the query's aggregation or
encoding + the search returning the top k (median and p90 over queries x repeats, with the split).
Checks: ASMK's inverted file against a brute-force :func:`asmk_similarity` over every database image;
``ExactIndex`` top k against float32 brute force; mAP@k against the synthetic ground truth.

Synthetic data (not i.i.d. noise, so that rankings are non-trivial): a pool of "visual patterns"
(unit centres in 128-d, grouped in families so that nearby patterns exist); a small part of the pool is
"background" (sky, foliage...) shared by every image with Zipf-like popularity; an "object" owns a few
hundred of the other patterns. An image of an object sees a random 60% of its patterns ("view") and
draws ``fg`` of its n descriptors from them (so several per pattern, bursty like real images), the rest
from the background. Each descriptor is ``normalise(centre + noise)``: unit norm, like DELF (HOW's are
whitened, not normalised; the Token set model L2-normalises its input anyway). Database image i shows
object ``i % n_objects``; query j shows object j with a view and background of its own; its positives
are the database images of that object (N / n_objects of them). Codebooks and the PCA are learned on
images of other objects.

Usage:
    nice -n 10 python bench/aggregators.py                          # N 5000, n 1000 (~13 min, 2 vCPUs)
    python bench/aggregators.py --n-images 1000 --n-desc 300 --token-encode 0     # quick run (~4 min)
    python bench/aggregators.py --n-images 1000 --methods asmk --asmk-words 65536 --kmeans-per-word 4
                                                                    # HOW's codebook size (~13 min)
"""

from __future__ import annotations

import os

# Set before torch and faiss load their two separate OpenMP runtimes: by default idle OpenMP threads
# spin while waiting for work, so the runtime that is not running (and the neighbours' jobs on this
# shared 2-vCPU machine) lose their cores to busy-waiting; single-query latencies were many times worse
# in bench/search.py. Set OMP_WAIT_POLICY=ACTIVE in the environment to measure the default behaviour.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json
import logging
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from machine import describe_machine  # bench/machine.py, beside this script
from torch import nn

from tokenret.aggregate import AsmkIndex, Codebook, VladEncoder, VladPCA, asmk_similarity, pad_sets
from tokenret.index import ExactIndex
from tokenret.models.token import Attention, SetTokenModel

log = logging.getLogger("bench.aggregators")

DIM = 128  # HOW / DELF local descriptor dimension

# rng stream of each kind of image (database, query, training) so that they never coincide
DATABASE, QUERY, TRAIN = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# Synthetic local descriptors


class SyntheticLocalFeatures:
    """Deterministic sets of unit 128-d local descriptors of images of "objects" (module docstring).

    Args:
        n_desc: descriptors per image (HOW keeps n = 1000).
        n_objects: objects of the database and queries (images of other objects train codebooks).
        n_patterns: size of the pattern pool; the first ``n_background`` are background.
        object_patterns: patterns owned by one object.
        fg: fraction of an image's descriptors drawn from its object.
        noise: norm of the per-descriptor perturbation (relative to the unit pattern centre).
    """

    def __init__(
        self,
        n_desc: int,
        n_objects: int,
        *,
        n_patterns: int = 50_000,
        n_families: int = 1024,
        n_background: int = 5_000,
        object_patterns: int = 200,
        view: float = 0.6,
        fg: float = 0.4,
        noise: float = 0.6,
        seed: int = 0,
    ) -> None:
        rng = np.random.default_rng([seed, 9])
        families = _unit(rng.standard_normal((n_families, DIM), dtype=np.float32))
        own = _unit(rng.standard_normal((n_patterns, DIM), dtype=np.float32))
        # patterns of one family have similarity ~0.5: a codebook word holds several similar patterns
        self.centres = _unit(families[rng.integers(0, n_families, n_patterns)] + own)
        weights = 1.0 / np.arange(1, n_background + 1) ** 0.8  # Zipf-like popularity of the background
        self.background_p = weights / weights.sum()
        self.n_desc, self.n_objects, self.seed = int(n_desc), int(n_objects), seed
        self.n_patterns, self.n_background = n_patterns, n_background
        self.object_patterns, self.view, self.fg, self.noise = object_patterns, view, fg, noise

    def patterns_of(self, obj: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 3, obj])
        return rng.choice(np.arange(self.n_background, self.n_patterns), self.object_patterns, replace=False)

    def image(self, kind: int, index: int, obj: int) -> np.ndarray:
        """(n_desc, 128) float32 unit descriptors of image ``index`` of stream ``kind`` showing ``obj``."""
        rng = np.random.default_rng([self.seed, kind, index])
        own = self.patterns_of(obj)
        seen = rng.choice(own, max(1, round(self.view * len(own))), replace=False)
        n_fg = round(self.fg * self.n_desc)
        labels = np.concatenate(
            [
                rng.choice(seen, n_fg),
                rng.choice(self.n_background, self.n_desc - n_fg, p=self.background_p),
            ]
        )
        noise = rng.standard_normal((self.n_desc, DIM), dtype=np.float32) * (self.noise / np.sqrt(DIM))
        return _unit(self.centres[labels] + noise)

    def database(self, i: int) -> np.ndarray:
        return self.image(DATABASE, i, i % self.n_objects)

    def query(self, j: int) -> np.ndarray:
        return self.image(QUERY, j, j % self.n_objects)

    def training(self, i: int) -> np.ndarray:
        return self.image(TRAIN, i, self.n_objects + i)  # objects outside the database and queries


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


# ---------------------------------------------------------------------------------------------
# Measuring


def latencies(
    queries: list[np.ndarray], encode: Callable, search: Callable, k: int, repeats: int
) -> tuple[dict, np.ndarray]:
    """Per-query time of ``search(encode(q), k)``, one query at a time; returns stats and the top-k ids."""
    search(encode(queries[0]), k)  # warm-up (allocator, faiss / oneDNN caches, index finalisation)
    total, enc, srch = [], [], []
    ids = []
    for r in range(repeats):
        for q in queries:
            t0 = time.perf_counter()
            e = encode(q)
            t1 = time.perf_counter()
            _, found = search(e, k)
            t2 = time.perf_counter()
            total.append(t2 - t0)
            enc.append(t1 - t0)
            srch.append(t2 - t1)
            if r == 0:
                ids.append(np.asarray(found).reshape(-1))
    ms = lambda xs, p: 1e3 * float(np.percentile(xs, p))  # noqa: E731
    stats = {
        "query_ms_median": ms(total, 50),
        "query_ms_p90": ms(total, 90),
        "query_ms_min": 1e3 * min(total),
        "encode_ms_median": ms(enc, 50),
        "search_ms_median": ms(srch, 50),
        "timed_queries": len(total),
    }
    return stats, np.stack(ids)


def map_at_k(found: np.ndarray, positives: list[np.ndarray], k: int) -> float:
    """Mean over queries of AP over the top k (positives beyond k count as missed)."""
    aps = []
    for row, pos in zip(found, positives, strict=True):
        hit = np.isin(row[:k], pos)
        precision = np.cumsum(hit) / np.arange(1, len(hit) + 1)
        aps.append(float((precision * hit).sum() / max(1, min(len(pos), k))))
    return float(np.mean(aps))


def top_k_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean fraction of ids shared by the rows of two (nq, k) id arrays."""
    return float(np.mean([len(np.intersect1d(x, y)) / len(x) for x, y in zip(a, b, strict=True)]))


def exact_vs_float32(
    index: ExactIndex, db: np.ndarray, queries: np.ndarray, found: np.ndarray, k: int
) -> float:
    """Top-k overlap of the float16 ExactIndex results with float32 brute force."""
    scores = queries @ db.T
    truth = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return top_k_overlap(found, index.ids[truth])


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def codebook_training_set(data: SyntheticLocalFeatures, words: int, per_word: int, start: int = 0):
    """Descriptors of training images (other objects) for a ``words``-word k-means, ``per_word`` each."""
    n_images = -(-words * per_word // data.n_desc)
    x = np.concatenate([data.training(start + i) for i in range(n_images)])
    return x, n_images


# ---------------------------------------------------------------------------------------------
# The three methods


def run_asmk(args, data: SyntheticLocalFeatures, queries, positives) -> list[dict]:
    x, n_train = codebook_training_set(data, args.asmk_words, args.kmeans_per_word)
    t0 = time.perf_counter()
    codebook = Codebook.train(x, args.asmk_words, seed=args.seed)
    t_codebook = time.perf_counter() - t0
    del x
    log.info("ASMK codebook: %d words on %d training images in %.0f s", args.asmk_words, n_train, t_codebook)
    index = AsmkIndex(codebook, binary=True, alpha=3.0, tau=0.0, query_assignment=5, database_assignment=1)

    t_gen = t_agg = 0.0
    aggregated = []
    for i in range(args.n_images):
        t0 = time.perf_counter()
        s = data.database(i)
        t1 = time.perf_counter()
        aggregated.append(index.aggregate(s, query=False))
        t_agg += time.perf_counter() - t1
        t_gen += t1 - t0
    t0 = time.perf_counter()
    index.add(aggregated)
    stats = index.stats()  # forces the merge into word-sorted posting arrays
    t_index = time.perf_counter() - t0
    log.info(
        "ASMK database: aggregation %.0f s, index %.1f s (%.0f words/image)",
        *(t_agg, t_index, stats["words_per_image"]),
    )
    with tempfile.TemporaryDirectory(prefix="tokenret-bench-") as tmp:
        index.save(tmp)
        saved = {p.name: p.stat().st_size for p in Path(tmp).iterdir()}

    n = args.n_images
    entries = stats["entries"]
    code_width = stats["code_bytes"] // max(1, entries)
    lat, found = latencies(
        queries,
        lambda q: index.aggregate(q, query=True),
        lambda agg, k: index.search([agg], k),
        args.k,
        args.repeats,
    )

    # Independent check: the direct pairwise kernel over every database image for a few queries.
    ids = index.ids
    score_diff, overlaps = 0.0, []
    for j in range(min(args.check_queries, len(queries))):
        q = index.aggregate(queries[j], query=True)
        brute = np.array([asmk_similarity(q, d, alpha=index.alpha, tau=index.tau) for d in aggregated])
        fast = index.score_all(q)
        score_diff = max(score_diff, float(np.abs(brute - fast).max()))
        brute_top = ids[np.argsort(-brute, kind="stable")[: args.k]]
        overlaps.append(top_k_overlap(found[j : j + 1], brute_top[None]))
    row = {
        "method": "ASMK*",
        "setting": f"{args.asmk_words} words, binary, alpha 3, tau 0, m 5/1",
        "offline_train_s": t_codebook,
        "offline_train": f"k-means {args.asmk_words} words, {n_train} training images, 10 iterations",
        "build_s": t_agg + t_index,
        "build_encode_s": t_agg,
        "build_index_s": t_index,
        "build_per_image_ms": 1e3 * (t_agg + t_index) / n,
        "generate_s": t_gen,
        "bytes_per_image": saved["asmk.npz"] / n,
        "bytes_per_image_note": "as stored by AsmkIndex (asmk.npz: per entry 16 B code + int64 word + "
        "int64 image row; per image int64 id + int64 word count)",
        "bytes_per_image_codes_only": stats["code_bytes"] / n,
        "bytes_per_image_code_plus_int32_id": entries * (code_width + 4) / n,
        "bytes_per_image_code_plus_int64_id": entries * (code_width + 8) / n,
        "words_per_image": stats["words_per_image"],
        "entries": entries,
        "max_list_length": stats["max_list_length"],
        "empty_words": stats["empty_words"],
        "shared_bytes": saved["codebook.npy"],
        "shared_note": "codebook float32",
        **lat,
        "map_at_k": map_at_k(found, positives, args.k),
        "check": {
            "what": "inverted file vs brute-force asmk_similarity over every database image",
            "queries": len(overlaps),
            "max_abs_score_diff": score_diff,
            "top_k_overlap": float(np.mean(overlaps)) if overlaps else None,
        },
    }
    return [row]


def run_vlad(args, data: SyntheticLocalFeatures, queries, positives) -> list[dict]:
    x, n_train = codebook_training_set(data, args.vlad_words, args.kmeans_per_word)
    t0 = time.perf_counter()
    codebook = Codebook.train(x, args.vlad_words, seed=args.seed)
    t_codebook = time.perf_counter() - t0
    del x
    encoder = VladEncoder(codebook, intra_normalize=True, power=args.vlad_power)
    t_gen = t_enc = 0.0
    db = np.empty((args.n_images, encoder.raw_dim), np.float32)
    for i in range(args.n_images):
        t0 = time.perf_counter()
        s = data.database(i)
        t1 = time.perf_counter()
        db[i] = encoder.encode_raw(s)
        t_enc += time.perf_counter() - t1
        t_gen += t1 - t0
    log.info("VLAD %d-d: codebook %.1f s, database encoding %.0f s", encoder.raw_dim, t_codebook, t_enc)
    query_vectors = np.stack([encoder.encode(q) for q in queries])

    rows = []
    n = args.n_images
    variants: list[tuple[str, VladPCA | None, float, str]] = [
        (f"{args.vlad_words} words -> {encoder.raw_dim}-d, intra-norm", None, t_codebook, "")
    ]
    if args.vlad_pca:
        # PCA on VLAD vectors of held-out training images (after the codebook's training images)
        n_pca = max(args.pca_train, args.vlad_pca)
        start = -(-args.vlad_words * args.kmeans_per_word // data.n_desc)
        t0 = time.perf_counter()
        train = np.stack([encoder.encode_raw(data.training(start + i)) for i in range(n_pca)])
        pca = VladPCA.fit(train, args.vlad_pca)
        t_pca = time.perf_counter() - t0
        del train
        log.info("VLAD PCA to %d-d on %d images: %.0f s", args.vlad_pca, n_pca, t_pca)
        variants.append(
            (
                f"{args.vlad_words} words, PCA -> {args.vlad_pca}-d",
                pca,
                t_codebook + t_pca,
                f" + PCA on {n_pca} images ({t_pca:.0f} s)",
            )
        )
    for setting, pca, t_train, train_note in variants:
        t0 = time.perf_counter()
        vectors = db if pca is None else pca.apply(db)
        t_pca_apply = time.perf_counter() - t0
        dim = vectors.shape[1]
        t0 = time.perf_counter()
        index = ExactIndex(dim)
        index.add(vectors)
        t_index = time.perf_counter() - t0
        enc = VladEncoder(codebook, intra_normalize=True, power=args.vlad_power, pca=pca)
        lat, found = latencies(
            queries,
            lambda q, enc=enc: enc.encode(q)[None],
            lambda v, k, index=index: index.search(v, k),
            args.k,
            args.repeats,
        )
        qv = query_vectors if pca is None else pca.apply(query_vectors)
        rows.append(
            {
                "method": "VLAD" if pca is None else "VLAD + PCA",
                "setting": setting,
                "offline_train_s": t_train,
                "offline_train": f"k-means {args.vlad_words} words, {n_train} training images{train_note}",
                "build_s": t_enc + t_pca_apply + t_index,
                "build_encode_s": t_enc + t_pca_apply,
                "build_index_s": t_index,
                "build_per_image_ms": 1e3 * (t_enc + t_pca_apply + t_index) / n,
                "generate_s": t_gen,
                "dim": dim,
                "bytes_per_image": index.nbytes / n,
                "bytes_per_image_note": "ExactIndex: float16 vector + int64 id",
                "bytes_per_image_float32": dim * 4,
                "shared_bytes": codebook.centroids.nbytes
                + (0 if pca is None else pca.projection.nbytes + pca.mean.nbytes),
                "shared_note": "codebook" + ("" if pca is None else " + PCA matrix") + " float32",
                **lat,
                "map_at_k": map_at_k(found, positives, args.k),
                "check": {
                    "what": "ExactIndex (float16) top-k vs float32 brute force",
                    "queries": len(queries),
                    "top_k_overlap": exact_vs_float32(index, vectors, qv, found, args.k),
                },
            }
        )
        del index
    return rows


def make_token_model(args) -> SetTokenModel:
    torch.manual_seed(args.seed)
    model = SetTokenModel(DIM, dim=args.token_dim, out_dim=args.token_out_dim).eval()
    for m in model.modules():
        # fresh attention output projections are exactly 0 (as in the release); trained ones are not,
        # so give them weights: the time is the same, and the output then depends on the attention
        if isinstance(m, Attention):
            nn.init.normal_(m.proj.weight, std=0.02)
    return model


@torch.inference_mode()
def token_encode(model: SetTokenModel, sets: list[np.ndarray]) -> np.ndarray:
    x, padding = pad_sets(sets)
    return model(x, padding).numpy()


def run_token(args, data: SyntheticLocalFeatures, queries, positives) -> list[dict]:
    model = make_token_model(args)
    n = args.n_images
    n_enc = n if args.token_encode <= 0 else min(n, args.token_encode)
    t_gen = t_enc = 0.0
    encoded = []
    token_encode(model, [data.database(0)])  # warm-up
    for start in range(0, n_enc, args.token_batch):
        t0 = time.perf_counter()
        sets = [data.database(i) for i in range(start, min(start + args.token_batch, n_enc))]
        t1 = time.perf_counter()
        encoded.append(token_encode(model, sets))
        t_enc += time.perf_counter() - t1
        t_gen += t1 - t0
    db = np.concatenate(encoded)
    if n_enc < n:
        # The rest of the index gets random unit vectors: exact search costs the same whatever the values
        # (and with random weights Token's values mean nothing), so only the encoding time is extrapolated.
        rest = np.random.default_rng(args.seed).standard_normal((n - n_enc, db.shape[1]), dtype=np.float32)
        db = np.concatenate([db, _unit(rest)])
    t_enc_total = t_enc * n / n_enc
    log.info(
        "Token: encoded %d database images in %.0f s (%.0f ms/image, batch %d)%s",
        *(n_enc, t_enc, 1e3 * t_enc / n_enc, args.token_batch),
        "" if n_enc == n else f", extrapolated to {n}: {t_enc_total:.0f} s",
    )
    t0 = time.perf_counter()
    index = ExactIndex(db.shape[1])
    index.add(db)
    t_index = time.perf_counter() - t0
    lat, found = latencies(
        queries,
        lambda q: token_encode(model, [q]),
        lambda v, k: index.search(v, k),
        args.k,
        args.repeats,
    )
    qv = np.concatenate([token_encode(model, [q]) for q in queries])
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    dim = db.shape[1]
    return [
        {
            "method": "Token (random weights)",
            "setting": f"SetTokenModel dim {args.token_dim}, L 4, 8 heads, 1 enc + 2 dec, {dim}-d out",
            "offline_train_s": None,
            "offline_train": "supervised training of the head (not measured: random weights)",
            "build_s": t_enc_total + t_index,
            "build_encode_s": t_enc_total,
            "build_encode_measured_images": n_enc,
            "build_encode_extrapolated": n_enc < n,
            "build_index_s": t_index,
            "build_per_image_ms": 1e3 * (t_enc_total + t_index) / n,
            "generate_s": t_gen,
            "dim": dim,
            "bytes_per_image": index.nbytes / n,
            "bytes_per_image_note": "ExactIndex: float16 vector + int64 id",
            "bytes_per_image_float32": dim * 4,
            "shared_bytes": params * 4,
            "shared_note": "model parameters and buffers, float32",
            **lat,
            "map_at_k": map_at_k(found, positives, args.k) if n_enc == n else None,
            "map_note": "random weights: not a quality figure"
            + ("" if n_enc == n else "; not computed (index partly filled with random vectors)"),
            "check": {
                "what": "ExactIndex (float16) top-k vs float32 brute force",
                "queries": len(queries),
                "top_k_overlap": exact_vs_float32(index, db, qv, found, args.k),
            },
        }
    ]


# ---------------------------------------------------------------------------------------------
# The benchmark


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    import faiss  # after OMP_WAIT_POLICY is set (module top)

    faiss.omp_set_num_threads(args.threads)
    n_objects = args.n_objects or max(1, args.n_images // args.images_per_object)
    data = SyntheticLocalFeatures(args.n_desc, n_objects, noise=args.noise, fg=args.fg, seed=args.seed)
    queries = [data.query(j) for j in range(args.queries)]
    all_objects = np.arange(args.n_images) % n_objects
    positives = [np.flatnonzero(all_objects == j % n_objects) for j in range(args.queries)]
    result = {
        "config": {key: (str(v) if isinstance(v, Path) else v) for key, v in vars(args).items()},
        "machine": describe_machine(args.threads),  # after ``import faiss``: records its version
        "data": {
            "n_images": args.n_images,
            "n_desc": args.n_desc,
            "dim": DIM,
            "n_objects": n_objects,
            "positives_per_query_mean": float(np.mean([len(p) for p in positives])),
            "queries": args.queries,
            "descriptor_norm": "unit",
        },
        "results": [],
    }
    runners = {"asmk": run_asmk, "vlad": run_vlad, "token": run_token}
    for name in args.methods:
        t0 = time.perf_counter()
        rows = runners[name](args, data, queries, positives)
        for row in rows:
            row["loadavg_after"] = os.getloadavg()[0]
            log.info(
                "%s: %.0f B/image, build %.0f s, query %.1f ms (p90 %.1f), mAP@%d %s",
                *(row["method"], row["bytes_per_image"], row["build_s"], row["query_ms_median"]),
                *(row["query_ms_p90"], args.k, _fmt(row["map_at_k"], ".3f")),
            )
        result["results"] += rows
        log.info("%s done in %.0f s", name, time.perf_counter() - t0)
    by_method = {r["method"]: r for r in result["results"]}
    asmk = by_method.get("ASMK*")
    token = next((r for r in result["results"] if r["method"].startswith("Token")), None)
    if asmk and token:
        result["asmk_over_token"] = {
            "bytes_per_image": asmk["bytes_per_image"] / token["bytes_per_image"],
            "bytes_per_image_vs_token_float32": asmk["bytes_per_image"] / token["bytes_per_image_float32"],
            "build_s": asmk["build_s"] / token["build_s"],
            "query_ms_median": asmk["query_ms_median"] / token["query_ms_median"],
            "search_ms_median": asmk["search_ms_median"] / token["search_ms_median"],
            "encode_ms_median": asmk["encode_ms_median"] / token["encode_ms_median"],
        }
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["peak_rss_gb"] = peak_rss_gb()
    return result


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(result: dict) -> str:
    k = result["config"]["k"]
    lines = [
        f"| method | setting | bytes/image | shared MB | offline s | build s | query ms median / p90 | "
        f"encode + search ms | mAP@{k} | check |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in result["results"]:
        check = r["check"]
        check_s = f"top-{k} overlap {check['top_k_overlap']:.3f}"
        if "max_abs_score_diff" in check:
            check_s += f", max score diff {check['max_abs_score_diff']:.1e} ({check['queries']} queries)"
        build = f"{r['build_s']:.0f}" + (" (extrap.)" if r.get("build_encode_extrapolated") else "")
        lines.append(
            f"| {r['method']} | {r['setting']} | {r['bytes_per_image']:.0f} | "
            f"{r['shared_bytes'] / 1e6:.2f} | {_fmt(r['offline_train_s'], '.0f')} | "
            f"{build} | {r['query_ms_median']:.1f} / {r['query_ms_p90']:.1f} | "
            f"{r['encode_ms_median']:.1f} + {r['search_ms_median']:.2f} | {_fmt(r['map_at_k'], '.3f')} | "
            f"{check_s} |"
        )
    asmk = next((r for r in result["results"] if r["method"] == "ASMK*"), None)
    if asmk:
        lines += [
            "",
            f"ASMK*: {asmk['words_per_image']:.0f} words/image; per image {asmk['bytes_per_image']:.0f} B as "
            f"stored, {asmk['bytes_per_image_code_plus_int64_id']:.0f} B as code + int64 id, "
            f"{asmk['bytes_per_image_code_plus_int32_id']:.0f} B as code + int32 id, "
            f"{asmk['bytes_per_image_codes_only']:.0f} B of codes alone",
        ]
    ratio = result.get("asmk_over_token")
    if ratio:
        lines.append(
            f"ASMK* / Token: memory {ratio['bytes_per_image']:.1f}x (vs float32 Token "
            f"{ratio['bytes_per_image_vs_token_float32']:.1f}x), build {ratio['build_s']:.2f}x, "
            f"query {ratio['query_ms_median']:.2f}x (encode {ratio['encode_ms_median']:.2f}x, "
            f"search {ratio['search_ms_median']:.1f}x)"
        )
    m = result["machine"]
    lines.append(
        f"{result['data']['n_images']} images x {result['data']['n_desc']} descriptors, "
        f"{result['data']['queries']} queries; {m['threads']} threads on {m['cpu']}; load "
        f"{m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}; peak RSS {result['peak_rss_gb']:.1f} GB"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-images", type=int, default=5000, help="database size N (default 5000)")
    p.add_argument("--n-desc", type=int, default=1000, help="local descriptors per image (HOW: 1000)")
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--k", type=int, default=100, help="results per query")
    p.add_argument("--repeats", type=int, default=2, help="passes over the queries (latency samples)")
    p.add_argument("--threads", type=int, default=2, help="torch and faiss threads")
    methods = ["asmk", "vlad", "token"]
    p.add_argument("--methods", nargs="+", default=methods, choices=methods)
    p.add_argument("--images-per-object", type=int, default=10, help="database images of one object")
    p.add_argument("--n-objects", type=int, default=None, help="default: n-images / images-per-object")
    p.add_argument("--noise", type=float, default=0.6, help="descriptor perturbation norm")
    p.add_argument("--fg", type=float, default=0.4, help="fraction of descriptors on the object")
    p.add_argument("--asmk-words", type=int, default=8192, help="ASMK codebook size (HOW: 65536)")
    p.add_argument(
        "--kmeans-per-word", type=int, default=40, help="k-means training descriptors per word (faiss: <=256)"
    )
    p.add_argument("--vlad-words", type=int, default=64, help="VLAD codebook size (64 x 128 = 8192-d)")
    p.add_argument("--vlad-power", type=float, default=None, help="signed power normalisation (e.g. 0.5)")
    p.add_argument("--vlad-pca", type=int, default=1024, help="PCA dimension for VLAD + PCA (0: skip)")
    p.add_argument("--pca-train", type=int, default=2000, help="held-out images for the VLAD PCA")
    p.add_argument("--token-dim", type=int, default=1024, help="Token head width (Token: 1024)")
    p.add_argument("--token-out-dim", type=int, default=1024)
    p.add_argument(
        "--token-encode",
        type=int,
        default=500,
        help="database images actually encoded by Token (time extrapolated to N; 0: all)",
    )
    p.add_argument("--token-batch", type=int, default=8, help="sets per Token forward pass (database)")
    p.add_argument("--check-queries", type=int, default=5, help="queries for ASMK's brute-force check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "aggregators.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    result = run(args)
    result["total_s"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"\nJSON: {args.out}  (total {result['total_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
