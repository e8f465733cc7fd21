"""Session-wide test setup: torchvision's models usable beside the CPU torch (see
torchvision_beside_cpu_torch.py), done once before any test runs so that no test's outcome depends on
which tests ran before it."""

from torchvision_beside_cpu_torch import usable_torchvision


def pytest_configure(config):
    usable_torchvision()
