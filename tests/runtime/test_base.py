"""Runner base: the lifecycle (double activate is an error, deactivate is idempotent), the shared input
checks with one-line errors, and torch's thread count restored whatever order runners close in."""


import numpy as np
import pytest
import torch

from gprebn_edge.errors import GprebnError, InputError
from gprebn_edge.runtime.base import Runner, RunnerInfo, TensorInfo
from gprebn_edge.runtime.torch_runner import TorchRunner, torch_threads


class _Echo(Runner):
    name = "echo"

    def __init__(self, shape=("batch", 3, 4, 4), dtype="float32") -> None:
        super().__init__()
        self.shape, self.dtype, self.loads, self.frees = shape, dtype, 0, 0

    def _activate(self):
        self.loads += 1

    def _deactivate(self):
        self.frees += 1

    def _describe_io(self):
        return [TensorInfo("input", self.shape, self.dtype)], [TensorInfo("logits", ("batch", 2), "float32")]

    def _infer(self, batch):
        return batch.reshape(len(batch), -1)[:, :2].astype(np.float32)

    def info(self):
        return RunnerInfo("echo", "cpu")


def test_double_activate_raises_and_deactivate_is_idempotent():
    r = _Echo()
    r.activate()
    with pytest.raises(GprebnError, match="already active") as e:
        r.activate()
    assert "\n" not in str(e.value) and r.active and r.loads == 1
    r.deactivate()
    r.deactivate()
    assert not r.active and r.frees == 1
    with r:
        assert r.active
    assert (r.loads, r.frees) == (2, 2)


def test_failed_activation_cleans_up_and_stays_inactive():
    r = _Echo(shape=("batch", 3))
    r._describe_io = lambda: ([], [])  # no inputs: not an image model
    with pytest.raises(GprebnError, match="runners take one image batch"):
        r.activate()
    assert not r.active and r.frees == 1


def test_io_known_only_when_loaded():
    r = _Echo()
    r._describe_io = lambda: None
    with pytest.raises(InputError, match="use `with runner:` first"):
        r.inputs()


@pytest.mark.parametrize(("batch", "match"), [
    (np.zeros((2, 3, 4)), r"echo: input 'input' is 4-d \[batch, 3, 4, 4\], got shape \[2, 3, 4\]"),
    (np.zeros((2, 3, 5, 4)), r"preprocess the images to batch, 3, 4, 4 \(dimension 2 must be 4\)"),
    (np.array([["a"]]), r"takes numbers .float32., got a <U1 array"),
])
def test_bad_batches_are_one_line_input_errors(batch, match):
    with _Echo() as r:
        with pytest.raises(InputError, match=match) as e:
            r.infer(batch)
        assert "\n" not in str(e.value)


def test_fixed_batch_and_conversion_to_the_input_type():
    with _Echo(shape=(2, 3, 4, 4), dtype="float16") as r:
        with pytest.raises(InputError, match="fixed batch of 2, got 3 images"):
            r.infer(np.zeros((3, 3, 4, 4)))
        x = r.check_batch(np.ones((2, 3, 4, 4), np.float64)[:, :, ::1])
        assert x.dtype == np.float16 and x.flags.c_contiguous
        assert r.infer(np.ones((2, 3, 4, 4), np.int64)).shape == (2, 2)


@pytest.mark.parametrize("order", ["lifo", "fifo"])
def test_torch_threads_restored_whatever_the_order(order):
    before = torch.get_num_threads()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    a = TorchRunner(model, threads=3, folded=False)
    b = TorchRunner(model, threads=2, folded=False)
    a.activate()
    assert torch.get_num_threads() == 3
    b.activate()
    assert torch.get_num_threads() == 2
    first, second = (b, a) if order == "lifo" else (a, b)
    first.deactivate()
    assert torch.get_num_threads() == (3 if order == "lifo" else 2)  # the runner still open keeps its own
    second.deactivate()
    assert torch.get_num_threads() == before


def test_torch_threads_scope_nests_and_none_leaves_it():
    before = torch.get_num_threads()
    with torch_threads(None):
        assert torch.get_num_threads() == before
    with torch_threads(1), torch_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
