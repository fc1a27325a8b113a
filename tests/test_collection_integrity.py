"""A folder index under concurrency: one writer at a time, readers unaffected, nothing corrupted."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import tokenret
from tokenret.collection import ImageIndex
from tokenret.collection.lock import IndexLockedError, WriterLock
from tokenret.extraction import ExtractionConfig
from tokenret.models.checkpoints import save_checkpoint

TINY = {"backbone": "resnet18", "dim": 32, "num_heads": 4, "out_dim": 16}
CONFIG = {"max_size": 64, "scales": (1.0,)}
DIM = 16
PER_WRITER, CHUNK = 300, 1


def tiny_model():
    torch.manual_seed(0)
    return tokenret.create_model("token_r50", **TINY)


def intended_vector(name: str) -> np.ndarray:
    """The descriptor a writer adds for the file ``name``: a unit vector only that name gives."""
    rng = np.random.default_rng(int.from_bytes(name.encode(), "little") % 2**32)
    v = rng.standard_normal(DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


def hammer(index_path: str, folder: str, writer: int, start) -> None:
    """Add PER_WRITER descriptors, CHUNK at a time, each chunk its own write."""
    start.wait()
    with ImageIndex(index_path) as index:
        names = [f"w{writer}_{i:04d}.jpg" for i in range(PER_WRITER)]
        for s in range(0, PER_WRITER, CHUNK):
            part = names[s : s + CHUNK]
            index.add_descriptors(
                [Path(folder) / n for n in part], np.stack([intended_vector(n) for n in part])
            )


def test_two_processes_writing_at_once_keep_every_record_on_its_own_vector(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    for w in range(2):
        for i in range(PER_WRITER):
            (folder / f"w{w}_{i:04d}.jpg").touch()
    ImageIndex.create(tmp_path / "idx", tiny_model(), ExtractionConfig(**CONFIG)).close()
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)  # both begin writing together
    procs = [
        ctx.Process(target=hammer, args=(str(tmp_path / "idx"), str(folder), w, start)) for w in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    with ImageIndex(tmp_path / "idx") as index:
        vecs, ids, rows = index.vectors()
        assert len(ids) == 2 * PER_WRITER and len(np.unique(rows)) == len(rows)  # no row shared
        assert len(vecs) == 2 * PER_WRITER  # no orphan rows either
        path_of = index.catalogue.paths_of(ids.tolist())
        stored = np.asarray(vecs[rows], dtype=np.float32)
        want = np.stack([intended_vector(Path(path_of[int(i)]).name) for i in ids])
        wrong = int((np.abs(stored - want).max(axis=1) > 2e-3).sum())
        assert wrong == 0, f"{wrong} records point at another image's vector"


def create_at_once(index_path: str, checkpoint: str, start, results) -> None:
    model = tokenret.create_model("token_r50", checkpoint=checkpoint, **TINY)
    start.wait()
    with ImageIndex.create(
        index_path, model, ExtractionConfig(**CONFIG), checkpoint=checkpoint, exist_ok=True
    ):
        results.put(os.getpid())


def test_two_processes_creating_one_index_both_get_it(tmp_path):
    ckpt = save_checkpoint(tiny_model(), tmp_path / "tiny.pth")
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(2), ctx.Queue()
    args = (str(tmp_path / "idx"), str(ckpt), start, results)
    procs = [ctx.Process(target=create_at_once, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert sorted(results.get(timeout=5) for _ in procs) == sorted(p.pid for p in procs)
    with ImageIndex(tmp_path / "idx") as index:
        assert index.db.execute("SELECT COUNT(*) FROM settings WHERE key = 'format'").fetchone()[0] == 1


def test_two_index_commands_creating_one_index(tmp_path):
    """What a user hit: two `tokenret index` runs creating the same new index at once."""
    ckpt = save_checkpoint(tiny_model(), tmp_path / "tiny.pth")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    from PIL import Image

    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    cmd = [sys.executable, "-m", "tokenret.cli", "index", str(photos), "--out", str(tmp_path / "idx")]
    cmd += ["--model", "token_r50", "--checkpoint", str(ckpt), "--max-size", "64", "--scales", "1"]
    cmd += [arg for k, v in TINY.items() for arg in ("--model-arg", f"{k}={v}")]
    cmd += ["--workers", "0", "--quiet"]
    env = {**os.environ, "TOKENRET_DEVICE": "cpu"}
    runs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outs = [r.communicate(timeout=300) for r in runs]
    for r, (_, err) in zip(runs, outs, strict=True):
        assert r.returncode == 0, err
    assert sorted(o for o, _ in outs) == sorted(
        [
            ">> added 6, updated 0, unchanged 0, failed 0, removed 0; 6 images searchable\n",
            ">> added 0, updated 0, unchanged 6, failed 0, removed 0; 6 images searchable\n",
        ]
    )


def test_a_second_writer_refuses_naming_the_holder_and_readers_go_on(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    (folder / "a.jpg").touch()
    with ImageIndex.create(tmp_path / "idx", tiny_model(), ExtractionConfig(**CONFIG)) as index:
        index.add_descriptors([folder / "a.jpg"], intended_vector("a.jpg")[None])
    with WriterLock(tmp_path / "idx"):
        with ImageIndex(tmp_path / "idx", lock_timeout=0) as other:
            with pytest.raises(IndexLockedError, match=rf"being written by pid {os.getpid()} on .*since"):
                other.remove_paths([folder / "a.jpg"])
            # a reader is not held up by the writer
            assert [h.path for h in other.search(intended_vector("a.jpg")[None], 1)[0]] == [
                str(folder / "a.jpg")
            ]
        with ImageIndex(tmp_path / "idx", lock_timeout=0.3) as waiting:
            t0 = time.monotonic()
            with pytest.raises(IndexLockedError):
                waiting.compact()
            assert time.monotonic() - t0 >= 0.3
    with ImageIndex(tmp_path / "idx", lock_timeout=0) as index:
        assert index.remove_paths([folder / "a.jpg"]) == 1  # free again


HOLD = """
import sys, time
from tokenret.collection.lock import WriterLock
lock = WriterLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_the_lock_goes_with_a_killed_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "idx")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(IndexLockedError, match=f"pid {holder.pid}"):
            WriterLock(tmp_path / "idx", timeout=0).acquire()
    finally:
        holder.kill()
        holder.wait()
    with WriterLock(tmp_path / "idx", timeout=0) as lock:
        assert lock.held and lock.read_holder()["pid"] == os.getpid()
    assert lock.read_holder() is None  # released: names nobody
