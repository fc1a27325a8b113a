"""SuperGlobal re-ranking benchmark: its cost per query against its floating-point work, and its added latency
in a search over 1M stored vectors.

Two measurements, each in one process with its variants interleaved (round-robin) and reported as medians:

1. **Batch cost** (``--batch``, default 70 queries, ROxf's query count): ``superglobal_rerank_candidates``
   on random float32 unit vectors, M = 400 candidates per query drawn from a pool, K = 9, beta = 0.15, for
   each ``--dims``. The same rounds time the machine's fp32 matrix-multiply rate with ``torch.bmm`` at the
   re-ranking's own shape (the batch's M x M Gram matrices, operands already gathered and contiguous) and
   with ``torch.matmul`` at 2048^3, so the limit is measured in the same minute as the cost.

   Floating-point work of the re-ranking per query (``rerank_flops``), with K1 = K + 1:

   - the Gram matrix of the M candidates: 2 M^2 d (a full product; a symmetric rank-k update would halve it);
   - q . x_j and q~ . x_j for every candidate: 2 x 2 M d;
   - s1 and s2 as weighted means of those dots over each candidate's K1 neighbours: 2 x (2 M K1 + M);
   - the K1 augmented vectors x~ that make q~: 2 K1^2 d + K1 d, and their element-wise maximum: K1 d.

   At M = 400, K = 9: 659.1 MFLOP per query at d = 2048 (99.4% of it the Gram matrix), 329.6 at d = 1024.
   The top-(K+1) selection over each Gram row (M^2 values) and the sorts are not counted (comparisons).
   **Goal:** the batch within 2x of (its FLOPs / the measured bmm rate).

2. **Added latency at 1M** (``--n``, default 1M; ``--dims-1m``): float16 unit vectors written to a file and
   memory-mapped, searched through ``ExactIndex.from_arrays`` as an index folder's catalogue does, and
   ``ImageIndex.knn_reranked`` (the code path of ``tokenret search --rerank superglobal`` and of the
   server's ``rerank=superglobal``) run on that store: first stage for max(k, M) = 400 candidates, their
   vectors read from the memory map through ``ExactIndex.reconstruct``, re-ranked. One query a call, as
   ``tokenret search`` sends them: (a) the plain search for k = 20, and the search with re-ranking, whose
   first stage is timed inside the same call: **added** = the call minus its own first stage; (b) the
   re-ranking alone on each query's candidates (vector reads included), interleaved with ``torch.mm`` of
   the same candidates' M x M Gram matrix, the single-query limit's rate; (c) a batch of ``--batch``
   queries re-ranked together from the memory map. Describing the query image and mapping ids to paths
   are not included (the same with and without re-ranking). **Goal:** added under 10 ms per query.

Usage:
    python bench/rerank.py --json bench/results/rerank_cpu.json   # 70 queries; 1M x 1024 and x 2048 (5 min)
    python bench/rerank.py --n 100000 --repeats 3                         # quick run
    python bench/rerank.py --dims-1m 1024                                 # 1M x 2048 (4 GB file) left out
"""

from __future__ import annotations

import os

# As bench/search.py: passive OpenMP waiting, or idle threads spin on the shared 2 vCPUs (set before torch).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from machine import cpu_model, describe_machine  # noqa: E402  (bench/machine.py)

from tokenret.collection.facade import ImageIndex  # noqa: E402
from tokenret.index import ExactIndex  # noqa: E402
from tokenret.rerank import SuperGlobalRerank, superglobal_rerank_candidates  # noqa: E402

GOALS = {
    "batch_vs_flops_at_bmm_rate": 2.0,  # the batch's time within 2x of its FLOPs at the measured bmm rate
    "added_ms_per_query_1m": 10.0,  # re-ranking beyond the first-stage search, one query, 1M vectors
}


def rerank_flops(m: int, d: int, k: int) -> int:
    """Floating-point operations of SuperGlobal's re-ranking of one query (see the module docstring)."""
    k1 = min(k + 1, m)
    gram = 2 * m * m * d
    dots = 2 * 2 * m * d
    means = 2 * (2 * m * k1 + m)
    query = 2 * k1 * k1 * d + k1 * d + k1 * d
    return gram + dots + means + query


