"""device.shift: the detector on hand-built frames, and its defaults on the real built-in stream and model
(fires within one window after every change of the default stream, never on a long clean segment).

`OMP_NUM_THREADS=1 .venv/bin/python tests/device/test_shift.py` prints the margins the module docstring
quotes."""

import json
from functools import cache

import numpy as np
import pytest
import torch

from gprebn_edge.data.stream import DEFAULT_SEGMENTS, open_stream
from gprebn_edge.device.shift import ShiftConfig, ShiftDetector
from gprebn_edge.errors import InputError
from gprebn_edge.models.spec import load_model

# Every domain change of the default stream, with short segments so the test stays fast.
SHORT = 160
SHIFT_STREAM = "stream:" + ",".join(f"{seg.split('*')[0]}*{SHORT}" for seg in DEFAULT_SEGMENTS.split(","))
CLEAN_STREAM = "stream:clean*2000"


@cache
def served(spec: str) -> tuple[np.ndarray, np.ndarray, list]:
    """Images (N, 3, 32, 32) float32 as the model sees them, the built-in model's logits, and the
    stream's segments."""
    loaded = load_model("builtin:small_resnet")
    stream = open_stream(spec, loaded.preprocess)
    images = []
    logits = []
    with torch.inference_mode():
        for batch in stream.batches(256):
            images.append(batch.images)
            logits.append(loaded.model(torch.from_numpy(batch.images)).numpy())
    return np.concatenate(images), np.concatenate(logits), stream.segments()


def run(spec: str, config: ShiftConfig) -> tuple[list[tuple[int, str]], list[dict]]:
    """Serve a stream through a detector: the reference at the first full window and again one window into
    each new segment (as after a swap). Returns (frame, reason) of every firing and state() per frame."""
    images, logits, segments = served(spec)
    rearm = {s.start + config.window for s in segments}
    det = ShiftDetector(config)
    fired, states = [], []
    for i, (image, z) in enumerate(zip(images, logits, strict=True)):
        det.update(image, z)
        if i + 1 in rearm:
            det.set_reference()
        reason = det.check()
        if reason is not None:
            fired.append((i, reason))
        states.append(det.state())
    return fired, states


def frame(value: float = 0.0, pred: int = 0, margin: float = 2.0, rng=None) -> tuple[np.ndarray, np.ndarray]:
    rng = rng or np.random.default_rng(0)
    image = (value + 0.1 * rng.standard_normal((3, 4, 4))).astype(np.float32)
    logits = np.zeros(10, np.float32)
    logits[pred] = margin
    return image, logits


def test_check_waits_for_a_reference_and_a_full_window():
    det = ShiftDetector(ShiftConfig(window=4))
    for k in range(3):
        det.update(*frame(pred=k))
    assert det.check() is None and not det.full
    with pytest.raises(InputError, match="needs a full window: 3 of 4"):
        det.set_reference()
    det.update(*frame(pred=3))
    assert det.check() is None  # full, but no reference yet
    det.set_reference()
    assert det.check() is None
    state = det.state()
    assert state["input_move"] == 0.0 and state["frames"] == 4
    assert json.loads(json.dumps(state)) == state


def test_each_signal_fires_with_a_one_line_reason():
    rng = np.random.default_rng(1)
    det = ShiftDetector(ShiftConfig(window=8))
    for k in range(8):
        det.update(*frame(pred=k, rng=rng))
    det.set_reference()
    for _ in range(8):
        det.update(*frame(value=1.0, pred=0, rng=rng))  # brighter, and every prediction class 0
    reason = det.check()
    assert reason is not None and reason.startswith("input statistics moved") and "sigma (threshold 1.0)" in reason

    det = ShiftDetector(ShiftConfig(window=8))
    for k in range(8):
        det.update(*frame(pred=k % 4, rng=rng))
    det.set_reference()
    for k in range(8):
        det.update(*frame(pred=k % 4, margin=0.3, rng=rng))  # same inputs and classes, flatter outputs
    reason = det.check()
    assert reason is not None and reason.startswith("serving entropy moved") and "(threshold 0.1)" in reason
    det.set_reference()
    assert det.check() is None

    det = ShiftDetector(ShiftConfig(window=8))
    for k in range(8):
        det.update(*frame(pred=k, rng=rng))
    det.set_reference()
    for k in range(8):
        det.update(*frame(pred=k % 2, rng=rng))  # 8 classes -> 2, confidence unchanged
    assert det.check().startswith("prediction diversity moved 0.60 (threshold 0.2)")


