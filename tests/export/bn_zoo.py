"""A zoo of BatchNorm patterns, shared by the fold tests (torch.fx and ONNX level) and benchmarks/fold_zoo.py:
what folds (conv with and without bias, grouped, depthwise, Linear+BN1d, ConvTranspose with groups 1 and 2,
Conv3d+BN3d), what must be skipped (BN first, BN after an add, a conv feeding two BNs, a conv called twice),
a model with no BN, and a model torch.fx cannot trace. Plain module, no tests: import it as `bn_zoo` (the
tests find it on pytest's rootdir-inserted path, the benchmark inserts this folder on sys.path)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["ConvBnRelu", "LinearBn", "ConvTransposeBn", "Conv3dBn", "PreActivation", "SharedProducer", "NoBn",
           "Untraceable", "TwoUses", "ZOO", "TORCHVISION_ZOO", "far_from_defaults", "far_from_defaults_deep"]


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


def far_from_defaults(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every BN's statistics and affine parameters drawn far from their defaults (at the defaults a fold is
    nearly the identity and hides bugs); returns the model in eval mode. Meant for the small zoo models: over
    tens of BNs these scales compound (torchvision's resnet18 then gives logits ~1e3; use far_from_defaults_deep)."""
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


def far_from_defaults_deep(model: nn.Module, seed: int = 0) -> nn.Module:
    """Like far_from_defaults, with scales a deep net survives: running_var in [0.5, 2], running_mean and
    bias ~ N(0, 0.5), weight of magnitude [0.5, 1.5] and random sign. With these, torchvision's
    resnet18/mobilenet_v2/efficientnet_b0 at random init give logits
    of order 1-10 and an fp32-vs-float64 relative error below 1e-6."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                c = m.num_features
                sign = torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_((torch.rand(c, generator=g) + 0.5) * sign)
                m.bias.copy_(torch.randn(c, generator=g) * 0.5)
    return model.eval()


# torchvision.models constructors (weights=None, 1000 classes) and their BN count: every BN follows a conv
# that nothing else consumes (Conv2dNormActivation, BasicBlock, the downsample branches), so all fold.
TORCHVISION_ZOO = {"resnet18": 20, "mobilenet_v2": 52, "efficientnet_b0": 49}
