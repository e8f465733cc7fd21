from torch import nn


def make():
    return nn.Sequential(nn.Conv2d(3, 4, 3),
                         nn.BatchNorm2d(4, track_running_stats=False),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