def test_bad_frames_and_configs():
    det = ShiftDetector(ShiftConfig(window=2))
    with pytest.raises(InputError, match=r"\(C, H, W\) image"):
        det.update(np.zeros((4, 4)), np.zeros(10))
    det.update(*frame())
    with pytest.raises(InputError, match="one detector serves one model"):
        det.update(np.zeros((1, 4, 4)), np.zeros(10))
    image, logits = frame()
    logits[0] = np.nan
    det.update(image, logits)
    assert det.state()["skipped"] == 1 and det.state()["frames"] == 1
    for bad in ({"window": 1}, {"window": 2.5}, {"input_threshold": 0}, {"entropy_threshold": float("nan")},
                {"diversity_threshold": -1}):
        with pytest.raises(InputError, match="shift"):
            ShiftConfig(**bad)


def test_defaults_fire_within_one_window_after_every_change_of_the_builtin_stream():
    config = ShiftConfig()
    fired, _ = run(SHIFT_STREAM, config)
    _, _, segments = served(SHIFT_STREAM)
    assert len(segments) == len(DEFAULT_SEGMENTS.split(","))
    for prev, seg in zip(segments, segments[1:], strict=False):
        hits = [i for i, _ in fired if seg.start <= i < seg.start + config.window]
        assert hits, f"no trigger within {config.window} frames of {prev.name} -> {seg.name}"
    # nothing fires in the first segment, before any change
    assert not [i for i, _ in fired if i < segments[1].start]


def test_defaults_never_fire_on_a_long_stationary_clean_segment():
    fired, states = run(CLEAN_STREAM, ShiftConfig())
    assert len(states) == 2000 and fired == []


def test_a_batch_reference_catches_a_stream_that_moved_on_during_a_round():
    """After a swap the reference is the held-back frames the candidate was gated on (through it): frames of
    the same domain do not fire; a stream that has moved on (the round adapted on clean frames, fog came
    during the round) fires as soon as a window is full."""
    images, logits, segments = served(SHIFT_STREAM)
    clean, fog = segments[0], segments[1]
    det = ShiftDetector()
    det.set_reference_from(images[clean.start:clean.start + 48], logits[clean.start:clean.start + 48])
    for i in range(clean.start + 48, clean.start + 48 + 64):
        det.update(images[i], logits[i])
    assert det.check() is None
    det.reset()
    det.set_reference_from(images[fog.start - 48:fog.start], logits[fog.start - 48:fog.start])
    for i in range(fog.start, fog.start + 64):
        det.update(images[i], logits[i])
    assert det.check() is not None
    with pytest.raises(InputError, match="one detector serves one model"):
        det.set_reference_from(images[:4, :2], logits[:4])
    with pytest.raises(InputError, match="shift reference is"):
        det.set_reference_from(images[:4], logits[:3])


def _margins(seeds: range = range(5)) -> None:
    """Print the largest stationary moves and the smallest peak move after each change, per signal."""
    config = ShiftConfig()
    keys = ("input_move", "entropy_move", "diversity_move")
    for seed in seeds:
        _, states = run(f"stream:clean*2500:seed={seed}", config)
        quiet = {k: max(s[k] for s in states if s[k] is not None) for k in keys}
        print(f"clean*2500 seed={seed}: max " + ", ".join(f"{k} {v:.3f}" for k, v in quiet.items()))
        spec = f"{SHIFT_STREAM}:seed={seed}"
        fired, states = run(spec, config)
        segments = served(spec)[2]
        for prev, seg in zip(segments, segments[1:], strict=False):
            span = states[seg.start:seg.start + config.window]
            first = next(((i - seg.start, why) for i, why in fired if i >= seg.start), None)
            peak = ", ".join(f"{k} {max(s[k] for s in span):.3f}" for k in keys)
            print(f"  {prev.name:>16} -> {seg.name:<16} peak {peak}; first trigger {first}")


if __name__ == "__main__":
    _margins()
