"""(Re)create the bad-input corpus in this folder, deterministically: `python tests/bad_inputs/make_corpus.py`.

ENTRIES lists every committed bad input and what is wrong with it; tests/test_bad_inputs.py runs each through
the commands that read it. Cases that cannot be committed (unreadable permissions, a disk that fills up,
Ctrl-C, a truncated copy of a freshly adapted artifact) are made inside the tests.

The pickled "weights" carry a payload that, if anything ever unpickled them, would touch the file named by
$GPREBN_BAD_INPUTS_MARKER (and do nothing when it is unset): the tests set it and check the file never
appears."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
GROUPS = ("images", "folders", "arrays", "models", "weights", "artifacts", "onnx", "engines", "logs", "misc")

ENTRIES: dict[str, str] = {
    # single images (inside a folder: skipped and counted; see folders/)
    "images/truncated.jpg": "a JPEG cut in half",
    "images/truncated.png": "a PNG cut in half",
    "images/random_bytes.png": "random bytes named .png",
    "images/zero_bytes.jpg": "a zero-byte .jpg",
    "images/text.jpg": "a text file named .jpg",
    "images/bad_crc.png": "a PNG whose image data was overwritten (CRC and zlib stream broken)",
    "images/bomb.png": "a 15000x15000 PNG of a few KB (Pillow's decompression-bomb limit)",
    "images/tiny_1x1.png": "a 1x1 image, among 32x32 ones",
    # folders given as --data
    "folders/empty": "an empty folder (only a hidden .gitkeep)",
    "folders/all_corrupt": "a folder holding only corrupt images",
    "folders/some_corrupt": "20 good images and 2 corrupt ones (a counted skip)",
    "folders/too_many_corrupt": "6 good images and 4 corrupt ones (over the 10 % limit)",
    "folders/modes": "grayscale, gray+alpha, RGBA, 1-bit, palette, palette+transparency, 16-bit gray, "
                     "16-bit RGB, float TIFF and CMYK JPEG images (converted to RGB)",
    "folders/mixed_sizes": "32x32 images with a 1x1 and a 64x48 one",
    "folders/mixed_layout": "class subfolders and a loose image side by side",
    # arrays given as --data
    "arrays/nan.npy": "float images with a NaN",
    "arrays/inf.npy": "float images with an Inf",
    "arrays/object.npy": "an object array holding a pickled payload",
    "arrays/object_in.npz": "an .npz whose 'images' is an object array holding a pickled payload",
    "arrays/wrong_rank.npy": "a 2-D array",
    "arrays/five_d.npy": "a 5-D array",
    "arrays/one_image.npy": "one HxWxC image instead of a batch",
    "arrays/five_channels.npy": "images with 5 channels",
    "arrays/float_0_255.npy": "float images in 0..255 instead of [0, 1]",
    "arrays/empty.npy": "zero images",
    "arrays/complex.npy": "a complex-valued array",
    "arrays/truncated.npy": "a .npy file cut short",
    "arrays/no_images.npz": "an .npz with arrays 'a' and 'b' but no 'images'",
    "arrays/labels_mismatch.npz": "4 images and 3 labels",
    "arrays/negative_labels.npz": "negative class labels",
    "arrays/not_zip.npz": "text named .npz (not a zip archive)",
    "arrays/random_bytes.npy": "random bytes named .npy (not 'Python objects')",
    "arrays/bad_header.npy": "a .npy whose header is cut short",
    "arrays/huge_declared.npz": "an .npz whose 'images' declares a shape needing petabytes",
    "arrays/huge_declared.npy": "a .npy declaring a shape needing petabytes, holding 100 bytes",
    # model factories given as --model FILE.py:make
    "models/no_bn.py": "a model without BatchNorm",
    "models/no_running_stats.py": "a BatchNorm with track_running_stats=False",
    "models/untraceable.py": "a data-dependent branch torch.fx cannot trace (exported via ONNX folding)",
    "models/syntax_error.py": "a factory file with a syntax error",
    "models/raises.py": "a factory that raises",
    "models/not_module.py": "a factory returning a dict, not an nn.Module",
    "models/bad_output.py": "a model whose output is 4-D, not (N, classes)",
    # weights given as --weights (for models/net.py:make)
    "weights/pickled_object.pt": "torch.save of an arbitrary object whose unpickling runs code",
    "weights/pickled_object.pkl": "plain pickle of the same object",
    "weights/other_model.pt": "the state dict of a different model",
    "weights/wrong_shapes.safetensors": "the right names with the wrong shapes (5 classes, not 3)",
    "weights/random_bytes.pt": "random bytes named .pt",
    "weights/zero_bytes.safetensors": "a zero-byte .safetensors",
    "weights/truncated.safetensors": "a safetensors file cut short",
    "weights/non_tensor_values.pt": "a dict of ints, not tensors",
    "weights/empty_state_dict.pt": "an empty dict",
    "weights/nan.safetensors": "the right state dict for net.py with NaN in a conv weight",
    # artifacts given to info / export / bench (.safetensors)
    "artifacts/plain.safetensors": "a safetensors file with no gprebn-edge metadata",
    "artifacts/random_bytes.safetensors": "random bytes named .safetensors",
    "artifacts/bad_json.safetensors": "gprebn-edge metadata that is not JSON",
    "artifacts/meta_not_object.safetensors": "gprebn-edge metadata that is a JSON list",
    "artifacts/wrong_format.safetensors": "metadata of another format",
    "artifacts/future_version.safetensors": "metadata of a newer format version",
    "artifacts/missing_fields.safetensors": "gprebn-edge metadata with the format and nothing else",
    "artifacts/preprocess_string.safetensors": "preprocess metadata that is a string",
    "artifacts/mean_wrong.safetensors": "preprocess.mean of 2 values, one a string",
    "artifacts/mean_nan.safetensors": "preprocess.mean holding NaN (JSON's non-standard NaN)",
    "artifacts/summary_list.safetensors": "summary metadata that is a list",
    "artifacts/calibration_number.safetensors": "calibration metadata that is a number",
    "artifacts/num_classes_string.safetensors": "num_classes metadata that is a string",
    "artifacts/source_bn_garbage.safetensors": "source-BN tensors whose base64 is garbage",
    "artifacts/source_bn_huge.safetensors": "a source-BN tensor declaring a shape needing petabytes",
    # ONNX files given to bench / compare
    "onnx/random_bytes.onnx": "random bytes named .onnx",
    "onnx/zero_bytes.onnx": "a zero-byte .onnx",
    "onnx/truncated.onnx": "a real ONNX model cut in half",
    "onnx/other_classes.onnx": "a model with 5 classes (the built-in one has 10)",
    "onnx/other_input.onnx": "a model with a fixed 3x48x48 input (the built-in one takes 32x32)",
    "onnx/other_preprocess.onnx": "a model recording other preprocessing",
    "onnx/two_inputs.onnx": "a model with two inputs",
    "onnx/external_outside.onnx": "initializer data in an external file outside the model's folder",
    "onnx/external_missing.onnx": "initializer data in an external file that is not there",
    "onnx/preprocess_list.onnx": "preprocess metadata that is a JSON list",
    "onnx/dynamic_size.onnx": "an input whose height and width are only known at run time",
    # TensorRT engines
    "engines/foreign.engine": "an 'engine' from another TensorRT version (here: bytes no TensorRT can read)",
    # loop metrics logs given to loop-report
    "logs/random_bytes.jsonl": "random bytes as a metrics log",
    "logs/empty.jsonl": "an empty metrics log",
    "logs/corrupt_middle.jsonl": "a metrics log with a garbled line between two good ones",
    "logs/not_records.jsonl": "JSON lines that are arrays, not loop records",
    # other
    "misc/model.bin": "a model file with an unknown suffix",
}

PAYLOAD_ENV = "GPREBN_BAD_INPUTS_MARKER"
_PAYLOAD_CODE = ("(lambda p: p and __import__('pathlib').Path(p).touch())"
                 f"(__import__('os').environ.get('{PAYLOAD_ENV}'))")

_BUILTIN_PREPROCESS = {"resize": None, "crop": None, "mean": [0.5] * 3, "std": [0.25] * 3}

NET = '''"""A small BatchNorm classifier (3 classes): the model the weights/ entries are meant for."""
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def make(num_classes=3):
    return Net(num_classes)
'''

MODELS = {
    "net.py": NET,
    "no_bn.py": "from torch import nn\n\n\ndef make():\n"
                "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
                "                         nn.Linear(4, 3))\n",
    "no_running_stats.py": "from torch import nn\n\n\ndef make():\n"
                           "    return nn.Sequential(nn.Conv2d(3, 4, 3),\n"
                           "                         nn.BatchNorm2d(4, track_running_stats=False),\n"
                           "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))\n",
    "untraceable.py": '''import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        if x.mean() > -100:  # data-dependent: torch.fx cannot trace this
            x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean((2, 3)))


def make():
    return Net()
''',
    # a SyntaxError Python raises on import ('break' outside a loop) that linters can still parse
    "syntax_error.py": "from torch import nn\n\nbreak  # noqa: F701\n\n\ndef make():\n    return nn.BatchNorm2d(3)\n",
    "raises.py": "def make():\n    raise RuntimeError('the factory cannot find its config file')\n",
    "not_module.py": "def make():\n    return {'conv': 1, 'bn': 2}\n",
    "bad_output.py": "from torch import nn\n\n\ndef make():\n"
                     "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))  # (N, 4, H, W): no classifier\n",
}


class Payload:
    """Unpickling this runs code (it touches $GPREBN_BAD_INPUTS_MARKER): what a hostile weights file does."""

    def __reduce__(self):
        return eval, (_PAYLOAD_CODE,)


def _png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _picture(seed: int, size: tuple[int, int] = (32, 32)) -> Image.Image:
    """A smooth RGB picture (compresses well): a gradient with a seeded offset per channel."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    a, b, c = rng.integers(0, 255, 3)
    arr = np.stack([(x * 7 + a) % 256, (y * 5 + b) % 256, ((x + y) * 3 + c) % 256], axis=-1)
    return Image.fromarray(arr.astype(np.uint8))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_raw(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB or a huge image cheaply)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(rows, 9))
            + _png_chunk(b"IEND", b""))


