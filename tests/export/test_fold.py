"""Folding on a zoo of BN patterns: what folds, what is skipped and why, and that the folded model
computes what the original did. Statistics and affine parameters are set far from their defaults."""

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from gprebn_edge.errors import ModelError
from gprebn_edge.export.fold import fold_batchnorm
from gprebn_edge.models.builtin import resnet50_like, small_resnet


class ConvBnRelu(nn.Module):
    def __init__(self, bias=True, groups=1, cin=4, cout=8):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=bias, groups=groups)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class LinearBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4 * 6 * 6, 10)
        self.bn = nn.BatchNorm1d(10)

    def forward(self, x):
        return self.bn(self.fc(torch.flatten(x, 1)))


class ConvTransposeBn(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=groups)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.up(x))


class Conv3dBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(4, 5, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm3d(5)

    def forward(self, x):
        return self.bn(self.conv(x.unsqueeze(2).expand(-1, -1, 3, -1, -1)))


class PreActivation(nn.Module):
    """BN first (on the model input and before each conv), then a BN after the residual add."""

    def __init__(self):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_mid = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_add = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv1(torch.relu(self.bn_in(x)))
        y = self.conv2(torch.relu(self.bn_mid(torch.relu(y))))
        return self.bn_add(x + y)


class SharedProducer(nn.Module):
    """One conv feeds two BNs: neither can be folded into it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3)
        self.bn_a = nn.BatchNorm2d(6)
        self.bn_b = nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.conv(x)
        return self.bn_a(y) + self.bn_b(y)


class NoBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return self.conv(x)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.bn(self.conv(x))
        return x


class TwoUses(nn.Module):
    """One conv used twice, each time followed by a BN: its weight is shared, so neither BN may fold."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv(torch.relu(self.bn1(self.conv(x)))))


ZOO = {
    # name: (factory, input shape, folded BNs, skipped BNs)
    "conv-bn-relu": (lambda: ConvBnRelu(), (3, 4, 6, 6), ["bn"], []),
    "conv-no-bias": (lambda: ConvBnRelu(bias=False), (3, 4, 6, 6), ["bn"], []),
    "grouped": (lambda: ConvBnRelu(groups=2), (3, 4, 6, 6), ["bn"], []),
    "depthwise": (lambda: ConvBnRelu(groups=8, cin=8), (3, 8, 6, 6), ["bn"], []),
    "linear-bn1d": (lambda: LinearBn(), (3, 4, 6, 6), ["bn"], []),
    "convtranspose-g1": (lambda: ConvTransposeBn(1), (3, 4, 5, 5), ["bn"], []),
    "convtranspose-g2": (lambda: ConvTransposeBn(2), (3, 4, 5, 5), ["bn"], []),
    "conv3d-bn3d": (lambda: Conv3dBn(), (2, 4, 5, 5), ["bn"], []),
    "pre-activation": (lambda: PreActivation(), (3, 4, 6, 6), [], ["bn_in", "bn_mid", "bn_add"]),
    "shared-producer": (lambda: SharedProducer(), (3, 4, 6, 6), [], ["bn_a", "bn_b"]),
    "conv-used-twice": (lambda: TwoUses(), (3, 4, 6, 6), [], ["bn1", "bn2"]),
    "no-bn": (lambda: NoBn(), (3, 4, 6, 6), [], []),
}


def _far_from_defaults(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 2)
                m.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.1)
                m.weight.copy_(torch.randn(c, generator=g) * 1.5)
                m.bias.copy_(torch.randn(c, generator=g))
    return model.eval()


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_folds_exactly_what_is_foldable(name):
    factory, shape, folded, skipped = ZOO[name]
    torch.manual_seed(0)
    model = _far_from_defaults(factory().double())
    x = torch.randn(shape, dtype=torch.float64)
    gm, report = fold_batchnorm(model, x)
    assert [b for b, _ in report.folded] == folded
    assert [b for b, _ in report.skipped] == skipped
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-10, atol=1e-10)
    remaining = [n for n, m in gm.named_modules() if isinstance(m, _BatchNorm)]
    assert remaining == skipped
    # folded producers keep their parameter names and gain a bias
    for _, producer in report.folded:
        assert f"{producer}.weight" in gm.state_dict() and f"{producer}.bias" in gm.state_dict()


def test_fp32_relative_error_of_the_built_in_model():
    from gprebn_edge.models.spec import load_model

    model = load_model("builtin:small_resnet").model
    x = torch.randn(64, 3, 32, 32)
    gm, report = fold_batchnorm(model, x)
    assert len(report.folded) == 9 and not report.skipped
    with torch.no_grad():
        ref, got = model(x), gm(x)
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    assert torch.equal(got.argmax(1), ref.argmax(1))


@pytest.mark.parametrize("factory,n_bn,shape", [(small_resnet, 9, (2, 3, 32, 32)),
                                                (resnet50_like, 53, (1, 3, 64, 64))])
def test_resnets_fold_every_bn_and_keep_names(factory, n_bn, shape):
    model = _far_from_defaults(factory().double())
    x = torch.randn(shape, dtype=torch.float64)
    gm, report = fold_batchnorm(model, x)
    assert len(report.folded) == n_bn and not report.skipped
    original = set(model.state_dict())
    assert all(k in original or k.endswith(".bias") for k in gm.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-9, atol=1e-9)


def test_untraceable_model_is_refused_with_a_clear_message():
    with pytest.raises(ModelError, match="torch.fx cannot trace Untraceable"):
        fold_batchnorm(Untraceable().eval(), torch.randn(1, 4, 6, 6))


def test_folding_does_not_touch_the_original():
    model = _far_from_defaults(ConvBnRelu().double())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold_batchnorm(model, torch.randn(2, 4, 6, 6, dtype=torch.float64))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
