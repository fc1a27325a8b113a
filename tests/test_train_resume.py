"""Checkpoints hold everything: 2N steps in one go equal N steps, a resume, and N more; models reload."""

from __future__ import annotations

import json

import pytest
import torch
from synthetic_landmarks import write_class_folders
from torch import nn

import tokenret
from tokenret.models import checkpoints as ck
from tokenret.train.config import load_config
from tokenret.train.hooks import HookBase
from tokenret.train.loop import Trainer

TINY = "{backbone: resnet18, dim: 32, num_heads: 4, out_dim: 16}"  # dropout and drop-path stay at 0.1


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("landmarks")
    write_class_folders(root, n_landmarks=4, views=5, size=40, seed=7)  # 16 train + 4 val images
    return root


def _overrides(data, out, *extra) -> list[str]:
    return [
        "model.name=token_r50",
        "model.backbone_weights=null",
        f"model.kwargs={TINY}",
        "loss.s=8",
        "data.format=folders",
        f"data.root={data}",
        "data.val_fraction=0.2",
        "data.image_size=32",
        "data.val_resize=36",
        "data.num_workers=0",
        "optim.base_lr=0.1",
        "optim.warmup_epochs=1",
        "train.epochs=3",
        "train.batch_size=8",  # 16 training images: 2 steps per epoch, 6 in all
        "train.progress=false",
        "train.tensorboard=false",
        "train.keep_epoch_checkpoints=1",
        f"train.output_dir={out}",
        "train.device=cpu",
        "val.batch_size=4",
        *extra,
    ]


def _config(data, out, *extra):
    return load_config(None, _overrides(data, out, *extra))


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run_bit_for_bit(images, tmp_path):
    full = Trainer(_config(images, tmp_path / "full"))
    full.train()
    assert full.step == 6 and full.epoch == 3 and not full.stopped

    # Stop mid-epoch (epoch 1, batch 1) after N = 3 steps, as an interruption would.
    first = Trainer(_config(images, tmp_path / "split", "train.stop_after_steps=3"))
    first.train()
    assert first.step == 3 and first.stopped and (first.epoch, first.batch_in_epoch) == (1, 1)
    torch.manual_seed(
        1234
    )  # a fresh process would start from other RNG states: the checkpoint must restore them
    second = Trainer(_config(images, tmp_path / "split"))
    assert second.resume_or_load(resume=True)
    assert (second.step, second.epoch, second.batch_in_epoch) == (3, 1, 1)
    second.train()
    assert second.step == 6

    a, b = _weights(full), _weights(second)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming"
    for group_a, group_b in zip(
        full.optimizer.state_dict()["state"].values(),
        second.optimizer.state_dict()["state"].values(),
        strict=True,
    ):
        assert torch.equal(group_a["momentum_buffer"], group_b["momentum_buffer"])
    # Weights really moved, and dropout was on (so restoring the RNG states mattered).
    assert any(m.p > 0 for m in full.net.modules() if type(m).__name__ == "DropPath")
    assert not torch.equal(
        a["net.tr.proj.0.weight"],
        Trainer(_config(images, tmp_path / "x")).model.state_dict()["net.tr.proj.0.weight"],
    )

    # One validation per epoch: the same records in both runs' logs.
    def val_records(path):
        return [json.loads(line) for line in path.read_text().splitlines() if '"val"' in line]

    va, vb = val_records(tmp_path / "full" / "log.jsonl"), val_records(tmp_path / "split" / "log.jsonl")
    assert [r["step"] for r in va] == [r["step"] for r in vb] == [2, 4, 6]
    assert [r["val/loss"] for r in va] == pytest.approx([r["val/loss"] for r in vb], rel=1e-6)


def test_checkpoint_loads_with_create_model_and_holds_the_training_state(images, tmp_path):
    t = Trainer(_config(images, tmp_path / "run", "train.epochs=1"))
    t.train()
    path = tmp_path / "run" / "last.pth"
    loaded = ck.read_checkpoint(path)
    extra = loaded.extra
    for key in (
        "optimizer",
        "scaler",
        "schedule",
        "epoch",
        "step",
        "sampler",
        "rng",
        "config",
        "classifier",
        "best",
    ):
        assert key in extra, key
    assert extra["step"] == 2 and extra["epoch"] == 1 and extra["config"]["train"]["batch_size"] == 8
    assert extra["schedule"]["total_steps"] == 2 and extra["sampler"]["epoch"] == 1
    assert extra["best"]["metric"] == "val/top1" and (tmp_path / "run" / "best.pth").is_file()
    assert (tmp_path / "run" / "epoch_001.pth").is_file() and (tmp_path / "run" / "config.yaml").is_file()

    model = tokenret.create_model("token_r50", checkpoint=path)
    x = torch.randn(2, 3, 48, 40)
    t.net.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), t.net(x))
    assert model.descriptor_dim == 16


def test_resume_refuses_a_weights_only_file_and_reports_a_missing_one(images, tmp_path):
    t = Trainer(_config(images, tmp_path / "run", "train.epochs=1"), default_hooks=False)
    weights = ck.save_checkpoint(t.net, tmp_path / "weights.pth")
    with pytest.raises(ck.CheckpointError, match="no training state"):
        t.resume_or_load(weights)
    with pytest.raises(FileNotFoundError):
        t.resume_or_load(tmp_path / "nope.pth")
    assert t.resume_or_load(True) is False  # nothing in output_dir yet: a fresh start


@pytest.mark.slow
def test_gradient_accumulation_equals_the_whole_batch_at_once(images, tmp_path):
    """With BatchNorm statistics frozen (eval mode), 2 micro-batches of 4 update like one batch of 8."""

    class FreezeBatchNorm(HookBase):
        def before_train(self):
            for m in self.trainer.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    common = ["train.epochs=1", "model.kwargs.drop=0", "model.kwargs.attn_drop=0", "model.kwargs.drop_path=0"]
    runs = []
    for accum in (1, 2):
        t = Trainer(
            _config(images, tmp_path / f"acc{accum}", *common, f"train.grad_accum={accum}"),
            hooks=[FreezeBatchNorm()],
            default_hooks=False,
        )
        t.train()
        runs.append(_weights(t))
    for k in runs[0]:
        torch.testing.assert_close(runs[1][k], runs[0][k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_cli_resume_continues_a_stopped_run_with_its_saved_config(images, tmp_path, capsys):
    from tokenret.cli import train as command

    out = tmp_path / "cli"
    assert command.main(["train", *_overrides(images, out, "train.stop_after_steps=3")]) == 0
    assert "stopped at step 3/6" in capsys.readouterr().out
    assert command.main(["train", "--resume", "--output-dir", str(out)]) == 0
    assert "finished at step 6/6" in capsys.readouterr().out
    extra = ck.read_checkpoint(out / "last.pth").extra
    assert extra["step"] == 6 and extra["config"]["train"]["stop_after_steps"] is None


@pytest.mark.slow
def test_init_checkpoint_starts_a_new_run_from_trained_weights(images, tmp_path):
    first = Trainer(_config(images, tmp_path / "a", "train.epochs=1"))
    first.train()
    path = tmp_path / "a" / "last.pth"
    second = Trainer(_config(images, tmp_path / "b", f"model.init_checkpoint={path}"), default_hooks=False)
    assert second.step == 0
    torch.testing.assert_close(second.net.state_dict(), first.net.state_dict())
    torch.testing.assert_close(second.model.classifier.weight, first.model.classifier.weight)
