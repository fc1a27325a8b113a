"""Load benchmark of ``tokenret serve``: throughput and latency under N concurrent clients, beside the
offline extraction rate of the same model and settings, measured in the same run.

The server runs in its own process (``tokenret serve``, as a user starts it) on 127.0.0.1; the clients are
threads of this process, each sending its searches one after another (a bounded load: a fixed number of
requests and a time cap). Reported: requests/s, p50/p95/p99 latency, errors, the server's RSS before and
after the load (flat memory), and the offline rate (``extract_descriptors`` over the same query bytes,
batches of the server's ``--max-batch``, in this process while the server idles).

The phases take turns over ``--rounds`` rounds (the machine is shared: ratios of the same minutes, then
medians). A third phase of each round measures the slow-client case: the same load while 40 more clients
hold connections open, trickling a body one byte at a time; goal: the load's p95 grows by no more than 20%.

Goals (issue 14): at 8 clients, throughput >= 0.9x the offline rate, no errors, flat memory; slow
clients delay p95 by <= 20%.

Example:
    python bench/serve.py --clients 8 --requests 64 --json bench/results/serve_cpu.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_photos(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """``n`` JPEGs of ``size`` with coloured rectangles (distinct per image)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    w, h = size
    for i in range(n):
        a = np.empty((h, w, 3), np.uint8)
        a[:] = rng.integers(0, 255, 3)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            dy, dx = int(rng.integers(10, h // 2)), int(rng.integers(10, w // 2))
            a[y0 : y0 + dy, x0 : x0 + dx] = rng.integers(0, 255, 3)
        p = folder / f"photo{i:04d}.jpg"
        Image.fromarray(a).save(p, quality=90)
        paths.append(p)
    return paths


def rss_mb(pid: int) -> float:
    """Resident memory of a process (MB), from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def search(port: int, data: bytes, timeout: float = 120) -> tuple[int, float]:
    """(status, seconds) of one search on a new connection."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/search?k=10", body=data, headers={"Content-Type": "image/jpeg"})
        response = conn.getresponse()
        response.read()
        status = response.status
    except OSError:
        status = 0
    finally:
        conn.close()
    return status, time.perf_counter() - start


def load(port: int, queries: list[bytes], clients: int, requests: int, cap: float) -> dict:
    """``clients`` threads sending ``requests`` searches in all (or until ``cap`` seconds)."""
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: list[int] = []
    next_request = [0]
    deadline = time.perf_counter() + cap

    def client() -> None:
        while time.perf_counter() < deadline:
            with lock:
                i = next_request[0]
                if i >= requests:
                    return
                next_request[0] += 1
            status, seconds = search(port, queries[i % len(queries)])
            with lock:
                statuses.append(status)
                if status == 200:
                    latencies.append(seconds)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    q = np.percentile(latencies, [50, 95, 99]) if latencies else [float("nan")] * 3
    return {
        "clients": clients,
        "requests": len(statuses),
        "ok": len(latencies),
        "errors": len(statuses) - len(latencies),
        "statuses": sorted(set(statuses)),
        "seconds": round(wall, 3),
        "throughput": round(len(latencies) / wall, 3),
        "p50": round(float(q[0]), 4),
        "p95": round(float(q[1]), 4),
        "p99": round(float(q[2]), 4),
    }


def trickle(port: int, stop: threading.Event, opened: list) -> None:
    """A slow client: announces a 500 kB upload and sends a byte now and then until stopped, reconnecting
    when the server times it out."""
    while not stop.is_set():
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            opened.append(1)
            s.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n")
            s.sendall(b"Content-Length: 500000\r\n\r\n")
            while not stop.is_set():
                s.sendall(b"x")
                stop.wait(0.5)
        except OSError:
            stop.wait(0.2)  # timed out by the server (408) or refused: reconnect
        finally:
            try:
                s.close()
            except Exception:
                pass


def median_of(rounds: list[dict], phase: str, key: str) -> float:
    return round(statistics.median(r[phase][key] for r in rounds), 3)


def offline_rate(index_path: Path, queries: list[bytes], batch: int, repeats: int) -> dict:
    """Images/s of describing the query bytes offline with the index's model and settings, batch ``batch``."""
    from tokenret.collection import ImageIndex
    from tokenret.extraction import extract_descriptors

    with ImageIndex(index_path) as index:
        model = index.load_model()
        binding = index.bind(model)
        config = binding.extraction_config(num_workers=0, device="cpu", batch_size=batch)
        extract_descriptors(model, queries[:batch], config=config, progress=False)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            extract_descriptors(model, queries, config=config, progress=False)
            times.append(time.perf_counter() - start)
    t = statistics.median(times)
    return {"images": len(queries), "seconds": round(t, 3), "rate": round(len(queries) / t, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gem_r50")
    ap.add_argument("--images", type=Path, help="a folder of photos to index (default: synthetic JPEGs)")
    ap.add_argument("--n", type=int, default=40, help="photos in the index (synthetic)")
    ap.add_argument("--size", default="256x192", help="synthetic photo size WxH")
    ap.add_argument("--max-size", type=int, default=256)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--cap", type=float, default=300, help="time cap of each load phase (s)")
    ap.add_argument("--slow-clients", type=int, default=40)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of offline / loaded / slow-client phases")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()

    import torch
    from machine import describe_machine  # bench/machine.py, beside this script

    import tokenret
    from tokenret.collection import ImageIndex
    from tokenret.extraction import ExtractionConfig

    machine = describe_machine()  # this process's torch threads (the offline rate's)
    machine["cores"] = machine["cpus"]  # the key of earlier results

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-serve-"))
    if args.images:
        kinds = (".jpg", ".jpeg", ".png")
        photos = sorted(p for p in args.images.iterdir() if p.suffix.lower() in kinds)[: args.n]
        folder = args.images
    else:
        w, h = (int(v) for v in args.size.split("x"))
        folder = work / "photos"
        photos = synthetic_photos(folder, args.n, (w, h))
    index_path = work / "idx"
    if not index_path.exists():
        torch.manual_seed(0)
        model = tokenret.create_model(args.model)  # random weights: the index keeps a copy
        config = ExtractionConfig(max_size=args.max_size, scales=(1.0,))
        with ImageIndex.create(index_path, model, config) as index:
            index.sync(folder, model, progress=False, num_workers=0)
    queries = [p.read_bytes() for p in photos]

    port_socket = socket.socket()
    port_socket.bind(("127.0.0.1", 0))
    port = port_socket.getsockname()[1]
    port_socket.close()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokenret.cli",
            "serve",
            str(index_path),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--max-batch",
            str(args.max_batch),
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = server.stdout.readline()
        if "serving" not in line:
            raise SystemExit(f"the server did not start: {line}{server.stdout.read()}")
        for _ in range(3):  # warm the server up
            search(port, queries[0])
        sample = queries[: max(args.max_batch * 4, 8)]
        rss = [rss_mb(server.pid)]
        alone = load(port, queries, 1, min(args.requests, 16), args.cap)
        rounds = []
        # the phases take turns, round after round, so that each ratio compares runs of the same minutes
        for _ in range(args.rounds):
            offline = offline_rate(index_path, sample, args.max_batch, 1)
            loaded = load(port, queries, args.clients, args.requests, args.cap)
            rss.append(rss_mb(server.pid))
            stop, opened = threading.Event(), []
            slow = [
                threading.Thread(target=trickle, args=(port, stop, opened)) for _ in range(args.slow_clients)
            ]
            for t in slow:
                t.start()
            time.sleep(1.0)
            with_slow = load(port, queries, args.clients, args.requests, args.cap)
            stop.set()
            for t in slow:
                t.join()
            rss.append(rss_mb(server.pid))
            with_slow.update(slow_clients=args.slow_clients, connections=len(opened))
            rounds.append(
                {
                    "offline": offline,
                    "loaded": loaded,
                    "with_slow_clients": with_slow,
                    "throughput_vs_offline": round(loaded["throughput"] / offline["rate"], 3),
                    "p95_with_slow_vs_without": round(with_slow["p95"] / loaded["p95"], 3),
                }
            )
    finally:
        server.terminate()
        server.wait(30)

    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in rounds), 3)

    result = {
        "machine": machine,
        "model": args.model,
        "max_size": args.max_size,
        "index_images": len(photos),
        "one_client": alone,
        "rounds": rounds,
        "rss_mb": [round(v, 1) for v in rss],
        "median": {
            "offline_rate": median_of(rounds, "offline", "rate"),
            "throughput": median_of(rounds, "loaded", "throughput"),
            "throughput_vs_offline": median("throughput_vs_offline"),
            "p95": median_of(rounds, "loaded", "p95"),
            "p95_with_slow": median_of(rounds, "with_slow_clients", "p95"),
            "p95_with_slow_vs_without": median("p95_with_slow_vs_without"),
            "errors": sum(r["loaded"]["errors"] + r["with_slow_clients"]["errors"] for r in rounds),
        },
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
