"""The shifting stream: spec parsing, segment layout, temporal order, labels, equality with load_domain,
batches across segment boundaries, limit, and a torch-free import."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gprebn_edge.data.domains import load_domain
from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.stream import (
    DEFAULT_SEGMENTS,
    Segment,
    SegmentSpec,
    ShiftingStream,
    StreamBatch,
    open_stream,
    parse_stream,
    segment_seed,
)
from gprebn_edge.errors import InputError

PLAIN = Preprocess()
SMALL = "stream:clean*30,fog-5*25,gaussian_noise-2*20,clean*15:seed=4"


def gather(stream: ShiftingStream, batch_size: int) -> list[StreamBatch]:
    batches = list(stream.batches(batch_size))
    assert all(isinstance(b, StreamBatch) for b in batches)
    return batches  # type: ignore[return-value]


def test_default_spec_is_6000_frames_in_six_segments():
    plan = parse_stream("stream:default")
    assert plan == parse_stream("stream") == parse_stream("stream:DEFAULT")
    assert plan.total == 6000 and plan.split == "test" and plan.seed == 0
    assert [s.name for s in plan.segments] == ["clean", "fog-5", "gaussian_noise-5", "contrast-5", "shot_noise-5",
                                               "clean"]
    stream = open_stream("stream:default:seed=2", PLAIN)
    assert len(stream) == 6000
    assert stream.segments() == [Segment(s.name, 1000 * k, 1000 * (k + 1)) for k, s in enumerate(plan.segments)]
    assert parse_stream("stream:seed=2") == parse_stream(f"stream:{DEFAULT_SEGMENTS}:seed=2")


def test_parse_explicit_spec_and_canonical_form():
    plan = parse_stream("stream:clean*10,fog*20,contrast-3*5,style*7:split=calib:seed=9")
    assert plan.segments == (SegmentSpec("clean", None, 10), SegmentSpec("fog", 5, 20), SegmentSpec("contrast", 3, 5),
                             SegmentSpec("style", None, 7))
    assert (plan.split, plan.seed, plan.total) == ("calib", 9, 42)
    assert plan.canonical == "stream:clean*10,fog-5*20,contrast-3*5,style*7:seed=9:split=calib"
    assert parse_stream(plan.canonical) == plan


@pytest.mark.parametrize("spec, message", [
    ("stream:", "bad segment ''"),
    ("stream:clean", "DOMAIN[-SEVERITY]*FRAMES"),
    ("stream:clean*", "DOMAIN[-SEVERITY]*FRAMES"),
    ("stream:clean*ten", "DOMAIN[-SEVERITY]*FRAMES"),
    ("stream:*10", "DOMAIN[-SEVERITY]*FRAMES"),
    ("stream:clean*10,", "bad segment ''"),
    ("stream:fgo-5*10", "unknown domain 'fgo'"),
    ("stream:fog-6*10", "bad severity '6'"),
    ("stream:fog-*10", "bad severity ''"),
    ("stream:clean-3*10", "clean takes no severity"),
    ("stream:fog-5*0", "has 0 frames"),
    ("stream:fog-5*20001", "split a longer phase"),
    ("stream:fog-5*10:seed=-1", "non-negative integer"),
    ("stream:fog-5*10:seed=1:seed=2", "repeated key"),
    ("stream:fog-5*10:n=5", "unknown key"),
    ("stream:fog-5*10:split=holdout", "bad split 'holdout'"),
    ("stream:fog-5*10:extra", "unexpected part"),
    ("streams:fog-5*10", "not a stream spec"),
])
def test_bad_specs_are_one_line_input_errors(spec, message):
    with pytest.raises(InputError) as info:
        ShiftingStream(spec, PLAIN)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_order_is_deterministic_and_segments_match_load_domain():
    stream = open_stream(SMALL, PLAIN)
    assert stream.segments() == [Segment("clean", 0, 30), Segment("fog-5", 30, 55),
                                 Segment("gaussian_noise-2", 55, 75), Segment("clean", 75, 90)]
    batches = gather(stream, 16)  # 16 does not divide any boundary: batches straddle segments
    raw = np.concatenate([b.raw for b in batches])
    labels = np.concatenate([b.labels for b in batches])
    index = np.concatenate([b.index for b in batches])
    segment = np.concatenate([b.segment for b in batches])
    np.testing.assert_array_equal(index, np.arange(90))
    np.testing.assert_array_equal(segment, np.repeat([0, 1, 2, 3], [30, 25, 20, 15]))
    assert labels.dtype == np.int64 and set(labels) <= set(range(10)) and stream.has_labels
    for k, (domain, severity, (_, start, stop)) in enumerate(zip(["clean", "fog", "gaussian_noise", "clean"],
                                                                  [5, 5, 2, 5], stream.segments(), strict=True)):
        images, lab = load_domain(domain, severity, "test", stop - start, seed=segment_seed(4, k))
        np.testing.assert_array_equal(raw[start:stop], images)
        np.testing.assert_array_equal(labels[start:stop], lab)
    # the two clean segments draw different glyphs
    assert not np.array_equal(raw[:15], raw[75:90])
    # same spec, other batch size: the same frames in the same order
    again = gather(open_stream(SMALL, PLAIN), 90)
    assert len(again) == 1
    np.testing.assert_array_equal(again[0].raw, raw)
    np.testing.assert_allclose(again[0].images, PLAIN.normalize(raw))
    assert stream.fingerprint() == open_stream(SMALL, PLAIN).fingerprint()
    assert stream.fingerprint() != open_stream(SMALL.replace("seed=4", "seed=5"), PLAIN).fingerprint()


def test_segment_of_and_ids():
    stream = open_stream(SMALL, PLAIN)
    assert [stream.segment_of(i) for i in (0, 29, 30, 54, 55, 74, 75, 89)] == [0, 0, 1, 1, 2, 2, 3, 3]
    np.testing.assert_array_equal(stream.segment_ids(np.array([89, 0, 30])), [3, 0, 1])
    for bad in (-1, 90):
        with pytest.raises(IndexError):
            stream.segment_of(bad)
    with pytest.raises(IndexError):
        stream.segment_ids(np.array([0, 90]))


def test_limit_clips_segments_and_batches():
    stream = open_stream(SMALL, PLAIN, limit=40)
    assert len(stream) == 40
    assert stream.segments() == [Segment("clean", 0, 30), Segment("fog-5", 30, 40)]
    batches = gather(stream, 32)
    assert [len(b.labels) for b in batches] == [32, 8]
    np.testing.assert_array_equal(np.concatenate([b.segment for b in batches]), np.repeat([0, 1], [30, 10]))
    full = np.concatenate([b.raw for b in gather(open_stream(SMALL, PLAIN), 64)])
    np.testing.assert_array_equal(np.concatenate([b.raw for b in batches]), full[:40])
    described = stream.describe()
    assert described["kind"] == "stream" and described["count"] == 40
    assert described["segments"][1] == {"name": "fog-5", "start": 30, "stop": 40}
    assert described["canonical"] == "stream:clean*30,fog-5*25,gaussian_noise-2*20,clean*15:seed=4:split=test"
    with pytest.raises(InputError, match="--limit"):
        open_stream(SMALL, PLAIN, limit=0)


def test_preprocess_geometry_applies():
    stream = open_stream("stream:clean*3,fog-1*3", Preprocess(resize=40, crop=36))
    (batch,) = gather(stream, 8)
    assert batch.raw.shape == (6, 36, 36, 3) and batch.images.shape == (6, 3, 36, 36)


SCRIPT = textwrap.dedent("""
    import json, sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    from gprebn_edge.data.preprocess import Preprocess
    from gprebn_edge.data.stream import open_stream
    stream = open_stream("stream:clean*4,shot_noise-5*4", Preprocess())
    batch = next(iter(stream.batches(8)))
    print(json.dumps({"segment": batch.segment.tolist(),
                      "torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch" and sys.modules[m])}))
""")


def test_imports_and_runs_without_torch():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"segment": [0] * 4 + [1] * 4, "torch": []}
