"""A zoo of BatchNorm patterns, shared by the fold tests (torch.fx and ONNX level) and benchmarks/fold_zoo.py:
what folds (conv with and without bias, grouped, depthwise, Linear+BN1d, ConvTranspose with groups 1 and 2,
Conv3d+BN3d; convolutions written as real models write them: a Conv2d subclass with static "same" padding
calling F.conv2d, F.conv2d / F.conv_transpose2d / F.linear on a module's own parameters, with and without
bias, depthwise, a pad before the conv, Identity/Dropout or a reflect pad between conv and BN), what must be
skipped (BN first, BN after an add, a conv feeding two BNs, a conv called twice, a weight used by two calls,
a constant pad between conv and BN), a model with no BN, and a model torch.fx cannot trace. Plain module, no
tests: import it as `bn_zoo` (the tests find it on pytest's rootdir-inserted path, the benchmark inserts this
folder on sys.path)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SKIP_REASONS", "ONNX_FOLDS", "ContiguousBetween", "StaticSamePadConv2d", "SamePadBlock",
           "FunctionalConv", "FunctionalConvBn", "ConvBnRelu", "LinearBn", "ConvTransposeBn", "Conv3dBn",
           "PreActivation", "SharedProducer", "NoBn",
           "Untraceable", "TwoUses", "ZOO", "TORCHVISION_ZOO",
           "CONCAT_REASON", "torchvision_expected", "far_from_defaults", "far_from_defaults_deep"]


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


class StaticSamePadConv2d(nn.Conv2d):
    """TensorFlow-style "same" padding computed once for a fixed image size, as EfficientNet ports write it:
    an nn.Conv2d subclass whose forward pads, then calls F.conv2d on its own weight (torch.fx traces it as a
    pad module, a get_attr and a call of torch.conv2d, not as one Conv2d call)."""

    def __init__(self, cin, cout, k, stride=1, groups=1, bias=False, image=6):
        super().__init__(cin, cout, k, stride=stride, groups=groups, bias=bias)
        out = math.ceil(image / stride)
        pad = max((out - 1) * stride + k - image, 0)
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def forward(self, x):
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class SamePadBlock(nn.Module):
    """Expand (1x1, no bias), depthwise 3x3 stride 2, project: each a StaticSamePadConv2d followed by a BN."""

    def __init__(self):
        super().__init__()
        self.expand = StaticSamePadConv2d(4, 8, 1)
        self.bn0 = nn.BatchNorm2d(8)
        self.depthwise = StaticSamePadConv2d(8, 8, 3, stride=2, groups=8)
        self.bn1 = nn.BatchNorm2d(8)
        self.project = StaticSamePadConv2d(8, 6, 1, bias=True, image=3)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x):
        x = torch.relu(self.bn0(self.expand(x)))
        x = torch.relu(self.bn1(self.depthwise(x)))
        return self.bn2(self.project(x))


class FunctionalConv(nn.Module):
    """F.conv2d on the module's own parameters (weight and an optional bias), optionally after a constant
    F.pad (a pad before the conv needs nothing) and with groups (depthwise at groups == cin == cout)."""

    def __init__(self, cin=4, cout=8, bias=True, groups=1, pad_first=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin // groups, 3, 3) * 0.3)
        self.bias = nn.Parameter(torch.randn(cout)) if bias else None
        self.groups, self.pad_first = groups, pad_first

    def forward(self, x):
        if self.pad_first:
            return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, groups=self.groups)
        return F.conv2d(x, self.weight, self.bias, padding=1, groups=self.groups)


class FunctionalConvBn(nn.Module):
    """A FunctionalConv, then `between` (Identity, Dropout, a pad, ...), then a BN."""

    def __init__(self, between=None, cin=4, cout=8, **conv):
        super().__init__()
        self.conv = FunctionalConv(cin, cout, **conv)
        self.between = between if between is not None else nn.Identity()
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.between(self.conv(x))))


class DropoutsBetween(nn.Module):
    """nn.Dropout and F.dropout(training=False) between a functional conv and its BN: no-ops in eval."""

    def __init__(self):
        super().__init__()
        self.conv = FunctionalConv(bias=False)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(F.dropout(self.drop(self.conv(x)), 0.3, training=self.training))


class ReflectPadBetween(nn.Module):
    """Conv, then a reflect pad (module) and a replicate pad (F.pad), then BN: the pads copy values within
    each channel, so BN commutes with them and folds into the conv."""

    def __init__(self):
        super().__init__()
        self.conv = FunctionalConv(bias=False)
        self.pad = nn.ReflectionPad2d(1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(F.pad(self.pad(self.conv(x)), (1, 0, 0, 1), mode="replicate"))


class ConstantPadBetween(nn.Module):
    """Conv, zero pad, BN: BN(0) differs per channel, so the BN must stay."""

    def __init__(self):
        super().__init__()
        self.conv = FunctionalConv()
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(F.pad(self.conv(x), (1, 1, 1, 1), value=0.0))


class FunctionalLinearBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Module()
        self.fc.weight = nn.Parameter(torch.randn(10, 4 * 6 * 6) * 0.1)
        self.fc.bias = nn.Parameter(torch.randn(10))
        self.bn = nn.BatchNorm1d(10)

    def forward(self, x):
        return self.bn(F.linear(torch.flatten(x, 1), self.fc.weight, self.fc.bias))


class FunctionalConvTransposeBn(nn.Module):
    """F.conv_transpose2d with groups 2 and no bias, weight (C_in, C_out / groups, k, k), then BN."""

    def __init__(self):
        super().__init__()
        self.up = nn.Module()
        self.up.weight = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(F.conv_transpose2d(x, self.up.weight, None, stride=2, groups=2))


class SharedFunctionalWeight(nn.Module):
    """One weight used by two F.conv2d calls, each followed by a BN: neither may fold."""

    def __init__(self):
        super().__init__()
        self.conv = FunctionalConv(cin=4, cout=4)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv(x)))
        return self.bn2(self.conv(y))


class ContiguousBetween(nn.Module):
    """`.contiguous()` between conv and BN: torch.fx sees a method call it does not know to be a no-op and
    keeps the BN; the ONNX export drops the call, and the ONNX level folds the BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x).contiguous()))


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
    "static-same-pad": (lambda: SamePadBlock(), (3, 4, 6, 6), ["bn0", "bn1", "bn2"], []),
    "functional-conv": (lambda: FunctionalConvBn(), (3, 4, 6, 6), ["bn"], []),
    "functional-conv-no-bias": (lambda: FunctionalConvBn(bias=False), (3, 4, 6, 6), ["bn"], []),
    "functional-depthwise": (lambda: FunctionalConvBn(cin=8, groups=8, bias=False), (3, 8, 6, 6), ["bn"], []),
    "functional-pad-first": (lambda: FunctionalConvBn(pad_first=True, bias=False), (3, 4, 6, 6), ["bn"], []),
    "functional-linear": (lambda: FunctionalLinearBn(), (3, 4, 6, 6), ["bn"], []),
    "functional-convtranspose-g2": (lambda: FunctionalConvTransposeBn(), (3, 4, 5, 5), ["bn"], []),
    "identity-between": (lambda: FunctionalConvBn(nn.Identity(), bias=False), (3, 4, 6, 6), ["bn"], []),
    "dropout-between": (lambda: DropoutsBetween(), (3, 4, 6, 6), ["bn"], []),
    "reflect-pad-between": (lambda: ReflectPadBetween(), (3, 4, 6, 6), ["bn"], []),
    "constant-pad-between": (lambda: ConstantPadBetween(), (3, 4, 6, 6), [], ["bn"]),
    "functional-shared-weight": (lambda: SharedFunctionalWeight(), (3, 4, 6, 6), [], ["bn1", "bn2"]),
    "contiguous-between": (lambda: ContiguousBetween(), (3, 4, 6, 6), [], ["bn"]),
}

