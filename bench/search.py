"""Search benchmark: tokenret's exact index against FAISS IVF-PQ and HNSW on clustered descriptors.

One run measures, under the same machine conditions:

1. the machine's limits: memory read bandwidth (sum over a multi-GB float32 array; best of torch
   with all threads and numpy with one) and the fp32 matrix-multiply rate (torch, 2048^3);
2. n synthetic unit descriptors (default 1M x 1024-d) drawn around clusters, generated in chunks
   straight into an ``ExactIndex`` (float16);
3. exact search (ours): latency of one query and of a batch, each against its limit (one pass over
   the stored bytes at the measured bandwidth; the batch's flops at the measured matmul rate);
4. FAISS IVF-PQ (with and without exact re-ranking) and HNSW: build time, bytes per image,
   latency, recall@k against the exact results.

It prints a table and writes JSON (``--out``). The data model (why not i.i.d. noise: ANN recall is
meaningless without neighbour structure): 10k "themes" -> clusters (~100 images each, log-normal
sizes) around theme centres -> images = normalise(cluster centre + per-cluster spread x a
variation in a shared 64-d subspace + isotropic noise). That gives top-1 similarity ~0.83 and
similarity of the 100th neighbour ~0.6, like real retrieval descriptors.

Usage:
    nice -n 10 python bench/search.py                 # full size: 1M x 1024, ~12 GB RAM
    python bench/search.py --n 100000                 # quick run
    python bench/search.py --n 200000 --skip hnsw     # leave an index out
"""

from __future__ import annotations

import os

# Must be set before torch and faiss load their (two separate) OpenMP runtimes: with the default
# spin-waiting, idle threads of one runtime steal the 2 vCPUs from the other and from neighbours'
# jobs, and 2-thread single-query latencies grew 10-40x on a shared machine. Override by setting
# OMP_WAIT_POLICY=ACTIVE in the environment.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import gc
import itertools
import json
import logging
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe_machine  # bench/machine.py, beside this script

from tokenret.index import ExactIndex, FaissIndex, ivf_pq_spec, load_index, nn_recall_at_k, recall_at_k
from tokenret.index.faiss_index import import_faiss

log = logging.getLogger("bench.search")

GOALS = {
    "exact_single_vs_bandwidth": 2.0,  # one query within 2x of one pass over the stored vectors
    "exact_batch_vs_matmul": 1.5,  # a batch within 1.5x of its flops at the measured matmul rate
    "ann_recall": 0.95,  # recall@k of an approximate index
    "ann_single_ms": 1.0,  # one approximate query
    "ann_bytes_per_image": 100.0,  # memory of an approximate index
}


# ---------------------------------------------------------------------------------------------
# Synthetic data


