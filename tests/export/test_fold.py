"""Folding on a zoo of BN patterns (bn_zoo.py) and the built-in models: what folds, what is skipped and why,
and that the folded model computes what the original did, in float64. Statistics and affine parameters are
set far from their defaults. Real models (EfficientNet-Lite0, torchvision's) are in test_real_models.py."""


import pytest
import torch
from bn_zoo import (
    SKIP_REASONS,
    ZOO,
    ConvBnRelu,
    Untraceable,
    far_from_defaults,
)
from torch.nn.modules.batchnorm import _BatchNorm

from gprebn_edge.errors import ModelError
from gprebn_edge.export.fold import fold_batchnorm
from gprebn_edge.models.builtin import resnet50_like, small_resnet


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_folds_exactly_what_is_foldable(name):
    factory, shape, folded, skipped = ZOO[name]
    torch.manual_seed(0)
    model = far_from_defaults(factory().double())
    x = torch.randn(shape, dtype=torch.float64)
    gm, report = fold_batchnorm(model, x)
    assert [b for b, _ in report.folded] == folded
    assert [b for b, _ in report.skipped] == skipped
    assert len(SKIP_REASONS.get(name, [])) == len(skipped)
    for (_, reason), fragment in zip(report.skipped, SKIP_REASONS.get(name, []), strict=True):
        assert fragment in reason
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
    model = far_from_defaults(factory().double())
    x = torch.randn(shape, dtype=torch.float64)
    gm, report = fold_batchnorm(model, x)
    assert len(report.folded) == n_bn and not report.skipped
    original = set(model.state_dict())
    assert all(k in original or k.endswith(".bias") for k in gm.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-9, atol=1e-9)


def _max_rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


def test_untraceable_model_is_refused_with_a_clear_message():
    with pytest.raises(ModelError, match="torch.fx cannot trace Untraceable"):
        fold_batchnorm(Untraceable().eval(), torch.randn(1, 4, 6, 6))


def test_folding_does_not_touch_the_original():
    model = far_from_defaults(ConvBnRelu().double())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold_batchnorm(model, torch.randn(2, 4, 6, 6, dtype=torch.float64))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
