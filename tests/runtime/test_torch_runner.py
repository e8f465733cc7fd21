"""TorchRunner: from a checkpoint it computes what the exported ONNX computes; modules are not changed;
CUDA graphs only on CUDA (their parity runs where a GPU is)."""

import numpy as np
import pytest
import torch

from gprebn_edge.checkpoint import rebuild_model
from gprebn_edge.errors import InputError, MissingDependencyError
from gprebn_edge.export.fold import fold_batchnorm
from gprebn_edge.runtime.ort_runner import OnnxRuntimeRunner
from gprebn_edge.runtime.torch_runner import TorchRunner
from gprebn_edge.stages import CHECKPOINTS


def max_rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def ort_logits(exported):
    with OnnxRuntimeRunner(exported.onnx) as runner:
        return runner.infer(exported.images)


def test_checkpoint_on_cpu_equals_onnxruntime(exported, ort_logits):
    runner = TorchRunner(exported.checkpoint, checkpoints=CHECKPOINTS, prepare=fold_batchnorm)
    # the built-in model's preprocessing has no crop, so the input size is learnt from the first batch
    assert runner.inputs()[0].shape == ("batch", None, None, None)
    with runner:
        got = runner.infer(exported.images)
        assert runner.inputs()[0].shape == ("batch", 3, 32, 32)
        assert runner.outputs()[0].shape == ("batch", 10)
        info = runner.info()
    assert got.dtype == np.float32 and max_rel(got, ort_logits) <= 1e-5
    assert (info.backend, info.device, info.precision) == ("torch", "cpu", "fp32")
    assert info.details["fold"] == {"folded": 9, "skipped": 0} and info.details["which"] == "adapted"


def test_input_shape_folds_at_activate_and_unfolded_agrees(exported, ort_logits):
    with TorchRunner(exported.checkpoint, checkpoints=CHECKPOINTS, input_shape=(3, 32, 32), threads=1,
                     prepare=fold_batchnorm) as runner:
        assert runner.info().details["fold"]["folded"] == 9  # before any inference
        folded = runner.infer(exported.images)
    with TorchRunner(exported.checkpoint, checkpoints=CHECKPOINTS, folded=False) as runner:
        unfolded = runner.infer(exported.images)
        assert "fold" not in runner.info().details
    assert max_rel(folded, ort_logits) <= 1e-5 and max_rel(unfolded, ort_logits) <= 1e-5


def test_source_model_differs(exported, ort_logits):
    with TorchRunner(exported.checkpoint, checkpoints=CHECKPOINTS, which="source") as runner:
        source = runner.infer(exported.images)
    model, _ = rebuild_model(exported.checkpoint, "source")
    with torch.no_grad():
        ref = model(torch.from_numpy(exported.images)).numpy()
    assert max_rel(source, ref) <= 1e-5 and max_rel(source, ort_logits) > 1e-3


def test_module_is_left_as_given(exported):
    model, _ = rebuild_model(exported.checkpoint, "adapted")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with TorchRunner(model, input_shape=(3, 32, 32)) as runner:
        got = runner.infer(exported.images[:4])
        assert runner.info().details["module"] == type(model).__name__
    with torch.no_grad():
        ref = model(torch.from_numpy(exported.images[:4])).numpy()
    assert max_rel(got, ref) <= 1e-5
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # not folded in place


def test_bad_settings(exported, tmp_path):
    with pytest.raises(InputError, match="CUDA graphs need a CUDA device"):
        TorchRunner(exported.checkpoint, checkpoints=CHECKPOINTS, cuda_graphs=True)
    with pytest.raises(InputError, match="nn.Module or a .safetensors"):
        TorchRunner(42)
    with pytest.raises(InputError, match="which"):
        TorchRunner(exported.checkpoint, checkpoints=CHECKPOINTS, which="both")
    with pytest.raises(InputError, match="no such checkpoint"):
        TorchRunner(tmp_path / "none.safetensors", checkpoints=CHECKPOINTS).activate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_cuda_without_gpu(exported):
    with pytest.raises(MissingDependencyError, match="no CUDA GPU"):
        TorchRunner(exported.checkpoint, checkpoints=CHECKPOINTS, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_match_eager_and_recapture_on_new_batch(exported):
    x = exported.images
    with TorchRunner(exported.checkpoint, checkpoints=CHECKPOINTS, device="cuda") as runner:
        eager = runner.infer(x)
    with TorchRunner(exported.checkpoint, checkpoints=CHECKPOINTS, device="cuda", cuda_graphs=True) as runner:
        graphed = runner.infer(x)
        again = runner.infer(x)          # replay
        small = runner.infer(x[:3])      # new shape: re-captured
        back = runner.infer(x)
    for got in (graphed, again, back):
        np.testing.assert_allclose(got, eager, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(small, eager[:3], rtol=1e-4, atol=1e-4)


def test_prepare_is_the_callers_fold(exported, ort_logits):
    from gprebn_edge.export.fold import fold_batchnorm  # the caller's side: runtime does not import export

    model, _ = rebuild_model(exported.checkpoint, "adapted")
    calls = []

    def prepare(module, example):
        calls.append(tuple(example.shape))
        return fold_batchnorm(module, example)

    with TorchRunner(model, input_shape=(3, 32, 32), prepare=prepare) as runner:
        got = runner.infer(exported.images)
        assert runner.info().details["fold"]["folded"] == 9
    assert calls == [(2, 3, 32, 32)] and max_rel(got, ort_logits) <= 1e-5
    with pytest.raises(InputError, match="prepare"):
        TorchRunner(model, folded=False, prepare=prepare)


def test_a_checkpoint_needs_the_adapt_stages_reader(exported):
    """The runtime imports nothing of the adapt stage: the reader is handed in, and its absence is one error."""
    with pytest.raises(InputError, match="checkpoints=gprebn_edge.stages.CHECKPOINTS"):
        TorchRunner(exported.checkpoint)
