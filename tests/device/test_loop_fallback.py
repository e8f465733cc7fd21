"""The loop falls back to its start model when what serves answers far fewer classes than the unadapted
model and every candidate adapted from it fails (issue 21: a broken candidate that slipped through a small
slice served every later domain at chance)."""

import json

import numpy as np
from deadline import call_with_deadline

from gprebn_edge.checkpoint import load_checkpoint, save_checkpoint
from gprebn_edge.device.gates import GateConfig, GateResult, evaluate_gates, serving_worse
from gprebn_edge.device.loop import LoopConfig, run_loop
from gprebn_edge.device.report import read_log, summarize
from gprebn_edge.device.state import StateDir

STREAM = "stream:clean*1200"
TIMEOUT = 300.0  # seconds a loop may take before the test fails as a hang


def _run(config):
    return call_with_deadline(lambda: run_loop(config), TIMEOUT, "the loop")


def _config(tmp_path, start, **kw):
    base = {"state": tmp_path / "state", "source": STREAM, "model": start, "every": 150, "buffer": 192,
            "min_frames": 96, "window": 100, "fps": 150.0}
    return LoopConfig(**{**base, **kw})


def _broken_round(state_dir, start, round_id=50):
    """A round adapted into a corner: the last block's BN layers (what adapting changes) have zero scale, so
    it answers one class whatever it sees, and the candidates continued from it collapse too. The unadapted
    model, rebuilt from the checkpoint's source statistics, is healthy."""
    from gprebn_edge.export.pipeline import export_artifact

    tensors, meta = load_checkpoint(start)
    rng = np.random.default_rng(0)
    for bn in ("layers.2.0.bn2", "layers.2.0.shortcut.1"):
        tensors[f"{bn}.weight"] = tensors[f"{bn}.weight"] * 0.0
        tensors[f"{bn}.bias"] = tensors[f"{bn}.bias"] * 0.0 + float(rng.uniform(0.5, 1.0))
    ckpt = state_dir / f"round-{round_id:06d}.safetensors"
    save_checkpoint(ckpt, tensors, meta)
    export_artifact(ckpt, state_dir / f"round-{round_id:06d}.onnx", check_images=8)
    state = json.loads((state_dir / "state.json").read_text())
    state.update(round=round_id, checkpoint=ckpt.name, onnx=f"round-{round_id:06d}.onnx", engine=None,
                 rounds_tried=round_id)
    (state_dir / "state.json").write_text(json.dumps(state))


def test_a_broken_serving_model_falls_back_to_the_start(tmp_path, start):
    first = _run(_config(tmp_path, start, max_frames=100))
    assert first.frames == 100 and (tmp_path / "state" / "round-000000.onnx").is_file()
    _broken_round(tmp_path / "state", start)
    result = _run(_config(tmp_path, start))
    assert result.resumed and result.fallbacks == 1
    records = read_log(result.log).records
    fallback = next(r for r in records if r["event"] == "fallback")
    assert fallback["from_round"] == 50 and fallback["to_round"] == 0
    assert "less diverse than the unadapted one" in fallback["reason"]
    check = next(r for r in records if r["event"] == "fallback_check")
    assert check["passed"] and check["from_round"] == 50
    swaps = [r for r in records if r["event"] == "swap"]
    assert swaps[0]["round"] == 0 and swaps[0]["frames"] >= fallback["frames"]
    rejected = [r for r in records if r["event"] == "round" and r["frames"] <= fallback["frames"]]
    assert rejected and not any(r["passed"] for r in rejected)  # only a failed round looks at what serves
    summary = summarize(read_log(result.log))
    assert summary["served_only_passed"] and summary["fallbacks"] == 1, summary["violations"]
    # accuracy after the fallback is the start model's on clean frames, not the broken round's ~20 %
    windows = [r for r in records if r["event"] == "window" and r["frames"] > swaps[0]["frames"] + 100]
    assert sum(w["correct"] for w in windows) / sum(w["labeled"] for w in windows) > 0.9
    files = {p.name for p in (tmp_path / "state").iterdir()}
    assert "round-000050.onnx" not in files and "round-000000.onnx" in files


def test_the_start_files_are_kept_after_a_swap(tmp_path, start):
    result = _run(_config(tmp_path, start, source="stream:clean*200,gaussian_noise-5*300"))
    assert result.swaps >= 1
    state_dir = StateDir(tmp_path / "state")
    assert state_dir.start_state() is not None and state_dir.read().round >= 1
    assert state_dir.clean(state_dir.read()) == []  # neither the serving round nor the start is a stray


def _logits(pred, classes=10, sharp=5.0):
    out = np.zeros((len(pred), classes), dtype=np.float32)
    out[np.arange(len(pred)), pred] = sharp
    return out


def test_serving_worse_needs_both_diversity_checks_failing_against_a_healthy_source():
    rng = np.random.default_rng(0)
    diverse = rng.integers(0, 10, 128)
    few = np.where(diverse < 5, 0, 1)
    cand = _logits(diverse)
    broken: GateResult = evaluate_gates(cand, _logits(few), source_logits=_logits(diverse))
    assert "less diverse than the unadapted one" in (serving_worse(broken) or "")
    fine = evaluate_gates(cand, _logits(diverse), source_logits=_logits(diverse))
    assert serving_worse(fine) is None
    # a collapsed source is no evidence: the serving model may rightly disagree with it
    collapsed = evaluate_gates(cand, _logits(few), source_logits=_logits(np.zeros(128, dtype=int)))
    assert serving_worse(collapsed) is None
    assert serving_worse(evaluate_gates(cand, _logits(few))) is None  # no source model at all
    # failing one check only (7 classes, spread evenly: fewer distinct, as high a histogram entropy) is not "worse"
    seven = diverse % 7
    result = evaluate_gates(cand, _logits(seven), source_logits=_logits(diverse))
    assert serving_worse(result, GateConfig()) is None
    assert serving_worse(result, GateConfig(min_class_entropy=0.95)) is not None  # with a stricter floor it is


def test_no_fallback_without_the_start_files(tmp_path, start):
    """A state folder cleaned by a version that did not keep round 0: the broken round keeps serving, the
    loop neither fails nor pretends it fell back."""
    first = _run(_config(tmp_path, start, max_frames=100))
    assert first.frames == 100
    _broken_round(tmp_path / "state", start)
    for f in (tmp_path / "state").glob("round-000000.*"):
        f.unlink()
    result = _run(_config(tmp_path, start, max_frames=700))
    assert result.resumed and result.fallbacks == 0 and not result.errors and result.served_round == 50
    records = read_log(result.log).records
    assert any(r["event"] == "round" and not r["passed"] for r in records)
    assert not any(r["event"] in ("fallback", "fallback_check") for r in records)
