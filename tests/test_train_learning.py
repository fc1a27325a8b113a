"""It learns: a small Token trained for about a minute on CPU retrieves unseen synthetic landmarks far better.

Training data: 50 synthetic landmarks x 10 views (random textures and shapes under random homographies,
crops, colour changes, blur, noise and occluders), through `tokenret train` with configs/tiny_cpu.yaml
(ResNet-18 trunk from scratch, 48 px crops, 84 steps of 32). Test: 30 *other* landmarks, one query and five
database views each, in the Revisited layout; mAP (all positives "easy", so Medium = Easy) before and after.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from synthetic_landmarks import write_class_folders, write_revisited_benchmark

import tokenret
from tokenret.cli import train as command
from tokenret.data.revisited import RevisitedDataset
from tokenret.evaluate import compute_revisited_map, ranks_from_scores
from tokenret.extraction import ExtractionConfig, extract_descriptors
from tokenret.train.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny_cpu.yaml"
SIZE = 48  # test images are shrunk to the training crop size


def retrieval_map(model, ds: RevisitedDataset) -> float:
    cfg = ExtractionConfig(max_size=SIZE, scales=(1.0,), batch_size=32, num_workers=0, device="cpu")
    db = extract_descriptors(
        model, [ds.image_path(i) for i in range(len(ds.imlist))], config=cfg, progress=False
    )
    q = extract_descriptors(
        model, [ds.query_path(i) for i in range(len(ds.qimlist))], config=cfg, progress=False
    )
    return compute_revisited_map(ranks_from_scores(db.descriptors @ q.descriptors.T), ds.gnd)["medium"]["map"]


@pytest.mark.slow
def test_training_on_synthetic_landmarks_improves_retrieval_of_unseen_ones(tmp_path, capsys):
    write_class_folders(tmp_path / "train", n_landmarks=50, views=10, size=64, seed=0)
    write_revisited_benchmark(tmp_path / "bench", "synth", n_landmarks=30, db_views=5, size=64, seed=1)
    ds = RevisitedDataset.from_root(tmp_path / "bench", "synth")
    cfg = load_config(CONFIG)

    torch.manual_seed(cfg.train.seed)  # the trainer initialises the same way
    before = retrieval_map(tokenret.create_model(cfg.model.name, **cfg.model.kwargs), ds)

    out = tmp_path / "run"
    rc = command.main(
        [
            "train",
            "--config", str(CONFIG),
            f"data.root={tmp_path / 'train'}",
            f"train.output_dir={out}",
            "train.progress=false",
            "val.every_epochs=0",  # validate once, at the end
            f"val.retrieval_root={tmp_path / 'bench'}",
            "val.retrieval_datasets=[synth]",
            f"val.retrieval_max_size={SIZE}",
            "val.best_metric=synth/map_medium",
        ]
    )  # fmt: skip
    assert rc == 0

    trained = tokenret.create_model(cfg.model.name, checkpoint=out / "best.pth")
    after = retrieval_map(trained, ds)
    with capsys.disabled():
        print(f"\nunseen synthetic landmarks, mAP: untrained {100 * before:.1f} -> trained {100 * after:.1f}")
    # The validation inside training measured the same thing on the same weights.
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    final = [r for r in records if r["kind"] == "val"][-1]
    assert abs(final["synth/map_medium"] - after) < 1e-6
    assert final["val/top1_cosine"] > 0.1  # held-out views of the training landmarks: chance is 0.02
    train_losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert train_losses[-1] < train_losses[0] - 0.5
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(out / "tensorboard")).Reload().Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/top1", "train/images_per_s", "synth/map_medium", "val/top1"):
        assert tag in scalars
    # Measured on the 2-core development machine (mAP untrained -> trained): 10.0 -> 23.5 with this config's
    # seed, 20.0 -> 36.1 and 10.3 -> 35.0 with seeds 1 and 2, 18.0 -> 43.7 with an earlier initialisation
    # order; the bounds hold for every one of them with room.
    assert after > before + 0.10 and after > 1.5 * before
