"""Folding on a zoo of BN patterns (bn_zoo.py) and on torchvision's resnet18/mobilenet_v2/efficientnet_b0
(skipped where torchvision does not import): what folds, what is skipped and why, and that the folded model
computes what the original did. Statistics and affine parameters are set far from their defaults."""

import copy

import pytest
import torch
from bn_zoo import (
    SKIP_REASONS,
    TORCHVISION_ZOO,
    ZOO,
    ConvBnRelu,
    Untraceable,
    far_from_defaults,
    far_from_defaults_deep,
)
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision_beside_cpu_torch import torchvision_or_skip

from gprebn_edge.errors import ModelError
from gprebn_edge.export.fold import fold_batchnorm
from gprebn_edge.export.onnx_export import export_onnx, onnx_parity, parity_limit
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


@pytest.mark.parametrize("name", list(TORCHVISION_ZOO))
def test_torchvision_models_fold_every_bn_and_export(name, tmp_path):
    torchvision = torchvision_or_skip()
    torch.manual_seed(0)
    model = far_from_defaults_deep(getattr(torchvision.models, name)(weights=None))
    bns = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    assert len(bns) == TORCHVISION_ZOO[name]
    x = torch.randn(8, 3, 64, 64)

    # float64: folding is exact, and every BN follows a conv nothing else consumes, so none is skipped
    model64 = copy.deepcopy(model).double()
    gm64, report = fold_batchnorm(model64, x[:2].double())
    assert sorted(b for b, _ in report.folded) == sorted(bns) and not report.skipped
    assert not any(isinstance(m, _BatchNorm) for m in gm64.modules())
    with torch.no_grad():
        ref64 = model64(x.double())
        torch.testing.assert_close(gm64(x.double()), ref64, rtol=1e-9, atol=1e-9 * ref64.abs().max().item())

    # fp32: within 1e-5 relative, or 8x the model's own fp32 rounding where that is larger (the export gate)
    gm, report32 = fold_batchnorm(model, x[:2])
    assert report32.folded == report.folded
    _, limit = parity_limit(model, x.numpy())
    with torch.no_grad():
        ref, got = model(x), gm(x)
    assert torch.isfinite(ref).all() and _max_rel(got, ref) <= limit
    assert torch.equal(got.argmax(1), ref.argmax(1))

    # ONNX: the export gate (onnxruntime vs the folded model), then onnxruntime vs the unfolded original
    path = tmp_path / f"{name}.onnx"
    parity = export_onnx(gm, path, x[:2], check_batches=[x.numpy()])
    assert parity.images == 8 and parity.top1_agreement == 1.0 and parity.max_rel <= parity.limit
    end_to_end = onnx_parity(path, model, [x.numpy()])
    assert end_to_end.top1_agreement == 1.0 and end_to_end.max_rel <= limit


def test_untraceable_model_is_refused_with_a_clear_message():
    with pytest.raises(ModelError, match="torch.fx cannot trace Untraceable"):
        fold_batchnorm(Untraceable().eval(), torch.randn(1, 4, 6, 6))


def test_folding_does_not_touch_the_original():
    model = far_from_defaults(ConvBnRelu().double())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold_batchnorm(model, torch.randn(2, 4, 6, 6, dtype=torch.float64))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
