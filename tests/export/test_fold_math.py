"""Folding maths in float64, with BN statistics and affine far from their defaults (at the defaults a fold
is nearly the identity and hides bugs)."""

import pytest
import torch
from torch import nn

from gprebn_edge.export.fold_math import bn_scale_shift, fold_bn

CASES = [
    # (op factory, BN class, input shape)
    (lambda: nn.Conv1d(6, 8, 3), nn.BatchNorm1d, (4, 6, 11)),
    (lambda: nn.Conv2d(6, 8, 3, bias=False), nn.BatchNorm2d, (4, 6, 9, 9)),
    (lambda: nn.Conv2d(6, 8, 3, groups=2), nn.BatchNorm2d, (4, 6, 9, 9)),
    (lambda: nn.Conv2d(8, 8, 3, groups=8, bias=False), nn.BatchNorm2d, (4, 8, 9, 9)),  # depthwise
    (lambda: nn.Conv3d(4, 6, 3), nn.BatchNorm3d, (2, 4, 5, 6, 7)),
    (lambda: nn.Linear(12, 7), nn.BatchNorm1d, (5, 12)),
    (lambda: nn.ConvTranspose2d(6, 8, 3, stride=2), nn.BatchNorm2d, (3, 6, 5, 5)),
    (lambda: nn.ConvTranspose2d(6, 8, 3, stride=2, groups=2, bias=False), nn.BatchNorm2d, (3, 6, 5, 5)),
    (lambda: nn.ConvTranspose1d(4, 6, 3, groups=2), nn.BatchNorm1d, (3, 4, 7)),
    (lambda: nn.ConvTranspose3d(4, 6, 2, groups=2), nn.BatchNorm3d, (2, 4, 3, 4, 3)),
]


def _far_from_defaults(bn: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        c = bn.num_features
        bn.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 3)
        bn.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) * 5 + 0.05)
        bn.weight.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 2)
        bn.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 2)


@pytest.mark.parametrize("make_op,bn_class,shape", CASES)
def test_fold_equals_op_then_bn(make_op, bn_class, shape):
    g = torch.Generator().manual_seed(0)
    op = make_op().double().eval()
    bn = bn_class(op.weight.shape[1] * op.groups if isinstance(op, nn.modules.conv._ConvTransposeNd)
                  else op.weight.shape[0]).double().eval()
    _far_from_defaults(bn, g)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        expected = bn(op(x))
        transposed = isinstance(op, nn.modules.conv._ConvTransposeNd)
        w, b = fold_bn(op.weight, op.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps,
                       transposed=transposed, groups=getattr(op, "groups", 1))
        op.weight.copy_(w)
        op.bias = nn.Parameter(b)
        got = op(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-10)
    assert (expected.abs().max() > 1).item()  # a check that could fail


def test_scale_shift_is_bn():
    mean, var = torch.tensor([1.0, -2.0]), torch.tensor([4.0, 0.25])
    s, t = bn_scale_shift(mean, var, torch.tensor([2.0, 1.0]), torch.tensor([0.5, -1.0]), 0.0)
    torch.testing.assert_close(s, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(t, torch.tensor([-0.5, 3.0]))


def test_mismatched_channels_are_refused():
    with pytest.raises(ValueError, match="output channels"):
        fold_bn(torch.zeros(4, 3, 3, 3), None, *(torch.ones(5),) * 4, 1e-5)
    with pytest.raises(ValueError, match="groups"):
        fold_bn(torch.zeros(4, 3, 3, 3), None, *(torch.ones(5),) * 4, 1e-5, transposed=True, groups=2)
