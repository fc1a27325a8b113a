"""`tokenret train` also trains the local-feature networks (DELF, HOW): DELF's two stages (all, then the
attention on a frozen trunk), checkpoints that the local registry reloads, and refused set data."""

from __future__ import annotations

import pytest
import torch
from synthetic_landmarks import write_class_folders

from tokenret.models import local as local_models
from tokenret.train import command
from tokenret.train.config import ConfigError, load_config


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("landmarks")
    write_class_folders(root, n_landmarks=3, views=4, size=40, seed=3)
    return root


def _argv(name, data, out, *extra):
    return [
        "train",
        f"model.name={name}",
        "model.backbone_weights=null",
        "model.kwargs={}",
        "loss.s=8",
        "data.format=folders",
        f"data.root={data}",
        "data.val_fraction=0.25",
        "data.image_size=32",
        "data.val_resize=36",
        "data.num_workers=0",
        "optim.base_lr=0.5",
        "optim.warmup_epochs=0",
        "train.epochs=1",
        "train.batch_size=9",
        "train.progress=false",
        "train.tensorboard=false",
        f"train.output_dir={out}",
        "train.device=cpu",
        "val.batch_size=4",
        *extra,
    ]


def test_delf_attention_stage_trains_only_the_attention_and_reloads(images, tmp_path):
    torch.manual_seed(11)  # the trainer's seed: the same initial weights
    initial = local_models.create_local_model("delf_r50").state_dict()
    out = tmp_path / "run"
    assert command.main(_argv("delf_r50", images, out, "model.freeze=[features]")) == 0
    trained = local_models.create_local_model("delf_r50", checkpoint=out / "last.pth")
    state = trained.state_dict()
    frozen = [k for k in state if k.startswith("features.") and "running" not in k and "num_batches" not in k]
    assert frozen and all(torch.equal(state[k], initial[k]) for k in frozen)
    attention = [k for k in state if k.startswith("attention.") and k.endswith("weight")]
    assert any(not torch.equal(state[k], initial[k]) for k in attention)
    # the reloaded network extracts local features
    out_feats = trained.extract_local(torch.randn(3, 64, 64), [1.0], 5, score_threshold=0.0)
    assert out_feats["descriptors"].shape[1] == trained.output_dim


def test_how_trains_through_the_same_loop(images, tmp_path):
    torch.manual_seed(11)
    initial = local_models.create_local_model("how_r18").state_dict()
    out = tmp_path / "how"
    assert command.main(_argv("how_r18", images, out)) == 0
    state = local_models.create_local_model("how_r18", checkpoint=out / "last.pth").state_dict()
    assert not torch.equal(state["features.4.0.conv1.weight"], initial["features.4.0.conv1.weight"])
    # HOW keeps BatchNorm statistics frozen while training
    assert torch.equal(state["features.1.running_mean"], initial["features.1.running_mean"])


def test_local_networks_refuse_set_data_and_architecture_overrides(images, tmp_path, capsys):
    with pytest.raises(ConfigError, match="trains on images"):
        load_config(None, ["model.name=delf_r50", "data.format=local_sets", f"data.root={tmp_path}"])
    assert command.main(_argv("delf_r50", images, tmp_path / "x", "model.kwargs={dim: 64}")) != 0
    assert "model.kwargs are not supported for delf_r50" in capsys.readouterr().err