class ClusteredDescriptors:
    """Deterministic clustered unit vectors, generated chunk by chunk (see the module docstring)."""

    def __init__(self, dim: int, n_clusters: int, seed: int = 0, variation_dim: int = 64) -> None:
        rng = np.random.default_rng(seed)
        self.dim, self.n_clusters, self.seed = dim, n_clusters, seed
        n_themes = max(1, n_clusters // 30)
        themes = _unit(rng.standard_normal((n_themes, dim), dtype=np.float32))
        own = _unit(rng.standard_normal((n_clusters, dim), dtype=np.float32))
        # clusters of one theme share a direction (cluster-cluster similarity ~0.3)
        self.centres = _unit(themes[rng.integers(0, n_themes, n_clusters)] + 1.5 * own)
        # within-cluster variation lives in a shared low-dimensional subspace (orthonormal rows)
        self.variation = np.linalg.qr(rng.standard_normal((dim, variation_dim)))[0].T.astype(np.float32)
        self.spread = rng.uniform(0.3, 0.7, n_clusters).astype(np.float32)
        self.noise = 0.25
        weights = rng.lognormal(0.0, 1.0, n_clusters)
        self.cluster_p = weights / weights.sum()

    def chunk(self, index: int, size: int) -> np.ndarray:
        """``size`` vectors of chunk number ``index`` (the same for the same arguments)."""
        rng = np.random.default_rng([self.seed, 1, index])
        labels = rng.choice(self.n_clusters, size, p=self.cluster_p)
        var_dim = len(self.variation)
        a = rng.standard_normal((size, var_dim), dtype=np.float32) / np.sqrt(var_dim)
        x = self.centres[labels] + self.spread[labels, None] * (a @ self.variation)
        x += (self.noise / np.sqrt(self.dim)) * rng.standard_normal((size, self.dim), dtype=np.float32)
        return _unit(x)


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


# ---------------------------------------------------------------------------------------------
# Measuring


def timings(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure_bandwidth(gib: float, repeats: int) -> dict:
    """Read bandwidth: sum over a ``gib`` GiB float32 array (torch, all threads; numpy, 1 thread)."""
    a = torch.ones(int(gib * 2**30) // 4)
    nbytes = a.numel() * 4
    a.sum()
    t_torch = statistics.median(timings(a.sum, repeats))
    t_numpy = statistics.median(timings(a.numpy().sum, repeats))
    res = {
        "array_gib": gib,
        "torch_sum_gbps": nbytes / t_torch / 1e9,
        "numpy_sum_gbps": nbytes / t_numpy / 1e9,
    }
    res["read_gbps"] = max(res["torch_sum_gbps"], res["numpy_sum_gbps"])
    return res


def measure_matmul(repeats: int, size: int = 2048) -> dict:
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    a @ b
    t = timings(lambda: a @ b, repeats)
    flops = 2 * size**3
    return {
        "size": size,
        "gflops_median": flops / statistics.median(t) / 1e9,
        "gflops_best": flops / min(t) / 1e9,
    }


def measure_limits(args, threads: int) -> dict:
    """Bandwidth and matmul rate with ``threads`` torch threads (numpy's sum is single-threaded)."""
    torch.set_num_threads(threads)
    limits = {
        "threads": threads,
        "bandwidth": measure_bandwidth(args.bw_gib, args.repeats),
        "matmul": measure_matmul(args.repeats),
        "loadavg_1min": os.getloadavg()[0],
    }
    log.info(
        "limits, %d thread(s): read %.1f GB/s (torch %.1f, numpy %.1f), "
        "fp32 matmul %.0f GFLOPS (best %.0f), load %.2f",
        threads,
        limits["bandwidth"]["read_gbps"],
        limits["bandwidth"]["torch_sum_gbps"],
        limits["bandwidth"]["numpy_sum_gbps"],
        limits["matmul"]["gflops_median"],
        limits["matmul"]["gflops_best"],
        limits["loadavg_1min"],
    )
    return limits


def search_latencies(index, single: np.ndarray, batch: np.ndarray, k: int, repeats: int) -> dict:
    """Median latency of one query (each single query once: ``--single`` x ``--repeats`` distinct queries,
    so no query finds its candidates already in the CPU cache) and of the whole batch (``repeats`` times)."""
    index.search(batch[:1], k)  # warm-up
    per_query = []
    for q in single:
        t0 = time.perf_counter()
        index.search(q[None], k)
        per_query.append(time.perf_counter() - t0)
    batch_times = timings(lambda: index.search(batch, k), repeats)
    _, ids = index.search(batch, k)
    return {
        "single_ms": 1e3 * statistics.median(per_query),
        "single_ms_best": 1e3 * min(per_query),
        "batch_ms": 1e3 * statistics.median(batch_times),
        "batch_ms_best": 1e3 * min(batch_times),
        "batch_ids": ids,
    }


def faiss_file_bytes(index: FaissIndex, directory: Path) -> int:
    """Size of the faiss index alone (codes, ids, graph, centroids) as written to disk."""
    faiss = import_faiss()
    path = directory / "size_probe.faiss"
    faiss.write_index(index.faiss_index, str(path))
    size = path.stat().st_size
    path.unlink()
    return size


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


# ---------------------------------------------------------------------------------------------
# The benchmark


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    faiss = None
    if not {"ivfpq", "hnsw"} <= set(args.skip):
        faiss = import_faiss()
        faiss.omp_set_num_threads(args.threads)
    n, dim, k = args.n, args.dim, args.k
    result = {
        "config": {key: (str(v) if isinstance(v, Path) else v) for key, v in vars(args).items()},
        "machine": describe_machine(args.threads),  # after import_faiss(): records its version
        "goals": GOALS,
        "results": [],
    }
    result["limits_start"] = measure_limits(args, args.threads)

    # -- data into the exact index -------------------------------------------------------------
    gen = ClusteredDescriptors(dim, args.clusters or max(1, n // 100), seed=args.seed)
    exact = ExactIndex(dim)
    t_gen = t_add = 0.0
    for c, start in enumerate(range(0, n, args.gen_chunk)):
        t0 = time.perf_counter()
        x = gen.chunk(c + 1, min(args.gen_chunk, n - start))
        t1 = time.perf_counter()
        exact.add(x)
        t_add += time.perf_counter() - t1
        t_gen += t1 - t0
    del x
    queries = gen.chunk(0, args.queries + args.single * args.repeats)  # chunk 0 is never in the database
    batch, single = queries[: args.queries], queries[args.queries :]
    log.info("generated %d x %d in %.1f s (+ %.1f s float16 add)", n, dim, t_gen, t_add)

    # -- exact ---------------------------------------------------------------------------------
    truth = None
    for threads in args.exact_threads:
        limits = measure_limits(args, threads)  # right before the exact timings, for the fractions
        lat = search_latencies(exact, single, batch, k, args.repeats)
        ids = lat.pop("batch_ids")
        if truth is None:
            truth = ids
            scores, _ = exact.search(batch, k)
            result["data"] = {
                "n": n,
                "dim": dim,
                "clusters": gen.n_clusters,
                "generate_s": t_gen,
                "top1_sim_mean": float(scores[:, 0].mean()),
                "top1_sim_p10_p90": np.percentile(scores[:, 0], [10, 90]).tolist(),
                "sim_at_10_mean": float(scores[:, min(9, k - 1)].mean()),
                f"sim_at_{k}_mean": float(scores[:, k - 1].mean()),
                f"sim_at_{k}_p10_p90": np.percentile(scores[:, k - 1], [10, 90]).tolist(),
            }
        elif not np.array_equal(ids, truth):
            raise RuntimeError(f"exact search gave different results with {threads} threads")
        pass_ms = 1e3 * n * dim * 2 / (limits["bandwidth"]["read_gbps"] * 1e9)
        matmul_ms = 1e3 * 2 * len(batch) * n * dim / (limits["matmul"]["gflops_median"] * 1e9)
        row = {
            "index": "exact (ours)",
            "setting": f"fp16, {threads} thread{'s' if threads > 1 else ''}",
            "threads": threads,
            "build_s": t_add,
            "bytes_per_image": exact.nbytes / n,
            **lat,
            "recall": 1.0,
            "limits": limits,
            "single_limit_ms": pass_ms,
            "single_vs_limit": lat["single_ms"] / pass_ms,
            "batch_limit_ms": matmul_ms,
            "batch_vs_limit": lat["batch_ms"] / matmul_ms,
        }
        row["goals_met"] = {
            "single_within_2x_of_one_pass": row["single_vs_limit"] <= GOALS["exact_single_vs_bandwidth"],
            "batch_within_1.5x_of_matmul": row["batch_vs_limit"] <= GOALS["exact_batch_vs_matmul"],
        }
        result["results"].append(row)
        log.info(
            "exact, %d thread(s): 1 query %.1f ms (%.2fx one pass, %.1f ms); "
            "%d queries %.0f ms (%.2fx matmul, %.0f ms)",
            *(threads, lat["single_ms"], row["single_vs_limit"], pass_ms),
            *(len(batch), lat["batch_ms"], row["batch_vs_limit"], matmul_ms),
        )
    torch.set_num_threads(args.threads)

    def vectors(start: int, stop: int) -> np.ndarray:
        return exact.reconstruct(np.arange(start, stop))  # the same float16-rounded data

    tmp = Path(tempfile.mkdtemp(prefix="tokenret-bench-"))

    # -- IVF-PQ --------------------------------------------------------------------------------
    for spec in [] if "ivfpq" in args.skip else args.ivf_spec or [ivf_pq_spec(n, dim)]:
        ivf = FaissIndex(
            spec,
            dim,
            refine_factor=max(args.refine) if args.refine else None,
            train_points_per_list=args.train_per_list,
        )
        n_train = min(n, ivf.train_points_per_list * ivf.nlist)
        rows = np.sort(np.random.default_rng(args.seed).choice(n, n_train, replace=False))
        t0 = time.perf_counter()
        ivf.train(exact.reconstruct(rows))
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        for start in range(0, n, args.gen_chunk):
            stop = min(start + args.gen_chunk, n)
            ivf.add(vectors(start, stop), np.arange(start, stop))
        t_build = time.perf_counter() - t0
        index_bytes = faiss_file_bytes(ivf, tmp)
        log.info(
            "%s: train %.0f s on %d, add %.0f s, %.1f B/image",
            *(spec, t_train, n_train, t_build, index_bytes / n),
        )
        variants = [(ivf, "in memory")]
        if args.refine:
            # as a saved index is used: the float16 re-ranking vectors memory-mapped from refine/vectors.npy
            saved = tmp / "ivf"
            ivf.save(saved)
            variants.append((load_index(saved), "memory-mapped"))
        for (index, where), nprobe in itertools.product(variants, args.nprobe):
            index.set_search_params(nprobe=nprobe)
            for refine in (None, *args.refine) if where == "in memory" else args.refine:
                index.refine_factor = refine
                lat = search_latencies(index, single, batch, k, args.repeats)
                found = lat.pop("batch_ids")
                recall = recall_at_k(found, truth, k)
                row = {
                    "index": spec if refine is None else f"{spec} + exact re-rank ({where} float16)",
                    "setting": f"nprobe {nprobe}" + ("" if refine is None else f", {refine:g}k candidates"),
                    "build_s": t_train + t_build,
                    "train_s": t_train,
                    "train_vectors": n_train,
                    "bytes_per_image": index_bytes / n,
                    # float16 vectors + ids kept for re-ranking: in RAM, or memory-mapped from disk once saved
                    "refine_bytes_per_image": None if refine is None else dim * 2 + 8,
                    "refine_vectors": None if refine is None else where,
                    **lat,
                    "recall": recall,
                    "nn_recall": nn_recall_at_k(found, truth, k),
                }
                _ann_goals(row)
                result["results"].append(row)
                log.info(
                    "  %s %s: %.2f ms, batch %.0f ms, recall %.4f",
                    *(row["index"], row["setting"], row["single_ms"], row["batch_ms"], recall),
                )
        del ivf, index, variants
        gc.collect()
        shutil.rmtree(tmp / "ivf", ignore_errors=True)

    # -- HNSW ----------------------------------------------------------------------------------
    if "hnsw" not in args.skip:
        spec = args.hnsw_spec
        hnsw = FaissIndex(spec, dim, efConstruction=args.hnsw_ef_construction)
        t0 = time.perf_counter()
        for start in range(0, n, args.gen_chunk):
            stop = min(start + args.gen_chunk, n)
            hnsw.add(vectors(start, stop), np.arange(start, stop))
        t_build = time.perf_counter() - t0
        index_bytes = faiss_file_bytes(hnsw, tmp)
        log.info("%s: build %.0f s, %.0f B/image", spec, t_build, index_bytes / n)
        for ef in args.ef:
            hnsw.set_search_params(efSearch=ef)
            lat = search_latencies(hnsw, single, batch, k, args.repeats)
            found = lat.pop("batch_ids")
            recall = recall_at_k(found, truth, k)
            row = {
                "index": spec,
                "setting": f"efSearch {ef}",
                "build_s": t_build,
                "bytes_per_image": index_bytes / n,
                **lat,
                "recall": recall,
                "nn_recall": nn_recall_at_k(found, truth, k),
            }
            _ann_goals(row)
            result["results"].append(row)
            log.info(
                "  %s %s: %.2f ms, batch %.0f ms, recall %.4f",
                *(spec, row["setting"], row["single_ms"], row["batch_ms"], recall),
            )
        del hnsw
    tmp.rmdir()

    result["limits_end"] = measure_limits(args, args.threads)
    result["peak_rss_gb"] = peak_rss_gb()
    return result


def _ann_goals(row: dict) -> None:
    """Goals with recall as top-k overlap (``goals_met``) and as the nearest neighbour found in the top k
    (the product-quantization literature's recall@R, ``goals_met_nn_recall``)."""
    others = {
        "single_under_1ms": row["single_ms"] < GOALS["ann_single_ms"],
        # re-ranking vectors held in RAM count; memory-mapped ones are read from disk (page cache) per query
        "under_100_bytes_per_image": row["bytes_per_image"] + _refine_ram(row) < GOALS["ann_bytes_per_image"],
    }
    row["goals_met"] = {"recall_at_least_0.95": row["recall"] >= GOALS["ann_recall"], **others}
    nn_ok = row["nn_recall"] >= GOALS["ann_recall"]
    row["goals_met_nn_recall"] = {"nn_recall_at_least_0.95": nn_ok, **others}


def _refine_ram(row: dict) -> float:
    return row.get("refine_bytes_per_image") or 0 if row.get("refine_vectors") == "in memory" else 0


def _bytes_cell(row: dict) -> str:
    cell = f"{row['bytes_per_image']:.0f}"
    if row.get("refine_bytes_per_image"):
        on = "RAM" if row["refine_vectors"] == "in memory" else "disk, mmap"
        cell += f" + {row['refine_bytes_per_image']:.0f} ({on})"
    return cell


def format_table(result: dict) -> str:
    k = result["config"]["k"]
    nq = result["config"]["queries"]
    head = (
        f"| index | setting | build s | bytes/image | 1 query ms | {nq} queries ms | recall@{k} "
        f"| NN in top {k} | goals met |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    )
    lines = list(head)
    for r in result["results"]:
        met = r["goals_met"]
        goals = "all" if all(met.values()) else "missed: " + ", ".join(g for g, ok in met.items() if not ok)
        if not all(met.values()) and all(r.get("goals_met_nn_recall", {"-": False}).values()):
            goals = f"all with recall as NN in top {k}; {goals}"
        nn = f"{r['nn_recall']:.3f}" if "nn_recall" in r else "-"
        lines.append(
            f"| {r['index']} | {r['setting']} | {r['build_s']:.0f} | {_bytes_cell(r)} | "
            f"{r['single_ms']:.2f} | {r['batch_ms']:.0f} | {r['recall']:.4f} | {nn} | {goals} |"
        )
    for ex in (r for r in result["results"] if r["index"] == "exact (ours)"):
        lim = ex["limits"]
        lines += [
            "",
            f"exact search with {ex['threads']} thread(s); limits measured just before: read "
            f"{lim['bandwidth']['read_gbps']:.1f} GB/s, fp32 matmul "
            f"{lim['matmul']['gflops_median']:.0f} GFLOPS "
            f"(median; best {lim['matmul']['gflops_best']:.0f}), load average {lim['loadavg_1min']:.2f}",
            f"  1 query: {ex['single_ms']:.1f} ms = {ex['single_vs_limit']:.2f}x one pass over "
            f"{result['data']['n'] * result['data']['dim'] * 2 / 1e9:.2f} GB at that bandwidth "
            f"({ex['single_limit_ms']:.1f} ms; goal <= {GOALS['exact_single_vs_bandwidth']}x)",
            f"  {nq} queries: {ex['batch_ms']:.0f} ms = {ex['batch_vs_limit']:.2f}x their flops "
            "at that matmul rate "
            f"({ex['batch_limit_ms']:.0f} ms; goal <= {GOALS['exact_batch_vs_matmul']}x)",
        ]
    lines += [
        "",
        f"data: top-1 similarity {result['data']['top1_sim_mean']:.3f}, "
        f"at 10 {result['data']['sim_at_10_mean']:.3f}, "
        f"at {k} {result['data'][f'sim_at_{k}_mean']:.3f}; peak RSS {result['peak_rss_gb']:.1f} GB",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="database size (default 1M)")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--clusters", type=int, default=None, help="cluster count (default n / 100)")
    p.add_argument("--queries", type=int, default=100, help="batch size, also the recall queries")
    p.add_argument(
        "--single", type=int, default=20, help="queries timed one at a time (x --repeats, all distinct)"
    )
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions (medians are reported)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="threads for FAISS")
    p.add_argument(
        "--exact-threads",
        type=int,
        nargs="+",
        default=None,
        help="torch thread counts to time exact search with (default: 1 and --threads)",
    )
    p.add_argument(
        "--ivf-spec",
        nargs="+",
        default=None,
        help="IVF-PQ spec(s) (default IVF{~4 sqrt n}_HNSW32,PQ{dim/8}x4fs)",
    )
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument(
        "--refine", type=float, nargs="*", default=[4.0, 8.0], help="re-ranked candidates per result (x k)"
    )
    p.add_argument(
        "--train-per-list", type=int, default=40, help="IVF training vectors per list (k-means time)"
    )
    p.add_argument("--hnsw-spec", default="HNSW32")
    p.add_argument("--hnsw-ef-construction", type=int, default=None, help="default: faiss's 40")
    p.add_argument("--ef", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--skip", nargs="*", default=[], choices=["ivfpq", "hnsw"])
    p.add_argument("--bw-gib", type=float, default=2.0, help="array size for the bandwidth measure")
    p.add_argument("--gen-chunk", type=int, default=50_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "search.json")
    args = p.parse_args(argv)
    if args.exact_threads is None:
        args.exact_threads = sorted({1, args.threads})
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
