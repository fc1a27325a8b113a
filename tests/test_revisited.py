"""Ground-truth loading (restricted unpickler, JSON subset), dataset paths and the R1M list."""

from __future__ import annotations

import csv
import json
import os
import pickle

import pytest

from tokenret.data import GroundTruthError, R1MDistractors, RevisitedDataset, load_ground_truth_pickle

NAMES = ("roxford5k", "rparis6k")


@pytest.mark.parametrize("name", NAMES)
def test_real_pickles_load_like_plain_pickle(revisitop_dir, name):
    path = revisitop_dir / f"gnd_{name}.pkl"
    with open(path, "rb") as f:
        expected = pickle.load(f)
    assert load_ground_truth_pickle(path) == expected


class _RunsShell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _CallsEval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "gnd_evil.pkl"
    payload = {"imlist": ["a"], "qimlist": [], "gnd": [], "x": _RunsShell(f"touch {marker}")}
    path.write_bytes(pickle.dumps(payload, protocol=3))
    with pytest.raises(GroundTruthError, match="refused") as info:
        load_ground_truth_pickle(path)
    assert str(path) in str(info.value)
    assert "system" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_any_global_is_refused(tmp_path, protocol):
    path = tmp_path / "g.pkl"
    path.write_bytes(pickle.dumps([1, _CallsEval()], protocol=protocol))
    with pytest.raises(GroundTruthError, match=r"refused to load (__builtin__|builtins)\.eval"):
        load_ground_truth_pickle(path)


def test_plain_sets_and_nesting_are_allowed(tmp_path):
    data = {"a": [1, 2.5, "x", None, True], "b": {"c": (1, 2)}, "s": {1, 2}, "f": frozenset({3})}
    for protocol in (2, 3, 5):
        path = tmp_path / f"ok{protocol}.pkl"
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        assert load_ground_truth_pickle(path) == data


def test_damaged_or_missing_pickle(tmp_path):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a pickle at all")
    with pytest.raises(GroundTruthError, match="bad.pkl"):
        load_ground_truth_pickle(bad)
    truncated = tmp_path / "trunc.pkl"
    truncated.write_bytes(pickle.dumps({"imlist": list(range(100))}, protocol=3)[:50])
    with pytest.raises(GroundTruthError, match="trunc.pkl"):
        load_ground_truth_pickle(truncated)
    with pytest.raises(FileNotFoundError, match="nothere.pkl"):
        load_ground_truth_pickle(tmp_path / "nothere.pkl")


def _dataset_root(tmp_path, revisitop_dir, name):
    folder = tmp_path / name
    folder.mkdir()
    (folder / f"gnd_{name}.pkl").symlink_to(revisitop_dir / f"gnd_{name}.pkl")
    return tmp_path


def test_from_root_layout_and_paths(tmp_path, revisitop_dir):
    root = _dataset_root(tmp_path, revisitop_dir, "roxford5k")
    ds = RevisitedDataset.from_root(root, "roxford5k")
    assert ds.name == "roxford5k" and len(ds.imlist) == 4993 and len(ds.qimlist) == 70 and len(ds.gnd) == 70
    assert ds.qimlist[0] == "all_souls_000013"
    assert ds.query_box(0) == (136.5, 34.1, 648.5, 955.7)
    assert ds.images_dir == root / "roxford5k" / "jpg"
    assert ds.image_path(0) == root / "roxford5k" / "jpg" / f"{ds.imlist[0]}.jpg"
    assert ds.query_path(0) == root / "roxford5k" / "jpg" / "all_souls_000013.jpg"
    assert len(ds.missing_images()) == 4993 + 70
    with pytest.raises(FileNotFoundError, match="oxbuild_images.tgz"):
        ds.check_images()


def test_from_root_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gnd_rparis6k\.pkl.*cmp\.felk\.cvut\.cz"):
        RevisitedDataset.from_root(tmp_path, "rparis6k")
    with pytest.raises(FileNotFoundError, match="dataset 'oxford105k' not found"):
        RevisitedDataset.from_root(tmp_path, "oxford105k")


def test_subset_json(rparis6k_subset_dir, revisitop_dir):
    ds = RevisitedDataset.from_json(rparis6k_subset_dir / "gnd_rparis6k_subset.json")
    assert ds.name == "rparis6k_subset"
    assert len(ds.imlist) == 238 and len(ds.qimlist) == 12 and len(ds.gnd) == 12
    assert ds.images_dir == rparis6k_subset_dir / "jpg"
    ds.check_images()  # every database and query file exists
    assert all(ds.image_path(i).is_file() for i in range(len(ds.imlist)))
    assert all(ds.query_path(i).is_file() for i in range(len(ds.qimlist)))
    # Roles agree with the manifest, and the labels are the full rparis6k labels restricted to the subset.
    with open(rparis6k_subset_dir / "manifest.csv", newline="") as f:
        roles = {
            row["path"].removeprefix("jpg/").removesuffix(".jpg"): row["rparis6k_role"]
            for row in csv.DictReader(f)
        }
    assert {roles[n] for n in ds.imlist} == {"db"} and {roles[n] for n in ds.qimlist} == {"query"}
    full = load_ground_truth_pickle(revisitop_dir / "gnd_rparis6k.pkl")
    in_subset = set(ds.imlist)
    for q, g in enumerate(ds.gnd):
        full_q = full["qimlist"].index(ds.qimlist[q])
        assert ds.query_box(q) == tuple(float(v) for v in full["gnd"][full_q]["bbx"])
        for key in ("easy", "hard", "junk"):
            expected = {full["imlist"][i] for i in full["gnd"][full_q][key]} & in_subset
            assert {ds.imlist[i] for i in g[key]} == expected


def test_json_validation(tmp_path):
    path = tmp_path / "gnd_bad.json"
    path.write_text(
        json.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [3], "hard": [], "junk": []}]})
    )
    with pytest.raises(GroundTruthError, match=r"gnd\[0\]\['easy'\]"):
        RevisitedDataset.from_json(path)
    path.write_text("{not json")
    with pytest.raises(GroundTruthError, match="gnd_bad.json"):
        RevisitedDataset.from_json(path)
    path.write_text(json.dumps({"imlist": ["a"]}))
    with pytest.raises(GroundTruthError, match="missing keys"):
        RevisitedDataset.from_json(path)


def test_r1m_list(tmp_path):
    folder = tmp_path / "revisitop1m"
    folder.mkdir()
    (folder / "revisitop1m.txt").write_text("a/b/img1.jpg\n\nc/img2.png\nd/img3\n")
    for root in (tmp_path, folder):
        r1m = R1MDistractors.from_root(root)
        assert len(r1m) == 3
        assert r1m.imlist == ["a/b/img1.jpg", "c/img2.png", "d/img3.jpg"]
        assert r1m.image_path(0) == (folder / "jpg" / "a" / "b" / "img1.jpg").absolute()
        assert r1m.image_path(0).is_absolute()
        assert r1m.image_paths()[2] == (folder / "jpg" / "d" / "img3.jpg").absolute()


def test_r1m_missing_list(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"revisitop1m\.txt.*ptak\.felk\.cvut\.cz"):
        R1MDistractors.from_root(tmp_path)