def _images(rng: np.random.Generator) -> dict[str, bytes]:
    jpeg, png = _jpeg_bytes(_picture(1)), _png_bytes(_picture(2))
    bad_crc = bytearray(_png_bytes(_picture(3)))
    idat = bad_crc.index(b"IDAT")
    bad_crc[idat + 20: idat + 60] = bytes(40)
    bomb_rows = (b"\x00" + bytes(15000 // 8)) * 15000  # 1-bit, all black: 28 MB raw, a few KB compressed
    return {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "random_bytes.png": rng.bytes(600),
        "zero_bytes.jpg": b"",
        "text.jpg": b"<html><body>404 Not Found</body></html>\n",
        "bad_crc.png": bytes(bad_crc),
        "bomb.png": _png_raw(15000, 15000, 1, 0, bomb_rows),
        "tiny_1x1.png": _png_bytes(Image.new("RGB", (1, 1), (200, 30, 30))),
    }


def _modes() -> dict[str, bytes]:
    base = _picture(4)
    gray16 = (np.asarray(base.convert("L"), np.uint16) * 257).astype(np.uint16)
    rgb16 = np.asarray(_picture(5), np.uint16) * 257
    rows16 = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)
    palette_t = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    float_tiff = io.BytesIO()
    Image.fromarray(np.asarray(base.convert("L"), np.float32) / 255.0).save(float_tiff, format="TIFF")
    cmyk = io.BytesIO()
    base.convert("CMYK").save(cmyk, format="JPEG", quality=90)
    return {
        "gray.png": _png_bytes(base.convert("L")),
        "gray_alpha.png": _png_bytes(base.convert("LA")),
        "rgba.png": _png_bytes(base.convert("RGBA")),
        "one_bit.png": _png_bytes(base.convert("1")),
        "palette.png": _png_bytes(base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)),
        "palette_transparency.png": _png_bytes(palette_t, transparency=0),
        "gray16.png": _png_bytes(Image.fromarray(gray16)),
        "rgb16.png": _png_raw(32, 32, 16, 2, rows16),
        "float.tiff": float_tiff.getvalue(),
        "cmyk.jpg": cmyk.getvalue(),
    }


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _arrays(rng: np.random.Generator) -> dict[str, bytes]:
    good = rng.random((4, 8, 8, 3)).astype(np.float32)
    nan, inf = good.copy(), good.copy()
    nan[1, 2, 3, 0] = np.nan
    inf[2, 0, 0, 1] = np.inf
    payload = np.empty(2, dtype=object)
    payload[0], payload[1] = Payload(), "images"
    u8 = (good * 255).astype(np.uint8)
    full = _npy(u8)
    return {
        "nan.npy": _npy(nan),
        "inf.npy": _npy(inf),
        "object.npy": _npy(payload),
        "object_in.npz": _npz(images=payload),
        "wrong_rank.npy": _npy(u8.reshape(4, -1)),
        "five_d.npy": _npy(u8[None]),
        "one_image.npy": _npy(u8[0]),
        "five_channels.npy": _npy(np.concatenate([u8, u8[..., :2]], axis=-1)),
        "float_0_255.npy": _npy(good * 255),
        "empty.npy": _npy(u8[:0]),
        "complex.npy": _npy(good.astype(np.complex64)),
        "truncated.npy": full[: len(full) // 2],
        "no_images.npz": _npz(a=u8, b=u8),
        "labels_mismatch.npz": _npz(images=u8, labels=np.arange(3)),
        "negative_labels.npz": _npz(images=u8, labels=np.array([0, 1, -1, 2])),
        "not_zip.npz": b"images, labels\n1, 2\n" * 8,
        "random_bytes.npy": np.random.default_rng(12).bytes(300),
        "bad_header.npy": full[:40],
        "huge_declared.npz": _zip({"images.npy": _npy_header((10**9, 1000, 1000, 3)) + bytes(100)}),
        "huge_declared.npy": _npy_header((10**9, 1000, 1000, 3)) + bytes(100),
    }


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """A .npy version 1.0 header for uint8 data of `shape` (the data itself is whatever follows)."""
    header = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * (127 - 10 - len(header)) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()


def _zip(members: dict[str, bytes]) -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            z.writestr(info, data, zipfile.ZIP_DEFLATED)
    return buf.getvalue()


def _weights() -> dict[str, bytes]:
    import torch
    from safetensors.torch import save

    ns: dict = {}
    exec(NET, ns)
    torch.manual_seed(0)
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))

    def saved(obj: object) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    good = save(ns["make"]().state_dict())
    return {
        "pickled_object.pt": saved(Payload()),
        "pickled_object.pkl": pickle.dumps(Payload(), protocol=2),
        "other_model.pt": saved(other.state_dict()),
        "wrong_shapes.safetensors": save(ns["make"](num_classes=5).state_dict()),
        "random_bytes.pt": np.random.default_rng(7).bytes(700),
        "zero_bytes.safetensors": b"",
        "truncated.safetensors": good[: len(good) // 2],
        "non_tensor_values.pt": saved({"conv.weight": 1, "conv.bias": 2}),
        "empty_state_dict.pt": saved({}),
        "nan.safetensors": save({k: (v.clone().fill_(float("nan")) if k == "body.0.weight" else v)
                                 for k, v in ns["make"]().state_dict().items()}),
    }


def _artifacts() -> dict[str, bytes]:
    import torch
    from safetensors.torch import save

    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    meta = {"format": "gprebn-edge/adapted-checkpoint", "format_version": 1}
    return {
        "plain.safetensors": save(state),
        "random_bytes.safetensors": np.random.default_rng(8).bytes(500),
        "bad_json.safetensors": save(state, metadata={"gprebn_edge": "{format: adapted"}),
        "meta_not_object.safetensors": save(state, metadata={"gprebn_edge": "[1, 2, 3]"}),
        "wrong_format.safetensors": save(state, metadata={"gprebn_edge": json.dumps({**meta, "format": "other"})}),
        "future_version.safetensors": save(state, metadata={"gprebn_edge": json.dumps({**meta,
                                                                                     "format_version": 99})}),
        "missing_fields.safetensors": save(state, metadata={"gprebn_edge": json.dumps(meta)}),
        **{f"{name}.safetensors": save(state, metadata={"gprebn_edge": json.dumps({**_FULL, **fields})})
           for name, fields in _BAD_FIELDS.items()},
    }


_FULL = {"format": "gprebn-edge/adapted-checkpoint", "format_version": 1, "model": {"spec": "builtin:small_resnet"},
         "num_classes": 10, "preprocess": _BUILTIN_PREPROCESS, "method": {"seed": 0},
         "calibration": {"spec": "synthetic:fog:5:n=16", "fingerprint": "sha256:0"},
         "summary": {"images": 16}, "created": "2026-01-01T00:00:00Z", "gprebn_edge_version": "0.1.0"}
_BN = {"dtype": "float32", "shape": [2], "data": "AAAAAAAAgD8="}  # [0.0, 1.0]
_BAD_FIELDS: dict[str, dict] = {
    "preprocess_string": {"preprocess": "imagenet"},
    "mean_wrong": {"preprocess": {**_BUILTIN_PREPROCESS, "mean": [0.5, "x"]}},
    "mean_nan": {"preprocess": {**_BUILTIN_PREPROCESS, "mean": [float("nan"), 0.5, 0.5]}},
    "summary_list": {"summary": [1, 2]},
    "calibration_number": {"calibration": 5},
    "num_classes_string": {"num_classes": "ten"},
    "source_bn_garbage": {"source_bn": {"bn1.running_mean": {**_BN, "data": "!!not base64!!"}}},
    "source_bn_huge": {"source_bn": {"bn1.running_mean": {**_BN, "shape": [10**9, 10**9]}}},
}


def _onnx_classifier(classes: int, size: int | str, preprocess: dict | list | None, inputs: int = 1) -> bytes:
    """GlobalAveragePool -> Flatten -> Gemm: a tiny valid classifier with our input/output names."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dims = ["batch", 3, size, size]
    names = ["input"] + [f"input{i}" for i in range(1, inputs)]
    graph_inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in names]
    w = numpy_helper.from_array(np.linspace(-1, 1, classes * 3, dtype=np.float32).reshape(classes, 3), "fc.weight")
    b = numpy_helper.from_array(np.zeros(classes, np.float32), "fc.bias")
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], transB=1)]
    if inputs > 1:
        nodes[0] = helper.make_node("Add", ["input", "input1"], ["summed"])
        nodes.insert(1, helper.make_node("GlobalAveragePool", ["summed"], ["pooled"]))
    graph = helper.make_graph(nodes, "tiny", graph_inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
                              initializer=[w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="make_corpus")
    model.ir_version = 8
    meta = {"model": "adapted", "num_classes": str(classes)}
    if isinstance(size, str):
        model.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "width"
    if preprocess is not None:
        meta["preprocess"] = json.dumps(preprocess)
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    if isinstance(size, int):
        onnx.checker.check_model(model)
    return model.SerializeToString()


def _onnx() -> dict[str, bytes]:
    real = _onnx_classifier(10, 32, _BUILTIN_PREPROCESS)
    return {
        "random_bytes.onnx": np.random.default_rng(9).bytes(900),
        "zero_bytes.onnx": b"",
        "truncated.onnx": real[: len(real) // 2],
        "other_classes.onnx": _onnx_classifier(5, 32, _BUILTIN_PREPROCESS),
        "other_input.onnx": _onnx_classifier(10, 48, _BUILTIN_PREPROCESS),
        "other_preprocess.onnx": _onnx_classifier(10, 32, {**_BUILTIN_PREPROCESS, "resize": 40, "crop": 32}),
        "two_inputs.onnx": _onnx_classifier(10, 32, _BUILTIN_PREPROCESS, inputs=2),
        "external_outside.onnx": _external(real, "../../../../outside/weights.data"),
        "external_missing.onnx": _external(real, "missing.onnx.data"),
        "preprocess_list.onnx": _onnx_classifier(10, 32, [1, 2]),
        "dynamic_size.onnx": _onnx_classifier(10, "size", _BUILTIN_PREPROCESS),
    }


def _external(model_bytes: bytes, location: str) -> bytes:
    """The model with its fc.weight moved to external data at `location` (not written: the file is absent)."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    weight = next(t for t in model.graph.initializer if t.name == "fc.weight")
    weight.ClearField("float_data")
    weight.raw_data = b""
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "120")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    return model.SerializeToString()


