"""int8 calibration for the TensorRT build: calibration images re-cut into batches of the profile's `opt`
rows, uploaded to the GPU for TensorRT's entropy calibrator, and the calibration cache file."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gprebn_edge.errors import InputError
from gprebn_edge.io import atomic_path
from gprebn_edge.runtime.cuda_memory import DeviceMemory, device_memory

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = ["CalibrationFeed", "entropy_calibrator", "rechunk_batches"]


def rechunk_batches(batches: Iterable[np.ndarray], size: int, *, drop_last: bool = True) -> Iterator[np.ndarray]:
    """Re-cut batches of any sizes into C-contiguous float32 batches of exactly `size` rows, in order. The
    remainder (< size rows) is dropped, or yielded as a last, smaller batch when not `drop_last`."""
    if size < 1:
        raise InputError(f"batch size must be >= 1, got {size}")
    pending: list[np.ndarray] = []
    count = 0
    item_shape: tuple[int, ...] | None = None
    for batch in batches:
        batch = np.asarray(batch)
        if batch.ndim < 1 or not np.issubdtype(batch.dtype, np.floating):
            raise InputError(f"calibration batches must be float arrays (N, C, H, W), got {batch.dtype} "
                             f"{batch.shape}")
        if item_shape is None:
            item_shape = batch.shape[1:]
        elif batch.shape[1:] != item_shape:
            raise InputError(f"calibration batches differ in shape: {batch.shape[1:]} after {item_shape}")
        pending.append(batch)
        count += len(batch)
        while count >= size:
            joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
            yield np.ascontiguousarray(joined[:size], dtype=np.float32)
            pending, count = ([joined[size:]] if count > size else []), count - size
    if count and not drop_last:
        yield np.ascontiguousarray(np.concatenate(pending), dtype=np.float32)


class CalibrationFeed:
    """The Python side of the calibrator: batches to device pointers, the calibration cache file. Exceptions
    (Ctrl-C included) cannot cross TensorRT's C++ callbacks: they go to `failures`, for the builder to raise."""

    def __init__(self, batches: Iterator[np.ndarray], item_shape: tuple[int, ...], cache: Path | None,
                 failures: list[BaseException]) -> None:
        self.batches, self.item_shape, self.cache, self.failures = batches, item_shape, cache, failures
        self.used = 0
        self.memory: DeviceMemory | None = None
        self.ptr = 0

    def next_pointers(self) -> list[int]:
        try:
            batch = next(self.batches, None)
            if batch is None or self.failures:
                return []  # the end of calibration
            if batch.shape[1:] != self.item_shape:
                raise InputError(f"calibration images are {batch.shape[1:]}, the network input is {self.item_shape}")
            if self.memory is None:  # every batch has `opt` rows: one buffer serves them all
                self.memory = device_memory(purpose="int8 calibration runs")
                self.ptr = self.memory.alloc(batch.nbytes)
            self.memory.h2d(self.ptr, batch)
            self.memory.sync()  # TensorRT reads it on its own stream
            self.used += 1
            return [self.ptr]
        except BaseException as e:
            self.failures.append(e)
            return []

    def read_cache(self) -> bytes | None:
        return self.cache.read_bytes() if self.cache is not None and self.cache.is_file() else None

    def write_cache(self, data: bytes) -> None:
        try:
            if self.cache is not None:
                with atomic_path(self.cache) as tmp:
                    tmp.write_bytes(data)
        except BaseException as e:
            self.failures.append(e)

    def close(self) -> None:
        if self.memory is not None:
            self.memory.close()
            self.memory = None


def entropy_calibrator(feed: CalibrationFeed, size: int) -> trt.IInt8EntropyCalibrator2:
    import tensorrt as trt

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)  # the trampoline needs the explicit base __init__

        def get_batch_size(self) -> int:
            return size

        def get_batch(self, names: list[str]) -> list[int]:
            return feed.next_pointers()

        def read_calibration_cache(self) -> bytes | None:  # None: no cache, calibrate
            return feed.read_cache()

        def write_calibration_cache(self, cache: Any) -> None:
            feed.write_cache(bytes(cache))

    return EntropyCalibrator()
