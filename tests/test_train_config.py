"""Training config (YAML + key=value, typed, clear errors), the schedule's closed form, `tokenret train`."""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tokenret.cli import train as command
from tokenret.train.config import (
    ConfigError,
    OptimConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
)
from tokenret.train.schedule import WarmupDecaySchedule, peak_learning_rate, schedule_from_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


# ------------------------------------------------------------------------------------------------ config


def test_shipped_token_config_is_the_papers_recipe():
    cfg = load_config(REPO / "configs" / "token_r101_gldv2.yaml")
    assert cfg.model.name == "token_r101" and cfg.model.backbone_weights == "IMAGENET1K_V1"
    assert cfg.model.kwargs == {"drop": 0.1, "attn_drop": 0.1, "drop_path": 0.1}
    assert (cfg.loss.margin, cfg.loss.s, cfg.loss.m) == ("arcface", 32.0, 0.2)
    assert (cfg.data.format, cfg.data.gldv2_list, cfg.data.val_fraction, cfg.data.split_seed) == (
        "gldv2",
        "train_clean.csv",
        0.2,
        0,
    )
    assert cfg.data.image_size == 512 and cfg.data.crop_scale == (0.2, 1.0) and cfg.data.val_resize == 585
    assert cfg.data.color_jitter == (0.4, 0.4, 0.2, 0.1) and cfg.data.color_jitter_p == 0.8
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.sync_bn) == (30, 128, True)
    o = cfg.optim
    assert (o.momentum, o.nesterov, o.weight_decay, o.warmup_epochs, o.decay) == (
        0.9,
        True,
        1e-4,
        5,
        "cosine",
    )
    assert o.clip_grad_norm is None
    # The release's 4-GPU run: per-GPU batch 32, base 0.01 scaled by 32/256 -> 1.25e-3, as here on 128.
    assert peak_learning_rate(o.base_lr, cfg.train.batch_size, o.reference_batch) == pytest.approx(
        0.01 * 32 / 256
    )


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_names_a_registered_model(path):
    import tokenret
    from tokenret.models.local import list_local_models

    cfg = load_config(path)
    assert cfg.model.name in tokenret.list_models() + list_local_models()
    assert config_from_dict(config_to_dict(cfg)) == cfg  # what a checkpoint stores rebuilds the same config


def test_overrides_are_parsed_as_yaml_and_type_checked():
    cfg = apply_overrides(
        TrainConfig(),
        [
            "optim.weight_decay=1e-5",  # PyYAML reads this as a string; still a float here
            "optim.clip_grad_norm=null",
            "train.amp=off",  # YAML 1.1 reads off as false
            "train.epochs=2",
            "model.kwargs.drop_path=0",
            "val.retrieval_datasets=[roxford5k, rparis6k]",
            "data.crop_scale=[0.5, 1]",
            "model.backbone_weights=null",
        ],
    )
    assert cfg.optim.weight_decay == 1e-5 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.train.amp == "off" and cfg.train.epochs == 2 and cfg.model.kwargs == {"drop_path": 0}
    assert cfg.val.retrieval_datasets == ["roxford5k", "rparis6k"] and cfg.data.crop_scale == (0.5, 1.0)
    assert cfg.model.backbone_weights is None
    assert TrainConfig().train.epochs == 30  # the input is not modified


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.base_lrr=0.1", "unknown config key 'optim.base_lrr' (did you mean optim.base_lr"),
        ("optimizer.lr=0.1", "unknown config key 'optimizer.lr'"),
        ("train.epochs=ten", "train.epochs: expected int, got 'ten'"),
        ("train.epochs=2.5", "train.epochs: expected int"),
        ("train.amp=fp32", "train.amp: expected 'off' | 'bf16' | 'fp16'"),
        ("train.sync_bn=maybe", "train.sync_bn: expected bool"),
        ("data.crop_scale=[0.2]", "data.crop_scale: expected 2 values"),
        ("train.epochs.x=1", "train.epochs is int, it has no sub-keys"),
        ("epochs", "is not key=value"),
        ("train.epochs=0", "train.epochs must be >= 1"),
    ],
)
def test_bad_overrides_raise_clear_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'optim.lr'"):
        load_config(bad)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


