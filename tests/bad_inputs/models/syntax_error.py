from torch import nn

break  # noqa: F701


def make():
    return nn.BatchNorm2d(3)
