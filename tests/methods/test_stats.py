"""Dataset-level statistics: the law-of-total-variance update makes the estimate independent of the batch
size; a plain EMA of batch variances does not (at batch 1 it tends to the within-image variance)."""

import pytest
import torch
from torch import nn

from gprebn_edge.errors import GprebnError
from gprebn_edge.methods.layer import GpreBatchNorm
from gprebn_edge.methods.stats import StatsConfig, batch_stats, mix, update_running


def _data(n: int = 96):
    g = torch.Generator().manual_seed(0)
    # each image has its own offset per channel: the spread of image means is a large part of the variance
    offsets = torch.randn(n, 4, 1, 1, generator=g, dtype=torch.float64) * 3
    return offsets + torch.randn(n, 4, 6, 6, generator=g, dtype=torch.float64)


def _run(config: StatsConfig, x: torch.Tensor, batch: int) -> GpreBatchNorm:
    layer = GpreBatchNorm(nn.BatchNorm2d(x.shape[1]).double(), config)
    with torch.no_grad():
        for i in range(0, len(x), batch):
            layer(x[i:i + batch])
    return layer


@pytest.mark.parametrize("batch", [1, 4, 32, 96])
def test_cumulative_estimate_is_the_pooled_statistics_at_any_batch_size(batch):
    x = _data()
    layer = _run(StatsConfig(momentum=None), x, batch)
    torch.testing.assert_close(layer.target_mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(layer.target_var, x.var((0, 2, 3), unbiased=False))


def test_plain_ema_of_batch_variances_underestimates_at_batch_1():
    """The failure the total-variance term fixes: averaging per-image variances gives the within-image
    variance (about 1 here) instead of the dataset's (about 10)."""
    x = _data()
    within = torch.stack([xi.var((1, 2), unbiased=False) for xi in x]).mean(0)
    pooled = x.var((0, 2, 3), unbiased=False)
    assert (pooled / within).min() > 4
    layer = _run(StatsConfig(momentum=None), x, 1)
    torch.testing.assert_close(layer.target_var, pooled)


def test_ema_rate_is_per_64_images():
    cfg = StatsConfig(momentum=0.1, init="source")
    assert cfg.rate(64, 10) == pytest.approx(0.1)
    # 64 batches of 1 move the estimate as far as one batch of 64
    assert 1 - (1 - cfg.rate(1, 10)) ** 64 == pytest.approx(0.1)
    assert StatsConfig(momentum=0.1, init="first").rate(8, 0) == 1.0


def test_ema_converges_to_pooled_statistics_at_batch_1():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 2, 3, 3, generator=g, dtype=torch.float64) + torch.randn(4000, 2, 1, 1, generator=g,
                                                                                   dtype=torch.float64) * 2
    layer = _run(StatsConfig(momentum=0.05, init="source"), x, 1)
    pooled = x.var((0, 2, 3), unbiased=False)
    assert torch.allclose(layer.target_var, pooled, rtol=0.25)


def test_update_running_is_the_mixture_of_two_distributions():
    a = torch.randn(1000, dtype=torch.float64)
    b = torch.randn(300, dtype=torch.float64) * 2 + 5
    mean, var = a.mean().reshape(1), a.var(unbiased=False).reshape(1)
    mean, var = update_running(mean, var, b.mean().reshape(1), b.var(unbiased=False).reshape(1), 300 / 1300)
    both = torch.cat([a, b])
    torch.testing.assert_close(mean, both.mean().reshape(1))
    torch.testing.assert_close(var, both.var(unbiased=False).reshape(1))


def test_theta_mixes_with_source_statistics():
    layer = GpreBatchNorm(nn.BatchNorm2d(3), StatsConfig(theta=0.25))
    layer.target_mean.fill_(4.0)
    layer.target_var.fill_(9.0)
    mean, var = layer.dataset_stats()
    torch.testing.assert_close(mean, torch.full((3,), 1.0))            # source mean 0
    torch.testing.assert_close(var, torch.full((3,), 0.25 * 9 + 0.75))  # source var 1
    torch.testing.assert_close(mix(torch.ones(2), torch.zeros(2), 1.0), torch.ones(2))


def test_order_after_normalizes_with_the_previous_estimate():
    x = _data(8)
    layer = GpreBatchNorm(nn.BatchNorm2d(4).double(), StatsConfig(order="after"))
    with torch.no_grad():
        layer(x[:4])
        expected_mean, expected_var = layer.dataset_stats()
        expected_mean, expected_var = expected_mean.clone(), expected_var.clone()
        y = layer(x[4:])
    ref = torch.nn.functional.batch_norm(x[4:], expected_mean, expected_var, layer.weight.double(),
                                         layer.bias.double(), training=False, eps=layer.eps)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(layer.target_mean, x.mean((0, 2, 3)))  # updated afterwards


def test_batch_stats_are_biased():
    x = _data(5)
    m, v = batch_stats(x)
    torch.testing.assert_close(v, x.var((0, 2, 3), unbiased=False))
    torch.testing.assert_close(m, x.mean((0, 2, 3)))


@pytest.mark.parametrize("kwargs", [{"momentum": 0.0}, {"momentum": 1.5}, {"theta": -0.1}, {"init": "zero"},
                                    {"order": "during"}])
def test_invalid_settings_are_rejected(kwargs):
    with pytest.raises(GprebnError):
        StatsConfig(**kwargs)
