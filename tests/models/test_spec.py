"""Model specs, weights loading and the BatchNorm precondition."""

from __future__ import annotations

import importlib.util
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision_beside_cpu_torch import usable_torchvision

from gprebn_edge.data.preprocess import IMAGENET_MEAN, Preprocess
from gprebn_edge.errors import ArtifactError, GprebnError, MissingDependencyError, ModelError
from gprebn_edge.io import sha256_file
from gprebn_edge.models import spec as spec_mod
from gprebn_edge.models.builtin import small_resnet
from gprebn_edge.models.spec import (
    BUILTIN_WEIGHTS_DIR,
    ModelSpec,
    apply_state_dict,
    batchnorm_layers,
    build_model,
    load_model,
    read_state_dict,
    require_batchnorm,
)

TINY_NET = """
from torch import nn

def make(num_classes=3):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

make.preprocess = {"resize": 40, "crop": 32, "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5]}

def no_classes():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

def no_bn(num_classes=3):
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(num_classes))

def no_stats():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False)))

def no_affine():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False))

def broken():
    raise ValueError("bad config\\nsecond line")

def not_a_module():
    return 42

_private = 1
"""


def raises_one_line(exc_type: type[Exception], match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(exc_type, match=match) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert isinstance(info.value, GprebnError)
    return msg


def _touch(path: str) -> None:
    Path(path).write_text("ran")


class Payload:
    """Unpickling it would create a marker file: the side effect that must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


@pytest.fixture
def net_file(tmp_path: Path) -> Path:
    path = tmp_path / "net.py"
    path.write_text(TINY_NET)
    return path


def _scrambled_small_resnet(num_classes: int = 10) -> nn.Module:
    """Statistics and weights far from their defaults, so a load that silently did nothing shows."""
    torch.manual_seed(1)
    model = small_resnet(num_classes=num_classes)
    for _, bn in batchnorm_layers(model):
        bn.running_mean.uniform_(-2, 2)
        bn.running_var.uniform_(0.5, 3)
        bn.num_batches_tracked.fill_(7)
    return model


def _assert_same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert own.keys() == state.keys()
    for k, v in state.items():
        torch.testing.assert_close(own[k], v.to(own[k].dtype), msg=k)


# builtin


def test_builtin_committed_weights_in_this_repo() -> None:
    committed = BUILTIN_WEIGHTS_DIR / "small_resnet.safetensors"
    if committed.is_file():
        loaded = load_model("builtin:small_resnet")
        assert loaded.spec.weights == str(committed.absolute())
        assert loaded.spec.weights_sha256 == sha256_file(committed)
        assert not loaded.model.training
    else:
        raises_one_line(ModelError, "no committed weights for builtin:small_resnet; pass --weights",
                        load_model, "builtin:small_resnet")


def test_builtin_uses_committed_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spec_mod, "BUILTIN_WEIGHTS_DIR", tmp_path)
    raises_one_line(ModelError, "no committed weights", load_model, "builtin:small_resnet")
    state = _scrambled_small_resnet().state_dict()
    save_file(state, str(tmp_path / "small_resnet.safetensors"))
    loaded = load_model("builtin:small_resnet")
    _assert_same_state(loaded.model, state)
    assert loaded.spec == ModelSpec("builtin:small_resnet", None, str(tmp_path / "small_resnet.safetensors"),
                                    sha256_file(tmp_path / "small_resnet.safetensors"))
    assert loaded.preprocess == Preprocess(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_builtin_explicit_weights(tmp_path: Path) -> None:
    state = _scrambled_small_resnet().state_dict()
    torch.save(state, tmp_path / "w.pt")
    loaded = load_model("builtin:small_resnet", weights=tmp_path / "w.pt")
    _assert_same_state(loaded.model, state)
    assert not loaded.model.training
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.spec.weights == str(tmp_path / "w.pt")
    assert loaded.spec.weights_sha256 == sha256_file(tmp_path / "w.pt")
    assert loaded.spec.weights_sha256.startswith("sha256:") and len(loaded.spec.weights_sha256) == 71
    assert ModelSpec.from_dict(loaded.spec.to_dict()) == loaded.spec
    assert loaded.model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_resnet50_like_random_and_reproducible(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(spec_mod, "BUILTIN_WEIGHTS_DIR", tmp_path)
    a = load_model("builtin:resnet50_like", num_classes=5)
    b, pre = build_model("builtin:resnet50_like", num_classes=5)
    assert a.spec.weights is None and a.spec.weights_sha256 is None and a.spec.num_classes == 5
    assert (a.preprocess.resize, a.preprocess.crop, a.preprocess.mean) == (256, 224, IMAGENET_MEAN)
    assert pre == a.preprocess
    torch.testing.assert_close(a.model.fc.weight, b.fc.weight)


def test_unknown_builtin() -> None:
    msg = raises_one_line(ModelError, "unknown builtin model 'nope'", build_model, "builtin:nope")
    assert "small_resnet" in msg and "resnet50_like" in msg


@pytest.mark.parametrize("bad", ["small_resnet", "timm/x:make", "foo-bar:make", "builtin:"])
def test_spec_forms(bad: str) -> None:
    msg = raises_one_line(ModelError, "model spec|model file", build_model, bad)
    assert "builtin:" in msg


# user code: file.py:factory and package.module:factory


def test_file_factory(net_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    loaded = load_model("net.py:make")
    assert loaded.spec.spec == f"{net_file}:make"  # absolute, so it rebuilds from anywhere
    assert loaded.model(torch.rand(2, 3, 8, 8)).shape == (2, 3)
    assert loaded.preprocess == Preprocess(resize=40, crop=32, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    loaded = load_model("net.py:make", num_classes=7)
    assert loaded.spec.num_classes == 7
    assert loaded.model(torch.rand(2, 3, 8, 8)).shape == (2, 7)
    monkeypatch.chdir("/")
    model, _ = build_model(loaded.spec.spec, loaded.spec.num_classes)
    assert model[-1].out_features == 7


def test_file_factory_default_preprocess(net_file: Path) -> None:
    model, pre = build_model(f"{net_file}:no_classes")
    assert pre == Preprocess()
    msg = raises_one_line(ModelError, "takes no num_classes", build_model, f"{net_file}:no_classes",
                          num_classes=4)
    assert "--num-classes" in msg


def test_file_factory_with_weights(net_file: Path, tmp_path: Path) -> None:
    model, _ = build_model(f"{net_file}:make")
    model[1].running_mean.fill_(3.0)
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, tmp_path / "ckpt.pt")
    loaded = load_model(f"{net_file}:make", weights=tmp_path / "ckpt.pt")
    torch.testing.assert_close(loaded.model[1].running_mean, torch.full((4,), 3.0))


def test_module_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "gprebn_test_usernet.py").write_text(TINY_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        loaded = load_model("gprebn_test_usernet:make", num_classes=2)
        assert loaded.spec.spec == "gprebn_test_usernet:make"
        assert loaded.model(torch.rand(1, 3, 8, 8)).shape == (1, 2)
        raises_one_line(ModelError, "cannot import module 'gprebn_no_such_mod'", build_model,
                        "gprebn_no_such_mod:make")
    finally:
        sys.modules.pop("gprebn_test_usernet", None)


def test_missing_file(tmp_path: Path) -> None:
    raises_one_line(ModelError, "does not exist", build_model, f"{tmp_path}/absent.py:make")
    (tmp_path / "net.txt").write_text("x")
    raises_one_line(ModelError, r"must be a Python file ending in \.py", build_model,
                    f"{tmp_path}/net.txt:make")


def test_missing_factory(net_file: Path) -> None:
    msg = raises_one_line(ModelError, "has no callable 'nope'", build_model, f"{net_file}:nope")
    assert "make" in msg and "no_bn" in msg and "_private" not in msg


def test_factory_raising(net_file: Path) -> None:
    msg = raises_one_line(ModelError, "raised ValueError: bad config", build_model, f"{net_file}:broken")
    assert "second line" not in msg


def test_factory_not_a_module(net_file: Path) -> None:
    raises_one_line(ModelError, "returned int, not a torch.nn.Module", build_model,
                    f"{net_file}:not_a_module")


def test_file_import_error(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("import gprebn_no_such_dependency\n")
    raises_one_line(ModelError, "failed to import .*ModuleNotFoundError", build_model,
                    f"{tmp_path}/bad.py:make")


# BatchNorm precondition


def test_no_batchnorm(net_file: Path) -> None:
    raises_one_line(ModelError, "has no BatchNorm layers: GpreBN adapts", load_model, f"{net_file}:no_bn")


def test_bn_without_running_stats(net_file: Path) -> None:
    raises_one_line(ModelError, "BatchNorm layer `1.0` has no running statistics", load_model,
                    f"{net_file}:no_stats")


def test_bn_without_affine(net_file: Path) -> None:
    raises_one_line(ModelError, "BatchNorm layer `1` has no affine parameters", load_model,
                    f"{net_file}:no_affine")


def test_batchnorm_layers_order() -> None:
    model = nn.Sequential(nn.BatchNorm1d(2), nn.Sequential(nn.Linear(2, 2), nn.BatchNorm3d(2)),
                          nn.SyncBatchNorm(2), nn.LayerNorm(2))
    assert [n for n, _ in batchnorm_layers(model)] == ["0", "1.1", "2"]
    require_batchnorm(model, "x")


# weights files


def test_weights_of_another_model(net_file: Path, tmp_path: Path) -> None:
    torch.save(small_resnet().state_dict(), tmp_path / "w.pt")
    msg = raises_one_line(ModelError, "weights in .*w.pt do not match", load_model, f"{net_file}:make",
                          weights=tmp_path / "w.pt")
    assert "missing (" in msg and "unexpected (" in msg and "--num-classes" in msg and ", ..." in msg


def test_shape_mismatch(tmp_path: Path) -> None:
    save_file(small_resnet(num_classes=10).state_dict(), str(tmp_path / "w.safetensors"))
    msg = raises_one_line(ModelError, "2 shape mismatch", load_model, "builtin:small_resnet",
                          weights=tmp_path / "w.safetensors", num_classes=5)
    assert "fc.weight: file (10, 64) vs model (5, 64)" in msg and "builtin:small_resnet" in msg


def test_missing_num_batches_tracked_tolerated() -> None:
    model = _scrambled_small_resnet()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    fresh = small_resnet()
    apply_state_dict(fresh, state, "w.pt")
    torch.testing.assert_close(fresh.bn1.running_mean, model.bn1.running_mean)


def test_pickled_objects_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    torch.save({"fc.weight": torch.zeros(2), "extra": Payload(marker)}, tmp_path / "evil.pt")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Payload(marker)))
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")  # a whole pickled module, not its state dict
    for name in ("evil.pt", "evil.pkl", "module.pt"):
        msg = raises_one_line(ModelError, "holds pickled Python objects, which are never loaded",
                              read_state_dict, tmp_path / name)
        assert "model.state_dict()" in msg
    assert not marker.exists()
    pickle.loads((tmp_path / "evil.pkl").read_bytes())  # control: plain unpickling would have run it
    assert marker.exists()


def test_corrupt_and_missing_weights(tmp_path: Path) -> None:
    raises_one_line(ModelError, "does not exist", read_state_dict, tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"garbage data, not a checkpoint")
    raises_one_line(ModelError, "is not a readable weights file", read_state_dict, tmp_path / "junk.pt")
    torch.save(small_resnet().state_dict(), tmp_path / "cut.pt")
    data = (tmp_path / "cut.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    raises_one_line(ModelError, "is not a readable weights file", read_state_dict, tmp_path / "cut.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    raises_one_line(ModelError, "is not a readable safetensors file", read_state_dict,
                    tmp_path / "junk.safetensors")


def test_non_tensor_values(tmp_path: Path) -> None:
    torch.save({"a": torch.zeros(1), "lr": 0.1}, tmp_path / "w.pt")
    raises_one_line(ModelError, r"1 entries are not tensors \(lr\)", read_state_dict, tmp_path / "w.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    raises_one_line(ModelError, "holds a list, not a state dict", read_state_dict, tmp_path / "list.pt")


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict"])
def test_nesting_and_module_prefix_unwrapped(tmp_path: Path, key: str) -> None:
    state = _scrambled_small_resnet().state_dict()
    torch.save({key: {f"module.{k}": v for k, v in state.items()}, "epoch": 9}, tmp_path / "w.pt")
    read = read_state_dict(tmp_path / "w.pt")
    assert read.keys() == state.keys()
    _assert_same_state(load_model("builtin:small_resnet", weights=tmp_path / "w.pt").model, state)


def test_safetensors_round_trip(tmp_path: Path) -> None:
    state = _scrambled_small_resnet().state_dict()
    save_file(state, str(tmp_path / "w.safetensors"))
    read = read_state_dict(tmp_path / "w.safetensors")
    assert read.keys() == state.keys()
    for k, v in state.items():
        torch.testing.assert_close(read[k], v)


def test_model_spec_from_bad_dict() -> None:
    with pytest.raises(ArtifactError, match="'spec' string"):
        ModelSpec.from_dict({"num_classes": 3})


# torchvision (optional)


def test_torchvision() -> None:
    if usable_torchvision() is None:  # not installed (tests/conftest.py made an installed one usable)
        raises_one_line(MissingDependencyError, r"pip install 'gprebn-edge\[vision\]'", build_model,
                        "torchvision:resnet18")
    else:
        loaded = load_model("torchvision:resnet18", num_classes=4)
        assert loaded.model.fc.out_features == 4 and loaded.preprocess.crop == 224
        raises_one_line(ModelError, "unknown torchvision model", build_model, "torchvision:resnet_nope")


def test_broken_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "torchvision.py"
    fake.write_text("raise RuntimeError('operator torchvision::nms does not exist')")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    # built for another torch: the cause and a matching pair, not the extra (it is installed)
    msg = raises_one_line(MissingDependencyError, "was built for another torch than", build_model,
                          "torchvision:resnet18")
    assert torch.__version__ in msg and "pip install torch==2.14.1 torchvision==0.29.1" in msg
    assert "gprebn-edge[vision]" not in msg and "torchvision::nms does not exist" in msg
    fake.write_text("raise OSError('libc10.so: cannot open shared object file')")
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    msg = raises_one_line(MissingDependencyError, "torchvision is not importable", build_model,
                          "torchvision:resnet18")
    assert "OSError: libc10.so" in msg and "gprebn-edge[vision]" in msg
    monkeypatch.setitem(sys.modules, "torchvision", None)  # what an uninstalled package looks like
    raises_one_line(MissingDependencyError, "ModuleNotFoundError", build_model, "torchvision:resnet18")


def test_torchvision_built_for_another_torch_is_named_in_one_line() -> None:
    """The real installed torchvision, in a fresh process (no test shim): where its operators do not load
    beside this torch, the user reads the cause and a matching pair to install."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed")
    code = ("import importlib.metadata as m, torch\n"
            "from gprebn_edge.errors import MissingDependencyError\n"
            "from gprebn_edge.models.spec import build_model\n"
            "try:\n    build_model('torchvision:resnet18')\n"
            "except MissingDependencyError as e:\n    print('ERROR', e)\n"
            "else:\n    print('OK')\n"
            "print(m.version('torchvision'), torch.__version__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    lines = out.stdout.strip().splitlines()
    if lines[0] == "OK":
        pytest.skip("the installed torchvision is built for this torch: no mismatch to report")
    tv_version, torch_version = lines[-1].split()
    assert len(lines) == 2 and lines[0].startswith("ERROR ")
    assert f"torchvision {tv_version} was built for another torch than {torch_version}" in lines[0]
    assert "pip install torch==2.14.1 torchvision==0.29.1" in lines[0] and "[vision]" not in lines[0]


def test_import_does_not_pull_torchvision() -> None:
    code = "import sys, gprebn_edge.models.spec; assert 'torchvision' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

