"""GLDv2 layout and labels, your own folders / CSV, the per-class split, reproducible augmentation."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from tokenret.data.augment import LabelledImageDataset, TrainTransform, ValTransform
from tokenret.data.folders import (
    LabelledImages,
    read_class_folders,
    read_csv_labels,
    split_by_list,
    split_per_class,
)
from tokenret.data.gldv2 import gldv2_image_path, read_gldv2, release_split
from tokenret.train.config import load_config
from tokenret.train.data import load_training_data


def _save(path, seed=0, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------------------------------- split


def _naive_release_split(labels, fraction, seed):
    """The release's builder per class in label order, shuffle, first max(1, int(f*n)) to val."""
    rs = np.random.RandomState(np.random.MT19937(np.random.SeedSequence(seed)))
    train, val = [], []
    for c in sorted(set(labels.tolist())):
        members = [i for i, lab in enumerate(labels) if lab == c]
        rs.shuffle(members)
        k = max(1, int(fraction * len(members)))
        val += members[:k]
        train += members[k:]
    train, val = np.array(train), np.array(val)
    rs.shuffle(train)
    rs.shuffle(val)
    return train, val


def test_per_class_split_is_the_releases_and_reproducible_from_its_seed():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 30, 400)
    labels[:1] = 30  # a class with a single image: only in validation
    train, val = split_per_class(labels, 0.2, seed=0)
    ref_train, ref_val = _naive_release_split(labels, 0.2, 0)
    np.testing.assert_array_equal(train, ref_train)
    np.testing.assert_array_equal(val, ref_val)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(400))
    for c in range(31):
        n = int((labels == c).sum())
        assert int((labels[val] == c).sum()) == max(1, int(0.2 * n))
    assert 30 not in labels[train]
    again = split_per_class(labels, 0.2, seed=0)
    np.testing.assert_array_equal(again[0], train)
    other = split_per_class(labels, 0.2, seed=1)
    assert not np.array_equal(np.sort(other[1]), np.sort(val))
    all_train, none = split_per_class(labels, 0.0, seed=0)
    assert len(all_train) == 400 and len(none) == 0


# ------------------------------------------------------------------------------------------------ GLDv2


@pytest.fixture()
def gldv2_root(tmp_path):
    root = tmp_path / "gldv2"
    root.mkdir()
    clean = {
        "9": ["a1b2c3d4e5f60001", "a1b2c3d4e5f60002"],
        "10": ["ffee000000000001"],
        "100": ["0123456789abcdef"],
    }
    rows = ["landmark_id,images"] + [f"{lm},{' '.join(ids)}" for lm, ids in clean.items()]
    (root / "train_clean.csv").write_text("\n".join(rows) + "\n")
    full = ["id,url,landmark_id"] + [f"{i},http://x/{i}.jpg,{lm}" for lm, ids in clean.items() for i in ids]
    full.append("0000000000000bad,http://x/bad.jpg,7")
    (root / "train.csv").write_text("\n".join(full) + "\n")
    for ids in clean.values():
        for i in ids:
            _save(gldv2_image_path(root, i))
    return root


def test_gldv2_clean_labels_are_landmark_ids_sorted_as_strings(gldv2_root):
    images = read_gldv2(gldv2_root)
    assert images.class_names == ["10", "100", "9"]  # string order, as the release's relabeling
    assert images.ids == ["a1b2c3d4e5f60001", "a1b2c3d4e5f60002", "ffee000000000001", "0123456789abcdef"]
    assert images.labels.tolist() == [2, 2, 0, 1]
    assert images.paths[0] == str(gldv2_root / "train" / "a" / "1" / "b" / "a1b2c3d4e5f60001.jpg")
    full = read_gldv2(gldv2_root, "train.csv")
    assert full.class_names == ["10", "100", "7", "9"] and len(full) == 5
    present, missing = full.existing()
    assert len(present) == 4 and missing == [str(gldv2_image_path(gldv2_root, "0000000000000bad"))]
    train, val = release_split(images)
    assert len(val) == 3 and len(train) == 1  # every class gives its first image to validation