# ---------------------------------------------------------------------------------------------- schedule


def _release_schedule(start, peak, final, warmup, total, decay):
    """The release's array: inclusive linspace warm-up, then the decay over the remaining steps."""
    warm = np.linspace(start, peak, warmup)
    iters = np.arange(total - warmup)
    if decay == "cosine":
        rest = final + 0.5 * (peak - final) * (1 + np.cos(np.pi * iters / len(iters)))
    else:
        rest = peak + (final - peak) * iters / len(iters)
    return np.concatenate([warm, rest])


@pytest.mark.parametrize("decay", ["cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 1, 5])
def test_schedule_matches_the_closed_form(decay, warmup):
    s = WarmupDecaySchedule(
        peak_lr=0.02, total_steps=40, warmup_steps=warmup, start_lr=2e-4, final_lr=1e-3, decay=decay
    )
    expected = _release_schedule(2e-4, 0.02, 1e-3, warmup, 40, decay)
    np.testing.assert_allclose([s(t) for t in range(40)], expected, rtol=1e-12)
    if warmup:
        assert s(0) == pytest.approx(2e-4)
        assert s(warmup - 1) == pytest.approx(0.02 if warmup > 1 else 2e-4) and s(warmup) == pytest.approx(
            0.02
        )
    assert s(39) < s(warmup) and s(10**9) == s(39)  # defined past the end (the release's last step crashed)


def test_schedule_from_config_states_the_rule_on_the_global_batch():
    optim = OptimConfig(base_lr=0.01, warmup_epochs=5, warmup_start_factor=0.01, decay="cosine")
    s = schedule_from_config(optim, global_batch=128, steps_per_epoch=100, epochs=30)
    assert s.peak_lr == pytest.approx(0.005) and s.start_lr == pytest.approx(5e-5)
    assert s.warmup_steps == 500 and s.total_steps == 3000
    half = 500 + (3000 - 500) // 2
    assert s(half) == pytest.approx(0.005 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    # The same images per step on 4 GPUs x 32 or 1 GPU x 128 (or 2 x 32 x 2 accumulation): the same schedule.
    assert schedule_from_config(optim, 128, 100, 30) == s


# ----------------------------------------------------------------------------------------------- command


def _run_main(args, capsys):
    rc = command.main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_train_command_prints_the_resolved_config(capsys):
    rc, out, _ = _run_main(
        ["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--print-config", "train.epochs=2"],
        capsys,
    )
    assert rc == 0
    import yaml

    printed = yaml.safe_load(out)
    assert printed["train"]["epochs"] == 2 and printed["model"]["kwargs"]["backbone"] == "resnet18"


def test_train_command_reports_config_errors(capsys, tmp_path):
    rc, _, err = _run_main(["train", "--print-config", "optim.lrr=1"], capsys)
    assert rc == 2 and "unknown config key 'optim.lrr'" in err
    rc, _, err = _run_main(["train", "data.format=folders", f"data.root={tmp_path / 'none'}"], capsys)
    assert rc == 2 and "image folder not found" in err
    rc, _, err = _run_main(["train", "--resume", "--output-dir", str(tmp_path / "empty")], capsys)
    assert rc == 2 and "nothing to resume" in err


def test_add_parser_registers_train_on_any_cli():
    parser = argparse.ArgumentParser(prog="tokenret")
    sub = parser.add_subparsers(dest="command")
    command.add_parser(sub)
    args = parser.parse_args(["train", "--config", "c.yaml", "--resume", "a=1", "b.c=2"])
    assert args.func is command.run_train and args.config == "c.yaml" and args.resume is True
    assert args.overrides == ["a=1", "b.c=2"]
    args = parser.parse_args(["train", "--resume-from", "runs/x/last.pth"])
    assert args.resume_from == "runs/x/last.pth" and args.resume is False


@pytest.mark.slow
def test_module_entry_point_runs():
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    res = subprocess.run(
        [sys.executable, "-m", "tokenret.cli", "train", "--print-config", "train.epochs=3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "epochs: 3" in res.stdout
