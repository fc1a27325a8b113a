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


# -- odd folder entries, orphan rows, non-finite descriptors -------------------------------------------


def random_png(path, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path, format="PNG")


@pytest.fixture
def odd_folder(tmp_path):
    """Two good photos beside every kind of entry that once stopped or stalled an indexing run."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    random_png(root / "good1.png", 1)
    random_png(root / "sub" / "good2.png", 2)
    os.symlink(root / "loop_b.jpg", root / "loop_a.jpg")  # a.jpg -> b.jpg -> a.jpg
    os.symlink(root / "loop_a.jpg", root / "loop_b.jpg")
    os.symlink(tmp_path / "elsewhere" / "gone.jpg", root / "broken.jpg")
    os.mkfifo(root / "pipe.jpg")
    random_png(os.path.join(os.fsencode(root), b"caf\xff.png"), 3)  # a name that is not UTF-8
    (root / "folder.jpg").mkdir()  # a folder named like an image: not an entry, walked into
    return root


def run_with_alarm(fn, seconds=120):
    """``fn()``, failing (not hanging) if it blocks, as opening a named pipe would."""
    import signal

    def stalled(*_):
        raise TimeoutError("blocked: an entry was opened that should have been skipped")

    old = signal.signal(signal.SIGALRM, stalled)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_odd_entries_are_skipped_and_recorded_under_their_own_path(odd_folder, tmp_path):
    model = tiny_model()
    with ImageIndex.create(tmp_path / "idx", model, ExtractionConfig(**CONFIG)) as index:
        counts = run_with_alarm(lambda: index.sync(odd_folder, model, progress=False, num_workers=0))
        assert counts == {"added": 2, "updated": 0, "unchanged": 0, "failed": 5, "removed": 0}
        assert sorted(Path(p).name for p in index.paths()) == ["good1.png", "good2.png"]
        reasons = {p: r for p, r in index.failures()}
        root = str(odd_folder)
        assert reasons[f"{root}/loop_a.jpg"] == reasons[f"{root}/loop_b.jpg"] == "symlink loop"
        assert reasons[f"{root}/broken.jpg"] == f"broken symlink (to {tmp_path}/elsewhere/gone.jpg)"
        assert reasons[f"{root}/pipe.jpg"] == "not a regular file (a named pipe)"
        assert reasons[f"{root}/caf\\xff.png"].startswith("the file name is not valid UTF-8")
        assert len(reasons) == 5
        rows = (index.path / "vectors.f16").stat().st_size // (2 * index.dim)
        assert rows == 2
        # nothing changed: nothing is described or recorded again, no row is added
        again = run_with_alarm(lambda: index.sync(odd_folder, model, progress=False, num_workers=0))
        assert again == {"added": 0, "updated": 0, "unchanged": 7, "failed": 0, "removed": 0}
        assert (index.path / "vectors.f16").stat().st_size // (2 * index.dim) == rows
        # a broken link mended is described; entries that leave the folder leave the index
        (tmp_path / "elsewhere").mkdir()
        random_png(tmp_path / "elsewhere" / "gone.jpg", 4)
        (odd_folder / "pipe.jpg").unlink()
        third = run_with_alarm(lambda: index.sync(odd_folder, model, progress=False, num_workers=0))
        assert third["updated"] == 1 and third["removed"] == 1 and third["failed"] == 0
        assert f"{root}/broken.jpg" in index.paths()


def test_an_unlistable_folder_is_recorded_and_the_rest_indexed(odd_folder, tmp_path, monkeypatch):
    locked = odd_folder / "sub"
    real_scandir = os.scandir

    def scandir(path="."):
        # as a folder without read permission (the tests may run as root, whom permissions do not stop)
        if not isinstance(path, int) and os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    model = tiny_model()
    with ImageIndex.create(tmp_path / "idx", model, ExtractionConfig(**CONFIG)) as index:
        counts = run_with_alarm(lambda: index.sync(odd_folder, model, progress=False, num_workers=0))
        assert counts["added"] == 1 and counts["failed"] == 6
        assert dict(index.failures())[str(locked)] == "cannot read the folder: Permission denied"


def test_a_failed_write_leaves_no_orphan_rows(tmp_path, monkeypatch):
    folder = tmp_path / "img"
    folder.mkdir()
    names = [f"{i}.jpg" for i in range(6)]
    for n in names:
        (folder / n).touch()
    vectors = np.stack([intended_vector(n) for n in names])
    with ImageIndex.create(tmp_path / "idx", tiny_model(), ExtractionConfig(**CONFIG)) as index:
        index.add_descriptors([folder / n for n in names[:2]], vectors[:2])
        real = index.catalogue.db

        class FailingCommit:
            """The SQLite connection, failing the insert of the next chunk's records (after its vectors)."""

            def __getattr__(self, name):
                return getattr(real, name)

            def __enter__(self):
                return real.__enter__()

            def __exit__(self, *exc):
                return real.__exit__(*exc)

            def executemany(self, sql, rows):
                if sql.startswith("INSERT INTO images"):
                    raise OSError("disk full")
                return real.executemany(sql, rows)

        index.catalogue.db = FailingCommit()
        with pytest.raises(OSError, match="disk full"):
            index.add_descriptors([folder / n for n in names[2:4]], vectors[2:4])
        index.catalogue.db = real
        assert (index.path / "vectors.f16").stat().st_size // (2 * index.dim) == 4  # 2 orphan rows now
        index.add_descriptors([folder / n for n in names[2:]], vectors[2:])
        vecs, ids, rows = index.vectors()
        assert len(vecs) == 6 and sorted(rows.tolist()) == list(range(6))  # the orphans were reused
        path_of = index.catalogue.paths_of(ids.tolist())
        for i, r in zip(ids, rows, strict=True):
            np.testing.assert_allclose(vecs[r], intended_vector(Path(path_of[int(i)]).name), atol=2e-3)