def test_gldv2_errors_say_what_is_missing(tmp_path, gldv2_root):
    with pytest.raises(FileNotFoundError, match="train_clean.csv"):
        read_gldv2(tmp_path)
    (tmp_path / "odd.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a GLDv2 list"):
        read_gldv2(tmp_path, "odd.csv")


def test_validation_list_and_missing_files_through_the_training_config(gldv2_root, tmp_path, caplog):
    val_list = tmp_path / "val.txt"
    val_list.write_text("# held out\nffee000000000001\n")
    cfg = load_config(
        None, [f"data.root={gldv2_root}", "data.gldv2_list=train.csv", f"data.val_list={val_list}"]
    )
    with caplog.at_level(logging.WARNING):
        data = load_training_data(cfg)
    assert data.val.ids == ["ffee000000000001"] and len(data.train) == 3  # the missing file is left out
    assert "1 listed image(s) do not exist" in caplog.text
    assert data.num_classes == 4
    val_list.write_text("nope\n")
    with pytest.raises(ValueError, match="match no training image"):
        load_training_data(cfg)


# ---------------------------------------------------------------------------------------- folders / CSV


def test_class_folders_and_csv_give_the_same_labels(tmp_path):
    root = tmp_path / "mine"
    for cls, n in (("tower", 3), ("bridge", 2)):
        for i in range(n):
            _save(root / cls / f"{i}.jpg", seed=i)
    _save(root / "tower" / "more" / "x.png")  # nested files belong to the class folder
    (root / "tower" / "notes.txt").write_text("not an image")
    images = read_class_folders(root)
    assert images.class_names == ["bridge", "tower"] and len(images) == 6
    assert images.labels.tolist() == [0, 0, 1, 1, 1, 1]
    assert images.ids[0] == "bridge/0.jpg"

    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n" + "\n".join(f"mine/{i},{i.split('/')[0]}" for i in images.ids) + "\n")
    from_csv = read_csv_labels(csv)
    assert from_csv.labels.tolist() == images.labels.tolist() and from_csv.paths == images.paths
    headerless = tmp_path / "h.csv"
    headerless.write_text(f"{images.paths[0]},b\n{images.paths[2]},a\n")
    assert read_csv_labels(headerless).labels.tolist() == [1, 0]
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nonly_a_path\n")
    with pytest.raises(ValueError, match=r"bad.csv:2"):
        read_csv_labels(bad)
    train, val = split_by_list(images, ["tower/0.jpg", images.paths[0]])
    assert sorted(val.tolist()) == [0, 2] and len(train) == 4
    with pytest.raises(FileNotFoundError, match="no images found"):
        read_class_folders(tmp_path / "mine" / "tower" / "more")


# ------------------------------------------------------------------------------------------ augmentation


def test_augmentation_depends_only_on_seed_epoch_and_index_and_leaves_global_rng_alone(tmp_path):
    paths = [str(_save(tmp_path / f"{i}.jpg", seed=i, size=(60, 45))) for i in range(3)]
    images = LabelledImages(paths, np.array([0, 1, 1]), ["a", "b"])
    ds = LabelledImageDataset(images, TrainTransform(32), seed=5)
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    x0, y0 = ds[1]
    assert torch.equal(torch.rand(3), expected_next)  # the global stream (dropout) is untouched
    assert x0.shape == (3, 32, 32) and y0 == 1
    assert torch.equal(LabelledImageDataset(images, TrainTransform(32), seed=5)[1][0], x0)
    ds.set_epoch(1)
    assert not torch.equal(ds[1][0], x0)
    assert ValTransform(32, 36)(Image.open(paths[0])).shape == (3, 32, 32)


def test_unreadable_training_image_is_logged_and_replaced(tmp_path, caplog):
    good = _save(tmp_path / "good.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    images = LabelledImages([str(bad), str(good)], np.array([0, 1]), ["a", "b"])
    ds = LabelledImageDataset(images, ValTransform(16, 16))
    with caplog.at_level(logging.WARNING):
        _, label = ds[0]
    assert label == 1 and "unreadable training image" in caplog.text and "bad.jpg" in caplog.text
    strict = LabelledImageDataset(images, ValTransform(16, 16), substitute_unreadable=False)
    with pytest.raises(Exception, match="bad.jpg"):
        strict[0]
