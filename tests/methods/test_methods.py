"""Every method through the common interface: step, reset, freeze."""

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from gprebn_edge.errors import GprebnError
from gprebn_edge.methods import METHODS, StatsConfig, entropy, make_adapter, reestimate
from gprebn_edge.models.builtin import small_resnet


def _model(seed: int = 0) -> nn.Module:
    """A small ResNet whose BN statistics and affine parameters are far from their defaults."""
    torch.manual_seed(seed)
    model = small_resnet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def _stream(n_batches: int = 4, batch: int = 16, shift: float = 0.7, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=g) * 1.5 + shift for _ in range(n_batches)]


def _adapted(method: str, lr: float = 1e-2):
    """(source model, adapter after one pass over the default stream)."""
    model = _model()
    adapter = make_adapter(method, model, lr=lr)
    for x in _stream():
        adapter.step(x)
    return model, adapter


@pytest.mark.parametrize("method", list(METHODS))
def test_step_reset_freeze(method):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = make_adapter(method, model, lr=1e-2)
    batches = _stream()
    for x in batches:
        logits = adapter.step(x)
        assert logits.shape == (16, 10) and torch.isfinite(logits).all() and not logits.requires_grad
    # the caller's model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for mode in adapter.freeze_modes:
        static = adapter.freeze(mode, lambda: iter(batches))
        assert not static.training
        assert all(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
                   for m in static.modules() if isinstance(m, _BatchNorm))
        assert set(static.state_dict()) == set(before)  # a plain state dict of the user's architecture
        assert all(m.momentum == 0.1 for m in static.modules() if isinstance(m, _BatchNorm))
        assert torch.isfinite(static(batches[0])).all()


@pytest.mark.parametrize("method", list(METHODS))
def test_reset_restores_the_source_model_bit_exactly(method):
    model = _model()
    adapter = make_adapter(method, model, lr=1e-2)
    x = _stream(1)[0]
    first = adapter.step(x)
    for b in _stream(3, seed=7):
        adapter.step(b)
    adapter.reset()
    assert torch.equal(adapter.step(x), first)
    adapter.reset()
    static = adapter.freeze("direct") if "direct" in adapter.freeze_modes else None
    if static is not None and method in ("source", "bn", "tent"):
        for k, v in model.state_dict().items():
            assert torch.equal(static.state_dict()[k], v), k


@pytest.mark.parametrize("method", ["gprebn", "adabn"])
def test_frozen_model_reproduces_the_adapters_predictions(method):
    _, adapter = _adapted(method)
    probe = _stream(1, seed=99)[0]
    static = adapter.freeze("direct")
    torch.testing.assert_close(static(probe), adapter.predict(probe), rtol=1e-5, atol=1e-5)
    # and the static model's BN statistics are the adapter's dataset-level statistics
    layer = adapter.model.bn1
    torch.testing.assert_close(static.bn1.running_mean, layer.dataset_stats()[0])


def test_gprebn_changes_only_bn_affine_and_statistics():
    model, adapter = _adapted("gprebn")
    static = adapter.freeze("direct")
    changed = {k for k, v in static.state_dict().items() if not torch.equal(v, model.state_dict()[k])}
    assert changed and all(k.rsplit(".", 1)[-1] in ("weight", "bias", "running_mean", "running_var",
                                                    "num_batches_tracked") for k in changed)
    assert not any(k.startswith(("conv1.", "fc.")) for k in changed)
    assert any(k.endswith(".weight") for k in changed)  # the affine parameters did move


def test_gprebn_lowers_entropy_on_its_stream():
    model = _model()
    adapter = make_adapter("gprebn", model, lr=5e-3)
    stream = _stream(20, batch=32)
    first = entropy(adapter.predict(stream[0])).mean()
    for x in stream:
        adapter.step(x)
    assert entropy(adapter.predict(stream[0])).mean() < first


def test_tent_direct_freeze_keeps_source_statistics_with_adapted_affine():
    model, adapter = _adapted("tent")
    static = adapter.freeze("direct")
    torch.testing.assert_close(static.bn1.running_mean, model.bn1.running_mean, rtol=0, atol=0)
    assert not torch.equal(static.bn1.weight, model.bn1.weight)


def test_refresh_statistics_are_pooled_over_the_data():
    """The first BN's input does not depend on any normalization: its refreshed statistics are exactly the
    pooled statistics at any batch size. Deeper layers see activations normalized by the estimate so far,
    so batch 1 and one big batch agree closely but not exactly (adapt refreshes at a fixed batch)."""
    model = _model()
    data = torch.cat(_stream(4, batch=16))
    a = reestimate(model, [data[i:i + 1] for i in range(len(data))])
    b = reestimate(model, [data])
    with torch.no_grad():
        conv = model.conv1(data)
    for static in (a, b):
        torch.testing.assert_close(static.bn1.running_mean, conv.mean((0, 2, 3)))
        torch.testing.assert_close(static.bn1.running_var, conv.var((0, 2, 3), unbiased=False))
    probe = _stream(1, seed=3)[0]
    torch.testing.assert_close(a(probe), b(probe), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("scaling,lr,betas", [
    ("sqrt", 1e-3 * 0.25, (1 - 0.1 / 16, 1 - 0.001 / 16)),   # the default
    ("linear", 1e-3 / 16, (0.9, 0.999)),
    ("none", 1e-3, (0.9, 0.999)),
])
def test_learning_rate_scales_with_the_batch(scaling, lr, betas):
    kwargs = {} if scaling == "sqrt" else {"lr_scaling": scaling}
    adapter = make_adapter("gprebn", _model(), lr=1e-3, **kwargs)
    adapter.step(_stream(1, batch=4)[0])
    group = adapter.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(lr)
    assert group["betas"] == pytest.approx(betas)


def test_sgd_keeps_its_momentum_under_sqrt_scaling():
    adapter = make_adapter("tent", _model(), lr=0.1, optimizer="sgd")
    adapter.step(_stream(1, batch=16)[0])
    group = adapter.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(0.05) and group["momentum"] == 0.9


def test_step_adapts_even_under_no_grad():
    adapter = make_adapter("gprebn", _model(), lr=1e-2)
    w0 = adapter.model.bn1.weight.clone()
    with torch.no_grad():
        adapter.step(_stream(1)[0])
    assert not torch.equal(adapter.model.bn1.weight, w0)


@pytest.mark.parametrize("kwargs,match", [({"optimizer": "rmsprop"}, "optimizer"), ({"lr": 0}, "lr"),
                                          ({"lr_scaling": "cube"}, "lr-scaling")])
def test_bad_settings(kwargs, match):
    with pytest.raises(GprebnError, match=match):
        make_adapter("gprebn", _model(), **kwargs)


def test_unknown_method_and_freeze_mode():
    with pytest.raises(GprebnError, match="unknown method"):
        make_adapter("sar", _model())
    with pytest.raises(GprebnError, match="freezes with"):
        make_adapter("source", _model()).freeze("refresh")


def test_stats_settings_reach_the_layers():
    adapter = make_adapter("gprebn", _model(), stats=StatsConfig(momentum=0.2, theta=0.5, init="source"))
    assert adapter.model.bn1.config.theta == 0.5
    assert adapter.hparams()["stats"] == {"momentum": 0.2, "theta": 0.5, "init": "source", "order": "before"}
