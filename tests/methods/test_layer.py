"""The GpreBN layer's maths, in float64: forward = eval BN with the dataset statistics; gradients = the
literal formula of docs/method.md = training BN's gradient scaled by sigma_B / sigma."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gprebn_edge.methods.layer import GpreBatchNorm, gprebn_function, swap_in, swap_out
from gprebn_edge.methods.stats import StatsConfig, batch_stats

EPS = 1e-5
SHAPES = {1: (7, 5), 2: (6, 5, 4, 3), 3: (4, 5, 3, 2, 3)}  # BatchNorm1d (N, C) / 2d / 3d inputs


def _inputs(dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = SHAPES[dim]
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2).requires_grad_()
    gamma = (torch.rand(c, generator=g, dtype=torch.float64) * 2 + 0.3).requires_grad_()
    beta = torch.randn(c, generator=g, dtype=torch.float64).requires_grad_()
    mu = torch.randn(c, generator=g, dtype=torch.float64) * 2
    var = torch.rand(c, generator=g, dtype=torch.float64) * 4 + 0.2
    upstream = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, gamma, beta, mu, var, upstream


def _view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, *([1] * (x.dim() - 2)))


def _literal(x, gamma, beta, mu, var):
    """docs/method.md transcribed:
    x_hat = (x - mu_B) / sigma_B;  y = gamma (x_hat sg(sigma_B) + sg(mu_B) - mu) / sigma + beta."""
    dims = [0] + list(range(2, x.dim()))
    mu_b = x.mean(dims)
    sigma_b = (x.var(dims, unbiased=False) + EPS).sqrt()
    sigma = (var + EPS).sqrt()
    x_hat = (x - _view(mu_b, x)) / _view(sigma_b, x)
    inner = x_hat * _view(sigma_b.detach(), x) + _view(mu_b.detach(), x) - _view(mu, x)
    return _view(gamma, x) * inner / _view(sigma, x) + _view(beta, x)


def _fused(x, gamma, beta, mu, var):
    batch_mean, batch_var = batch_stats(x.detach())
    return gprebn_function(x, gamma, beta, mu, var, batch_mean, batch_var, EPS)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_forward_equals_eval_bn_with_dataset_statistics(dim):
    x, gamma, beta, mu, var, _ = _inputs(dim)
    expected = F.batch_norm(x, mu, var, gamma, beta, training=False, eps=EPS)
    torch.testing.assert_close(_fused(x, gamma, beta, mu, var), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(_literal(x, gamma, beta, mu, var), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_gradients_equal_the_literal_formula(dim):
    x, gamma, beta, mu, var, up = _inputs(dim, seed=dim)
    got = torch.autograd.grad((_fused(x, gamma, beta, mu, var) * up).sum(), [x, gamma, beta])
    want = torch.autograd.grad((_literal(x, gamma, beta, mu, var) * up).sum(), [x, gamma, beta])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_input_gradient_is_training_bn_gradient_times_sigma_ratio(dim):
    x, gamma, beta, mu, var, up = _inputs(dim, seed=10 + dim)
    (gx,) = torch.autograd.grad((_fused(x, gamma, beta, mu, var) * up).sum(), [x])
    train = F.batch_norm(x, None, None, gamma, beta, training=True, eps=EPS)
    (gx_train,) = torch.autograd.grad((train * up).sum(), [x])
    dims = [0] + list(range(2, x.dim()))
    ratio = (x.detach().var(dims, unbiased=False) + EPS).sqrt() / (var + EPS).sqrt()
    torch.testing.assert_close(gx, gx_train * _view(ratio, x), rtol=1e-10, atol=1e-12)
    # and the ratio is far from 1 here, so the check could fail
    assert (ratio - 1).abs().max() > 0.5


def test_equals_one_training_batch_norm_with_reparametrized_affine():
    """docs/method.md, the implementation: w = gamma sg(sigma_B)/sigma, b = beta + gamma (sg(mu_B) - mu)/sigma."""
    x, gamma, beta, mu, var, up = _inputs(2, seed=5)
    mu_b, var_b = batch_stats(x.detach())
    sigma_b, sigma = (var_b + EPS).sqrt(), (var + EPS).sqrt()
    w = gamma * sigma_b / sigma
    b = beta + gamma * (mu_b - mu) / sigma
    y_ref = F.batch_norm(x, None, None, w, b, training=True, eps=EPS)
    y = _fused(x, gamma, beta, mu, var)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    got = torch.autograd.grad((y * up).sum(), [x, gamma, beta])
    want = torch.autograd.grad((y_ref * up).sum(), [x, gamma, beta])
    for g, ww in zip(got, want, strict=True):
        torch.testing.assert_close(g, ww, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls,dim", [(nn.BatchNorm1d, 1), (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3)])
def test_layer_swaps_in_and_out_for_each_bn_class(cls, dim):
    x, *_ = _inputs(dim)
    x = x.detach()
    bn = cls(5).double().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-2, 2)
        bn.running_var.uniform_(0.5, 3)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    model = nn.Sequential(bn)
    swap_in(model, StatsConfig())
    layer = model[0]
    assert isinstance(layer, GpreBatchNorm)
    with torch.no_grad():
        y = model(x)  # adapting: first batch, cumulative -> statistics = this batch's
    dims = [0] + list(range(2, x.dim()))
    torch.testing.assert_close(layer.target_mean, x.mean(dims))
    torch.testing.assert_close(layer.target_var, x.var(dims, unbiased=False))
    swap_out(model)
    assert type(model[0]) is cls and not model[0].training
    torch.testing.assert_close(model(x), y)  # the static BN computes what the adapting layer did