def test_non_finite_descriptors_are_refused_with_the_file_named(tmp_path):
    model = tiny_model()
    with torch.no_grad():  # damaged weights: NaN in the last layer (a fused ReLU would hide NaN in the trunk)
        list(model.parameters())[-1].fill_(float("nan"))
    photos = tmp_path / "photos"
    photos.mkdir()
    random_png(photos / "a.png", 1)
    with ImageIndex.create(tmp_path / "idx", model, ExtractionConfig(**CONFIG)) as index:
        counts = index.sync(photos, model, progress=False, num_workers=0)
        assert counts["added"] == 0 and counts["failed"] == 1
        [(path, reason)] = index.failures()
        assert path == str(photos / "a.png") and "NaN or infinite" in reason
        assert (index.path / "vectors.f16").stat().st_size == 0


# -- the store is checked ----------------------------------------------------------------------------


@pytest.fixture
def six_photo_index(tmp_path):
    """An index of six random photos, stored two per write (three chunks of the vector file)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        random_png(photos / f"{i}.png", 10 + i)
    model = tiny_model()
    ckpt = save_checkpoint(model, tmp_path / "tiny.pth")
    with ImageIndex.create(tmp_path / "idx", model, ExtractionConfig(**CONFIG), checkpoint=ckpt) as index:
        index.add_paths(sorted(photos.glob("*.png")), model, chunk=2, progress=False, num_workers=0)
        vecs, ids, rows = index.vectors()
        stored = {index.image_path(int(i)): np.array(vecs[r]) for i, r in zip(ids, rows, strict=True)}
    return tmp_path / "idx", model, stored


def stored_vectors(index):
    vecs, ids, rows = index.vectors()
    return {index.image_path(int(i)): np.array(vecs[r]) for i, r in zip(ids, rows, strict=True)}


def test_a_truncated_vector_file_is_refused_on_open_and_repaired(six_photo_index, capsys):
    from tokenret.cli import main
    from tokenret.collection import IndexDamagedError

    path, model, before = six_photo_index
    f = path / "vectors.f16"
    f.write_bytes(f.read_bytes()[: -3 * 2 * 16])  # 3 of 6 rows gone
    with pytest.raises(
        IndexDamagedError, match=r"3 image\(s\) point past the end of vectors.f16 \(3 rows, 6"
    ):
        ImageIndex(path)
    assert main(["index", str(path), "--report"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"tokenret index {path} --repair" in err
    assert main(["index", str(path), "--repair", "--workers", "0", "--quiet"]) == 0
    assert ">> repaired 3, unreadable 0; 6 images searchable" in capsys.readouterr().out
    with ImageIndex(path) as index:
        assert index.catalogue.vector_name() == "vectors.1.f16"  # repair compacted into a new file
        assert index.verify().ok and (path / "vectors.1.f16").stat().st_size == 6 * 2 * 16
        assert not (path / "vectors.f16").exists()
        after = stored_vectors(index)
        assert sorted(after) == sorted(before)
        for p in before:  # described again exactly as before
            np.testing.assert_array_equal(after[p], before[p])


def test_changed_bytes_are_found_by_the_chunk_checksums_and_repaired(six_photo_index):
    path, model, before = six_photo_index
    with open(path / "vectors.f16", "r+b") as f:  # one value of row 3 (the second chunk: rows 2-3)
        f.seek((3 * 16 + 5) * 2)
        f.write(np.float16(0.5).tobytes())
    with ImageIndex(path) as index:  # the cheap check on open sees nothing
        found = index.verify()
        assert not found.ok and found.missing == [] and found.chunks_checked == 3
        vecs, ids, rows = index.vectors()
        assert sorted(found.damaged) == sorted(
            index.image_path(int(i)) for i, r in zip(ids, rows, strict=True) if r in (2, 3)
        )
        assert index.repair(model, progress=False, num_workers=0) == {"repaired": 2, "failed": 0}
        assert index.verify().ok
        after = stored_vectors(index)
        for p in before:
            np.testing.assert_array_equal(after[p], before[p])


def _drop_two(path: Path, before: dict) -> list[str]:
    """Remove two images from the index (dead rows for compaction to drop); returns their paths."""
    gone = sorted(before)[1:3]
    with ImageIndex(path) as index:
        index.catalogue.remove_paths(gone)
    return gone


class PowerCut(Exception):
    pass


def test_compaction_interrupted_before_its_commit_leaves_the_old_index_whole(six_photo_index, monkeypatch):
    path, model, before = six_photo_index
    gone = _drop_two(path, before)
    import sqlite3

    real_connect = sqlite3.connect

    def cut_at_commit(*a, **k):  # the process dies when the new rows would commit
        class Db:
            def __init__(self):
                self.db = real_connect(*a, **k)

            def __getattr__(self, name):
                return getattr(self.db, name)

            def __enter__(self):
                return self.db.__enter__()

            def __exit__(self, *exc):
                self.db.rollback()
                raise PowerCut

        return Db()

    monkeypatch.setattr(sqlite3, "connect", cut_at_commit)
    with ImageIndex(path) as index:
        with pytest.raises(PowerCut):
            index.compact()
    monkeypatch.undo()
    assert (path / "vectors.1.f16").exists()  # written, never named by a committed record
    with ImageIndex(path) as index:
        assert index.catalogue.vector_name() == "vectors.f16" and index.verify().ok
        after = stored_vectors(index)
        assert sorted(after) == sorted(set(before) - set(gone))
        for p in after:
            np.testing.assert_array_equal(after[p], before[p])
        index.compact()  # the next write removes the stray and compacts for real
        assert index.catalogue.vector_name() == "vectors.1.f16" and index.verify().ok
        assert sorted(f.name for f in path.glob("vectors*")) == ["vectors.1.f16"]
        assert (path / "vectors.1.f16").stat().st_size == 4 * 2 * 16
        for p, v in stored_vectors(index).items():
            np.testing.assert_array_equal(v, before[p])


def test_compaction_interrupted_after_its_commit_leaves_the_new_index_whole(six_photo_index, monkeypatch):
    path, model, before = six_photo_index
    gone = _drop_two(path, before)
    from tokenret.collection import catalogue

    real_remove = catalogue.Catalogue.remove_stray_vector_files

    def cut_once_committed(self):  # the process dies after the commit, before the old file is removed
        if self.read_settings().get("vector_file") == "vectors.1.f16":
            raise PowerCut
        return real_remove(self)

    monkeypatch.setattr(catalogue.Catalogue, "remove_stray_vector_files", cut_once_committed)
    with ImageIndex(path) as index:
        with pytest.raises(PowerCut):
            index.compact()
    monkeypatch.undo()
    assert (path / "vectors.f16").exists() and (path / "vectors.1.f16").exists()
    expected = sorted(set(before) - set(gone))
    with ImageIndex(path) as index:  # reads the new file, the old one is ignored
        assert index.catalogue.vector_name() == "vectors.1.f16" and index.verify().ok
        assert (path / "vectors.1.f16").stat().st_size == 4 * 2 * 16
        after = stored_vectors(index)
        assert sorted(after) == expected
        for p in after:
            np.testing.assert_array_equal(after[p], before[p])
        hits = index.search_images([Path(expected[0])], model, k=4, num_workers=0)[0]
        assert hits[0].path == expected[0] and hits[0].score == pytest.approx(1.0, abs=2e-3)
        index.compact()  # the next write removes the stray (and compacts again: nothing to drop)
    assert sorted(f.name for f in path.glob("vectors*")) == ["vectors.2.f16"]


def test_a_reader_open_during_a_compaction_reads_the_new_rows_from_the_new_file(six_photo_index):
    path, model, before = six_photo_index
    gone = _drop_two(path, before)
    with ImageIndex(path) as reader, ImageIndex(path) as writer:
        first = stored_vectors(reader)  # the reader maps the old file
        writer.compact()
        assert not (path / "vectors.f16").exists()
        second = stored_vectors(reader)  # and then reads the new rows from the new file
        assert sorted(first) == sorted(second) == sorted(set(before) - set(gone))
        for p in second:
            np.testing.assert_array_equal(second[p], before[p])
        query = sorted(second)[0]
        hits = reader.search_images([Path(query)], model, k=4, num_workers=0)[0]
        assert [h.path for h in hits][0] == query and len(hits) == 4


def test_a_query_box_outside_the_image_is_refused_by_the_cli_and_the_api(six_photo_index, capsys):
    from tokenret.cli import main
    from tokenret.extraction import ExtractionError

    path, model, before = six_photo_index
    query = sorted(before)[0]  # a 64x48 photo
    t0 = time.monotonic()
    assert main(["search", str(path), query, "--box", "900,900,5000,5000", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") <= 2 and "0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 48" in err and "outside" in err
    assert time.monotonic() - t0 < 30  # refused, not padded to 4100x4100 and run
    with ImageIndex(path) as index:
        with pytest.raises(ExtractionError, match="outside the image"):
            index.search_images([query], model, k=3, boxes=[(900, 900, 5000, 5000)], num_workers=0)
        hits = index.search_images([query], model, k=3, boxes=[(0, 0, 64, 48)], num_workers=0)[0]
        assert hits[0].path == query
