"""`tokenret train` also trains the local-feature networks (DELF, HOW): DELF's two stages (all, then the
attention on a frozen trunk), checkpoints that the local registry reloads, and refused set data."""

from __future__ import annotations

import pytest
import torch
from synthetic_landmarks import write_class_folders

from tokenret.cli import train as command
from tokenret.data.images import load_image, to_tensor
from tokenret.models import local as local_models
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


def test_how_trains_through_the_same_loop(images, tmp_path, capsys):
    torch.manual_seed(11)
    initial = local_models.create_local_model("how_r18").state_dict()
    out = tmp_path / "how"
    # 40-pixel images give too few features for HOW's 128-d whitening: said so, or trained from random
    assert command.main(_argv("how_r18", images, tmp_path / "refused")) != 0
    assert "gave only 36 features" in capsys.readouterr().err
    assert command.main(_argv("how_r18", images, out, "model.how_whitening_images=0")) == 0
    state = local_models.create_local_model("how_r18", checkpoint=out / "last.pth").state_dict()
    assert not torch.equal(state["features.4.0.conv1.weight"], initial["features.4.0.conv1.weight"])
    # HOW keeps BatchNorm statistics frozen while training
    assert torch.equal(state["features.1.running_mean"], initial["features.1.running_mean"])


def test_local_networks_refuse_set_data_and_architecture_overrides(images, tmp_path, capsys):
    with pytest.raises(ConfigError, match="trains on images"):
        load_config(None, ["model.name=delf_r50", "data.format=local_sets", f"data.root={tmp_path}"])
    assert command.main(_argv("delf_r50", images, tmp_path / "x", "model.kwargs={dim: 64}")) != 0
    assert "model.kwargs are not supported for delf_r50" in capsys.readouterr().err


def test_how_reduction_starts_as_pca_whitening_of_the_first_training_images_and_stays_frozen(tmp_path):
    """HOW's recipe: the reduction layer is PCA-whitening of the top-1000 scale-1 backbone features of the
    first training images (HOW: 5000), then trained at lr 0."""
    import copy

    from tokenret.models.how import learn_dim_reduction
    from tokenret.train.hooks import HookBase
    from tokenret.train.loop import Trainer

    root = tmp_path / "landmarks"
    write_class_folders(root, n_landmarks=3, views=4, size=160, seed=3)  # 25 features per image
    cfg = load_config(None, _argv("how_r18", root, tmp_path / "run", "model.how_whitening_images=7")[1:])
    trainer = Trainer(cfg)
    layer = trainer.net.dim_reduction
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert id(layer.weight) not in in_optimizer and id(layer.bias) not in in_optimizer
    initial = copy.deepcopy(trainer.net)

    class Capture(HookBase):
        def before_train(self):
            self.weight = self.trainer.net.dim_reduction.weight.detach().clone()

    capture = Capture()
    trainer.register_hooks([capture])
    trainer.train()
    # the independent computation: HOW's initialisation on the untrained network, same 7 first images
    mean, std = initial.runtime["mean_std"]
    first = [to_tensor(load_image(p, 1024), mean, std) for p in trainer.data.train.paths[:7]]
    assert learn_dim_reduction(initial, first, features_num=1000, scales=[1.0]) == 7 * 25
    torch.testing.assert_close(capture.weight, initial.dim_reduction.weight)
    # frozen: unchanged by training, while the trunk trained
    torch.testing.assert_close(trainer.net.dim_reduction.weight, capture.weight, rtol=0, atol=0)
    assert not torch.equal(trainer.net.features[4][0].conv1.weight, initial.features[4][0].conv1.weight)
