"""Micro-batching and block checkpointing of an adaptation step (docs/budget.md)."""

import copy

import pytest
import torch
from torch.testing import assert_close

from gprebn_edge.errors import GprebnError
from gprebn_edge.methods import make_adapter
from gprebn_edge.methods.blocks import find_blocks
from gprebn_edge.methods.layer import gprebn_layers
from gprebn_edge.models.builtin import small_resnet


def _model(seed: int = 0) -> torch.nn.Module:
    """A small ResNet whose BN statistics and affine parameters are far from their defaults."""
    torch.manual_seed(seed)
    model = small_resnet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def _stream(n_batches: int, batch: int, shift: float = 0.7, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=g) * 1.5 + shift for _ in range(n_batches)]


def _state(adapter):
    return {k: v.clone() for k, v in adapter.model.state_dict().items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()}


@pytest.mark.parametrize("method", ["gprebn", "tent"])
def test_gradients_accumulate_to_one_step_per_batch(method):
    """A batch made of one half twice: each half's statistics are the whole batch's, so the accumulated
    gradient of the halves is the whole batch's gradient and one step ends in the same state. (Over later
    steps GpreBN's running estimate differs by design: a slice is normalized with the estimate that holds
    the slices so far, not the whole batch.)"""
    half = _stream(1, 8)[0]
    x = torch.cat([half, half])
    whole = make_adapter(method, _model(), lr=1e-2)
    sliced = make_adapter(method, _model(), lr=1e-2)
    sliced.micro_batch = 8
    assert_close(sliced.step(x), whole.step(x), rtol=1e-4, atol=1e-4)
    assert sliced.steps == whole.steps == 1
    a, b = _state(whole), _state(sliced)
    for k in a:
        assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    moved = _state(make_adapter(method, _model(), lr=1e-2))
    assert any(not torch.equal(a[k], moved[k]) for k in a)  # the steps did change gamma/beta


def test_micro_batch_of_the_whole_batch_is_bit_identical():
    x = _stream(1, 16)[0]
    plain = make_adapter("gprebn", _model(), lr=1e-2)
    same = make_adapter("gprebn", _model(), lr=1e-2)
    same.micro_batch = 16
    assert torch.equal(plain.step(x), same.step(x))
    a, b = _state(plain), _state(same)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_micro_batched_statistics_pool_to_the_whole_batch():
    """adabn: the first layer sees the raw images, so its cumulative estimate is the pooled statistics of
    the batch whatever the slicing."""
    x = _stream(1, 24)[0]
    whole = make_adapter("adabn", _model())
    sliced = make_adapter("adabn", _model())
    sliced.micro_batch = 5
    whole.step(x)
    out = sliced.step(x)
    assert out.shape == (24, 10)
    (_, a), (_, b) = gprebn_layers(whole.model)[0], gprebn_layers(sliced.model)[0]
    assert_close(b.target_mean, a.target_mean)
    assert_close(b.target_var, a.target_var)
    assert b.seen == a.seen == 24


@pytest.mark.parametrize("method", ["gprebn", "tent"])
def test_checkpointed_blocks_give_the_same_step(method):
    """Recomputing a block in the backward must neither update GpreBN's estimate twice nor change what
    the step computes."""
    plain = make_adapter(method, _model(), lr=1e-2)
    ckpt = make_adapter(method, _model(), lr=1e-2)
    assert ckpt.checkpoint_blocks() == len(find_blocks(_model())) == 3
    for x in _stream(3, 8):
        assert_close(ckpt.step(x), plain.step(x), rtol=1e-5, atol=1e-5)
    a, b = _state(plain), _state(ckpt)
    for k in a:
        assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    for (_, la), (_, lb) in zip(gprebn_layers(plain.model), gprebn_layers(ckpt.model), strict=True):
        assert la.seen == lb.seen
    static = ckpt.freeze("refresh", lambda: _stream(2, 8))
    assert not any("forward" in m.__dict__ for m in static.modules())  # the static model is plain again
    assert_close(static(_stream(1, 4)[0]), plain.freeze("refresh", lambda: _stream(2, 8))(_stream(1, 4)[0]))


def test_checkpointing_a_model_without_blocks_says_so():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
    model(torch.zeros(2, 3, 8, 8))
    with pytest.raises(GprebnError, match="no blocks to checkpoint"):
        make_adapter("gprebn", model.eval()).checkpoint_blocks()


def test_refresh_respects_the_no_grad_batch():
    adapter = make_adapter("gprebn", _model(), lr=1e-2)
    for x in _stream(2, 8):
        adapter.step(x)
    big = adapter.freeze("refresh", lambda: [torch.cat(_stream(2, 8))])
    adapter.no_grad_batch = 3
    seen = []
    probe = copy.deepcopy(adapter)
    probe.model.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    small = probe.freeze("refresh", lambda: [torch.cat(_stream(2, 8))])
    assert max(seen) == 3 and sum(seen) == 16
    # the first BN sees the images themselves: its pooled statistics do not depend on the slicing
    assert_close(small.bn1.running_mean, big.bn1.running_mean)
    assert_close(small.bn1.running_var, big.bn1.running_var)