# BNs torch.fx keeps that the ONNX graph shows foldable (the export's second level folds them), per zoo entry
ONNX_FOLDS = {"contiguous-between": [("bn", "conv")]}

# the reason each skipped BN of the zoo must give (a fragment of it), per zoo entry
SKIP_REASONS = {
    "pre-activation": ["the model input", "`relu`", "`add`"],
    "shared-producer": ["other consumers", "other consumers"],
    "conv-used-twice": ["called more than once", "called more than once"],
    "constant-pad-between": ["constant pad"],
    "functional-shared-weight": ["also used elsewhere", "also used elsewhere"],
    "contiguous-between": ["`contiguous`"],
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


# torchvision.models constructors (weights=None, 1000 classes) and their BN count. Every BN follows a conv
# that nothing else consumes (Conv2dNormActivation, BasicBlock, Bottleneck, the downsample branches) and
# folds, except DenseNet's BNs that read a concatenation (see torchvision_expected).
TORCHVISION_ZOO = {"resnet18": 20, "resnet50": 53, "mobilenet_v2": 52, "mobilenet_v3_small": 34,
                   "efficientnet_b0": 49, "regnet_x_400mf": 71, "densenet121": 121}
CONCAT_REASON = "no foldable producer (its input comes from `cat`)"


def torchvision_expected(name: str, bns: list[str]) -> tuple[set[str], set[str]]:
    """(BNs that fold, BNs that stay with CONCAT_REASON) for a TORCHVISION_ZOO model with BN names `bns`.
    DenseNet: the stem BN and each dense layer's second BN follow a conv; each dense layer's first BN, each
    transition's BN and the final BN read a concatenation."""
    if name.startswith("densenet"):
        folded = {b for b in bns if b == "features.norm0" or b.endswith(".norm2")}
        return folded, set(bns) - folded
    return set(bns), set()