def build() -> dict[str, bytes]:
    """Every file of the corpus: relative path -> bytes."""
    rng = np.random.default_rng(0)
    files = {f"images/{k}": v for k, v in _images(rng).items()}
    files["folders/empty/.gitkeep"] = b""
    corrupt = {"random.png": rng.bytes(300), "truncated.jpg": files["images/truncated.jpg"],
               "zero.jpg": b"", "text.png": files["images/text.jpg"]}
    files.update({f"folders/all_corrupt/{k}": v for k, v in corrupt.items()})
    files.update({f"folders/some_corrupt/good_{i:02d}.png": _png_bytes(_picture(100 + i)) for i in range(20)})
    files.update({"folders/some_corrupt/bad_random.png": rng.bytes(300),
                  "folders/some_corrupt/bad_truncated.png": files["images/truncated.png"]})
    files.update({f"folders/too_many_corrupt/good_{i}.png": _png_bytes(_picture(200 + i)) for i in range(6)})
    files.update({f"folders/too_many_corrupt/bad_{k}": v for k, v in corrupt.items()})
    files.update({f"folders/modes/{k}": v for k, v in _modes().items()})
    files.update({f"folders/mixed_sizes/good_{i}.png": _png_bytes(_picture(300 + i)) for i in range(4)})
    files["folders/mixed_sizes/tiny_1x1.png"] = files["images/tiny_1x1.png"]
    files["folders/mixed_sizes/wide_64x48.png"] = _png_bytes(_picture(310, (64, 48)))
    files.update({"folders/mixed_layout/cat/a.png": _png_bytes(_picture(400)),
                  "folders/mixed_layout/dog/b.png": _png_bytes(_picture(401)),
                  "folders/mixed_layout/loose.png": _png_bytes(_picture(402))})
    files.update({f"arrays/{k}": v for k, v in _arrays(rng).items()})
    files.update({f"models/{k}": v.encode() for k, v in MODELS.items()})
    files.update({f"weights/{k}": v for k, v in _weights().items()})
    files.update({f"artifacts/{k}": v for k, v in _artifacts().items()})
    files.update({f"onnx/{k}": v for k, v in _onnx().items()})
    files["engines/foreign.engine"] = b"ftrt" + np.random.default_rng(10).bytes(1000)
    start = b'{"event": "start", "t": 1.0, "resumed": false, "round": 0, "frames": 0}\n'
    files.update({"logs/random_bytes.jsonl": np.random.default_rng(11).bytes(300), "logs/empty.jsonl": b"",
                  "logs/corrupt_middle.jsonl": start + b'{"event": "win\n{"event": "stop", "t": 2.0}\n',
                  "logs/not_records.jsonl": b"[1, 2]\n[3]\n"})
    files["misc/model.bin"] = b"\x00" * 64
    return files


def write(root: Path = HERE) -> int:
    """Write the corpus under root (group folders are replaced); returns the total size in bytes."""
    files = build()
    for group in GROUPS:
        shutil.rmtree(root / group, ignore_errors=True)
    for rel, data in sorted(files.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    missing = [e for e in ENTRIES if not (root / e).exists()]
    assert not missing, missing
    return sum(len(v) for v in files.values())


if __name__ == "__main__":
    total = write(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
    print(f"{len(ENTRIES)} entries, {total / 1024:.0f} KiB")