def unit_rows(rng: np.random.Generator, n: int, d: int, dtype=np.float32) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(dtype, copy=False)


def interleaved(variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list]:
    """Seconds of each variant over ``repeats`` rounds, the variants taking turns within each round."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median_ms(ts: list[float]) -> float:
    return 1e3 * statistics.median(ts)


# ---------------------------------------------------------------------------------------------
# 1. The batch against its floating-point work


def bench_batch(d: int, args, rng: np.random.Generator) -> dict:
    nq, m, k = args.batch, args.m, args.k
    pool = unit_rows(rng, args.pool, d)
    queries = unit_rows(rng, nq, d)
    cand = np.stack([rng.choice(args.pool, m, replace=False) for _ in range(nq)])
    xg = torch.from_numpy(pool[cand.reshape(-1)]).view(nq, m, d)  # the gathered candidates, contiguous
    xt = xg.transpose(1, 2)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)

    times = interleaved(
        {
            "rerank": lambda: superglobal_rerank_candidates(queries, cand, pool, k=k, beta=args.beta),
            "gram_bmm": lambda: torch.bmm(xg, xt),
            "matmul_2048": lambda: a @ b,
        },
        args.repeats,
    )
    flops = rerank_flops(m, d, k) * nq
    bmm_gflops = 2 * m * m * d * nq / statistics.median(times["gram_bmm"]) / 1e9
    mm_gflops = 2 * 2048**3 / statistics.median(times["matmul_2048"]) / 1e9
    t = statistics.median(times["rerank"])
    limit = flops / (bmm_gflops * 1e9)
    return {
        "d": d,
        "queries": nq,
        "m": m,
        "k": k,
        "pool_rows": args.pool,
        "flops_per_query": rerank_flops(m, d, k),
        "gram_share_of_flops": 2 * m * m * d / rerank_flops(m, d, k),
        "rerank_ms_batch": 1e3 * t,
        "rerank_ms_per_query": 1e3 * t / nq,
        "rerank_gflops": flops / t / 1e9,
        "bmm_gflops": bmm_gflops,
        "matmul_2048_gflops": mm_gflops,
        "limit_ms_batch": 1e3 * limit,
        "ratio_to_limit": t / limit,
        "ratio_to_limit_at_2048_rate": t / (flops / (mm_gflops * 1e9)),
        "goal_met": t / limit <= GOALS["batch_vs_flops_at_bmm_rate"],
        "times_s": times,
        "loadavg_1min": os.getloadavg()[0],
    }


# ---------------------------------------------------------------------------------------------
# 2. Added latency of the search path at 1M vectors


class _StoredVectors:
    """What ``ImageIndex.knn_reranked`` uses of an index folder (its exact search, its float16 store), over
    a memory-mapped float16 file, so the search path's own re-ranking code runs on 1M vectors without a
    catalogue of 1M image files. Each first-stage search records its own duration, so the time a call adds
    beyond its first stage is measured inside that very call."""

    def __init__(self, index: ExactIndex) -> None:
        self.index = index
        self.first_stage_s: list[float] = []

    def vector_index(self) -> ExactIndex:
        return self.index

    def knn(self, queries: np.ndarray, k: int, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        t0 = time.perf_counter()
        out = self.index.search(queries, min(k, self.index.ntotal))
        self.first_stage_s.append(time.perf_counter() - t0)
        return out


def write_vectors(path: Path, n: int, d: int, rng: np.random.Generator, chunk: int = 65536) -> np.memmap:
    """``n`` distinct float16 unit vectors into a raw file (the layout of an index folder's vectors.f16).

    One block of random unit vectors, written chunk after chunk with its rows shuffled and its columns
    rotated by a different amount each time (a rotation keeps the norm): distinct rows at a fraction of the
    cost of drawing n x d normals on a shared machine; the timings do not depend on the values.
    """
    block = unit_rows(rng, min(chunk, n), d, np.float16)
    out = np.memmap(path, dtype=np.float16, mode="w+", shape=(n, d))
    shifts = rng.permutation(d)
    for c, start in enumerate(range(0, n, chunk)):
        stop = min(n, start + chunk)
        rows = rng.permutation(len(block))[: stop - start]
        out[start:stop] = np.roll(block[rows], int(shifts[c % d]), axis=1)
    out.flush()
    del out
    return np.memmap(path, dtype=np.float16, mode="r", shape=(n, d))


def bench_1m(d: int, args, rng: np.random.Generator, folder: Path) -> dict:
    n, m, k = args.n, args.m, args.k
    t0 = time.perf_counter()
    vectors = write_vectors(folder / f"vectors_{d}.f16", n, d, rng)
    t_write = time.perf_counter() - t0
    index = ExactIndex.from_arrays(vectors, np.arange(n, dtype=np.int64))
    store = _StoredVectors(index)
    rerank = SuperGlobalRerank(m=m, k=k, beta=args.beta)
    # queries near stored vectors (as an image of an indexed place would be); timing does not depend on it
    rows = rng.choice(n, args.queries_1m + args.batch, replace=False)
    near = np.asarray(vectors[np.sort(rows)], dtype=np.float32) + 0.05 * unit_rows(rng, len(rows), d)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    singles, batch = near[: args.queries_1m], near[args.queries_1m :]
    index.search(singles[:1], m)  # the file into the page cache
    candidates = [index.search(singles[i : i + 1], m)[1] for i in range(len(singles))]
    batch_cand = index.search(batch, m)[1]

    # (a) the search path, one query a call: plain search, and search + re-ranking (its first stage timed
    # inside the call); the first stage dominates and varies with the machine's load, hence (b)
    search: dict[str, list] = {"search_k20": [], "knn_reranked": [], "added": []}
    for q in singles:
        q1 = q[None]
        t0 = time.perf_counter()
        index.search(q1, args.top)
        search["search_k20"].append(time.perf_counter() - t0)
        store.first_stage_s.clear()
        t0 = time.perf_counter()
        ImageIndex.knn_reranked(store, q1, args.top, rerank)
        total = time.perf_counter() - t0
        search["knn_reranked"].append(total)
        search["added"].append(total - store.first_stage_s[0])
    # (b) the re-ranking alone on each query's candidates (vector reads from the memory map included),
    # against the M x M Gram matrix of the same candidates (torch.mm), interleaved, several times per query
    grams = [torch.from_numpy(index.reconstruct(c[0])) for c in candidates]
    alone: dict[str, list] = {"rerank_only": [], "gram_mm": []}
    for _ in range(args.repeats):
        for i, q in enumerate(singles):
            got = interleaved(
                {
                    "rerank_only": lambda q=q, i=i: superglobal_rerank_candidates(
                        q[None], candidates[i], index.reconstruct, k=k, beta=args.beta
                    ),
                    "gram_mm": lambda i=i: grams[i] @ grams[i].T,
                },
                repeats=1,
                warmup=0,
            )
            for name, ts in got.items():
                alone[name].extend(ts)
    batch_times = interleaved(
        {
            "rerank_only_batch": lambda: superglobal_rerank_candidates(
                batch, batch_cand, index.reconstruct, k=k, beta=args.beta
            )
        },
        args.repeats,
    )
    med = {name: median_ms(ts) for name, ts in {**search, **alone}.items()}
    gram_gflops = 2 * m * m * d / (med["gram_mm"] / 1e3) / 1e9
    limit_ms = 1e3 * rerank_flops(m, d, k) / (gram_gflops * 1e9)
    return {
        "n": n,
        "d": d,
        "m": m,
        "k": k,
        "top": args.top,
        "store": "float16 memory map, ExactIndex.from_arrays (as an index folder)",
        "file_gb": n * d * 2 / 1e9,
        "write_s": t_write,
        "queries": len(singles),
        "ms": med,
        "added_ms_per_query": med["added"],
        "rerank_only_ms_per_query": med["rerank_only"],
        "gram_mm_gflops": gram_gflops,
        "single_limit_ms": limit_ms,
        "single_ratio_to_limit": med["rerank_only"] / limit_ms,
        "rerank_only_batch_ms_per_query": median_ms(batch_times["rerank_only_batch"]) / len(batch),
        "goal_met": med["added"] <= GOALS["added_ms_per_query_1m"],
        "times_s": {**search, **alone, **batch_times},
        "loadavg_1min": os.getloadavg()[0],
    }


# ---------------------------------------------------------------------------------------------


def format_table(result: dict) -> str:
    cfg, threads = result["config"], result["machine"]["threads"]
    lines = [
        f"batch of {cfg['batch']} queries, M {cfg['m']}, K {cfg['k']}, {threads} thread(s)",
        "| d | ms / query | GFLOP / query | re-ranking GFLOPS | bmm GFLOPS (its Gram shape) | 2048^3 GFLOPS "
        "| vs limit at bmm rate | goal (2x) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["batch"]:
        lines.append(
            f"| {r['d']} | {r['rerank_ms_per_query']:.2f} | {r['flops_per_query'] / 1e9:.3f} | "
            f"{r['rerank_gflops']:.0f} | {r['bmm_gflops']:.0f} | {r['matmul_2048_gflops']:.0f} | "
            f"{r['ratio_to_limit']:.2f}x | {'met' if r['goal_met'] else 'missed'} |"
        )
    if result["search_1m"]:
        lines += [
            "",
            f"search at {cfg['n']:,} float16 vectors (memory-mapped), one query a call, k {cfg['top']}, "
            f"M {cfg['m']}",
            "| d | search k=20 ms | search + re-ranking ms | added beyond its first stage ms "
            "| re-ranking alone ms | its Gram alone ms (GFLOPS) | alone vs limit "
            "| batch re-ranking ms / query | goal (10 ms) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in result["search_1m"]:
            ms = r["ms"]
            lines.append(
                f"| {r['d']} | {ms['search_k20']:.0f} | {ms['knn_reranked']:.0f} | "
                f"{r['added_ms_per_query']:.1f} | {ms['rerank_only']:.1f} | "
                f"{ms['gram_mm']:.1f} ({r['gram_mm_gflops']:.0f}) | {r['single_ratio_to_limit']:.2f}x | "
                f"{r['rerank_only_batch_ms_per_query']:.2f} | {'met' if r['goal_met'] else 'missed'} |"
            )
    return "\n".join(lines)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    result: dict[str, Any] = {
        "config": vars(args) | {"json": str(args.json) if args.json else None},
        "machine": {**describe_machine(args.threads), "processor": cpu_model()},  # "processor": as before
        "goals": GOALS,
        "batch": [],
        "search_1m": [],
    }
    t0 = time.perf_counter()
    for d in args.dims:
        result["batch"].append(bench_batch(d, args, rng))
    folder = Path(tempfile.mkdtemp(prefix="rerank_bench_", dir=args.tmp_dir))
    try:
        for d in args.dims_1m:
            result["search_1m"].append(bench_1m(d, args, rng, folder))
            for f in folder.iterdir():
                f.unlink()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result["seconds"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2048, 1024], help="d of the batch measurement")
    p.add_argument("--dims-1m", type=int, nargs="*", default=[1024, 2048], help="d of the 1M measurement")
    p.add_argument("--n", type=int, default=1_000_000, help="stored vectors of the search measurement")
    p.add_argument("--batch", type=int, default=70, help="queries re-ranked together (ROxf: 70)")
    p.add_argument("--pool", type=int, default=28_000, help="rows the batch's candidates are drawn from")
    p.add_argument("--m", type=int, default=400)
    p.add_argument("--k", type=int, default=9)
    p.add_argument("--beta", type=float, default=0.15)
    p.add_argument("--top", type=int, default=20, help="results returned by the search (tokenret search -k)")
    p.add_argument("--repeats", type=int, default=5, help="rounds of the batch measurements")
    p.add_argument("--queries-1m", type=int, default=7, help="single queries (rounds) at 1M")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp-dir", default=None, help="where the float16 file is written (deleted afterwards)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    result = run(args)
    print(format_table(result))
    print(f"({result['seconds']:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
