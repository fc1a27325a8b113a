"""Token's aggregator on sets of local descriptors (SetTokenModel, the token_set_* registry entries)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tokenret
from release_reference import randomize_state
from tokenret.data.local_store import pad_sets
from tokenret.models import checkpoints as ck
from tokenret.models.registry import get_model_config
from tokenret.models.token import SetTokenModel, TokenHead

SMALL = {"dim": 32, "num_heads": 4, "num_tokens": 3, "out_dim": 24, "encoder_layers": 2}
NO_DROPOUT = {"drop": 0.0, "attn_drop": 0.0, "drop_path": 0.0}


def _model(in_channels: int = 16, **kwargs) -> SetTokenModel:
    """A small set model with every weight random (the release zero-initialises some projections)."""
    torch.manual_seed(0)
    model = SetTokenModel(in_channels, **{**SMALL, **kwargs})
    model.load_state_dict(randomize_state(model))
    return model.eval()


def _sets(sizes, c: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, generator=g) * 3 for n in sizes]


def test_output_does_not_depend_on_the_order_of_the_descriptors():
    model = _model()
    (x,) = _sets([40])
    with torch.no_grad():
        ref = model(x[None])
        for seed in range(3):
            perm = torch.randperm(40, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(model(x[perm][None]), ref, atol=1e-5, rtol=1e-5)
    assert ref.shape == (1, 24)
    torch.testing.assert_close(ref.norm(dim=1), torch.ones(1))


def test_padded_batch_equals_one_by_one_and_padding_values_change_nothing():
    model = _model()
    sets = _sets([7, 30, 1, 18])
    x, padding = pad_sets(sets)
    with torch.no_grad():
        single = torch.cat([model(s[None]) for s in sets])
        batched = model(x, padding)
        torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
        for fill in (1e30, -1e30, float("nan"), float("inf")):
            junk = x.masked_fill(padding[..., None], fill)
            torch.testing.assert_close(model(junk, padding), batched, atol=0, rtol=0)
        # Extra all-padding columns change nothing either.
        wide = torch.cat([x, torch.full((4, 5, 16), 7.0)], 1)
        wide_padding = torch.cat([padding, torch.ones(4, 5, dtype=torch.bool)], 1)
        torch.testing.assert_close(model(wide, wide_padding), batched, atol=1e-5, rtol=1e-5)


def test_training_mode_batch_statistics_leave_padding_out():
    """In training mode BatchNorm sees only real descriptors: padding values do not change the output or
    the running statistics."""
    model = _model(**NO_DROPOUT).train()
    x, padding = pad_sets(_sets([12, 5, 20]))
    out = model(x, padding)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    again = _model(**NO_DROPOUT).train()
    junk_out = again(x.masked_fill(padding[..., None], 1e6), padding)
    torch.testing.assert_close(junk_out, out, atol=0, rtol=0)
    for k, v in again.state_dict().items():
        if "running" in k:
            torch.testing.assert_close(v, stats[k], atol=0, rtol=0)


def test_l2_input_norm_equals_feeding_normalised_descriptors():
    l2 = _model(input_norm="l2")
    raw = _model(input_norm="none")
    x, padding = pad_sets(_sets([9, 25]))
    with torch.no_grad():
        a = l2.forward_features(x, padding)
        b = raw.forward_features(F.normalize(x, dim=-1), padding)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        # ... and differs from feeding the raw descriptors (their norms vary).
        assert (raw.forward_features(x, padding) - a).abs().max() > 1e-3
        # The scale of a whole set (e.g. another whitening) does not matter with l2.
        torch.testing.assert_close(l2(x * 10, padding), l2(x, padding), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="input_norm"):
        SetTokenModel(16, input_norm="l1")


@pytest.mark.parametrize("training", [False, True])
def test_set_model_equals_the_image_head_on_a_1_by_n_feature_map(training):
    """Spec 5/6 item 10: the Linear view of the head on a set equals the original 1x1-conv path of Token's
    image head on a (C, 1, N) map with the same weights (BatchNorm batch statistics included)."""
    model = _model(input_norm="none", **NO_DROPOUT).double().train(training)
    head = TokenHead(16, **SMALL, **NO_DROPOUT).double().train(training)
    head.load_state_dict({k.removeprefix("tr."): v for k, v in model.state_dict().items()})
    sets = torch.stack(_sets([33, 33, 33])).double()  # (3, 33, 16)
    feature_map = sets.transpose(1, 2)[:, :, None, :]  # (3, 16, 1, 33)
    with torch.no_grad():
        ours = model.forward_features(sets)
        ours_masked = model.forward_features(sets, torch.zeros(3, 33, dtype=torch.bool))
        ref = head(feature_map)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ours_masked, ref, atol=1e-10, rtol=1e-10)


def test_registry_entries_have_token_sizes_no_trunk_and_no_weights():
    for name in ("token_set_how_r50", "token_set_how_r101", "token_set_delf_r50"):
        cfg = get_model_config(name)
        assert cfg.backbone is None and cfg.weights is None and cfg.descriptor_dim == 1024
        assert "our choice" in cfg.description and "no weights" in cfg.description
        with torch.device("meta"):
            model = tokenret.create_model(name)
        assert isinstance(model, SetTokenModel) and model.input_dim == 128
        head = model.tr
        assert (head.dim, head.num_tokens, head.out_dim) == (1024, 4, 1024)
        assert (len(head.encoder), len(head.decoder), head.encoder[0].attn.num_heads) == (1, 2, 8)
        assert model.model_name == name and "backbone" not in model.model_kwargs
    with pytest.raises(ValueError, match="no released weights"):
        tokenret.create_model("token_set_how_r50", pretrained=True)
    with pytest.raises(TypeError, match="has no torchvision trunk"):
        tokenret.create_model("token_set_how_r50", backbone="resnet50")


def test_saved_checkpoint_round_trips_through_create_model(tmp_path):
    model = tokenret.create_model("token_set_how_r101", dim=32, num_heads=4, out_dim=16, input_norm="none")
    model.load_state_dict(randomize_state(model))
    path = ck.save_checkpoint(model, tmp_path / "set.pth")
    again = tokenret.create_model("token_set_how_r101", checkpoint=path)
    assert again.model_kwargs == model.model_kwargs and again.input_norm == "none"
    x, padding = pad_sets(_sets([10, 3], c=128))
    with torch.no_grad():
        torch.testing.assert_close(again(x, padding), model.eval()(x, padding), atol=0, rtol=0)
    # A bare state dict (no tokenret metadata): sizes are read from the weights (heads cannot be).
    bare = tmp_path / "bare.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, bare)
    third = tokenret.create_model("token_set_how_r101", checkpoint=bare, input_norm="none", num_heads=4)
    assert (third.tr.dim, third.tr.out_dim, third.input_dim) == (32, 16, 128)
    with torch.no_grad():
        torch.testing.assert_close(third(x, padding), model(x, padding), atol=0, rtol=0)
    with pytest.raises(ck.CheckpointError, match="token_set_how_r101"):
        tokenret.create_model("token_set_how_r50", checkpoint=path)


def test_equals_the_heads_own_set_path_and_runs_under_bf16_autocast():
    model = _model(input_norm="none", **NO_DROPOUT).train()
    x, padding = pad_sets(_sets([6, 14, 9]))
    ours = model.forward_features(x, padding)
    torch.testing.assert_close(
        ours, _model(input_norm="none", **NO_DROPOUT).train().tr.forward_set(x, padding)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.forward_features(x, padding)
    assert low.dtype == torch.bfloat16
    low.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # bf16 keeps ~3 significant digits; the final BatchNorm over 3 sets amplifies differences.
    assert (low.float() - ours.detach()).abs().max() < 0.25 * ours.detach().abs().max()
