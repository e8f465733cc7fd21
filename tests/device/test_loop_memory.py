"""The loop under --max-memory: rounds take the micro-batch a memory plan chooses, a budget too small for one
frame stops adapting with one line while serving goes on, and the process's peak memory is reported."""

import json

import numpy as np
import pytest
import torch

from gprebn_edge.device.loop import LoopConfig, run_loop
from gprebn_edge.device.readapt import input_shift
from gprebn_edge.device.report import read_log
from gprebn_edge.errors import InputError
from gprebn_edge.models.spec import load_model

STREAM = "stream:clean*150,gaussian_noise-5*250"


def _config(tmp_path, start, **kw):
    base = {"state": tmp_path / "state", "source": STREAM, "model": start, "every": 150, "buffer": 192,
            "min_frames": 96, "window": 100, "fps": 150.0, "shift": None}
    return LoopConfig(**{**base, **kw})


def test_rounds_take_the_micro_batch_the_budget_allows_and_the_peak_is_reported(tmp_path, start, monkeypatch):
    import gprebn_edge.budget as budget_module
    from gprebn_edge.budget import SLACK, footprint

    monkeypatch.setattr(budget_module, "current_rss", lambda: 100_000_000)  # the process, made deterministic
    model = load_model("builtin:small_resnet").model
    fp = footprint(model, (3, 32, 32), "gprebn")
    # room for the buffer, its stacked copy, and about 16 frames of a step: less than the batch of 64
    budget = 100_000_000 + 4 * fp.model + (2 * 192 + 3 * 64) * fp.image + int(SLACK * 16.5 * fp.step(True))
    result = run_loop(_config(tmp_path, start, max_memory=budget))
    assert result.frames == 400 and result.rounds >= 1 and not result.errors
    rounds = [r for r in read_log(result.log).records if r["event"] == "round"]
    plans = [r["memory_plan"] for r in rounds]  # planned before every round, on the process as it is then
    assert plans and all("of 64" in p for p in plans), plans
    micro = [int(p.split("micro-batch ")[1].split(" of ")[0]) for p in plans]
    assert all(1 <= m < 64 for m in micro), plans
    windows = [r for r in read_log(result.log).records if r["event"] == "window"]
    memory = [(w["rss_mb"], w["peak_rss_mb"]) for w in windows]
    assert memory and all(0 < now <= peak for now, peak in memory), memory
    assert result.peak_rss is not None and result.peak_rss >= windows[-1]["rss_mb"] * 1e6 * 0.99


def test_a_budget_too_small_for_one_frame_stops_adapting_in_one_line_and_serving_goes_on(tmp_path, start):
    notices: list[str] = []
    result = run_loop(_config(tmp_path, start, max_memory=1_000_000), on_notice=notices.append)
    assert result.frames == 400 and result.rounds == 0 and result.swaps == 0
    assert len(result.errors) == 1 and "\n" not in result.errors[0]
    assert "--max-memory 1.00 MB is too small for gprebn" in result.errors[0]
    assert result.errors[0].endswith("serving goes on without adapting") and "give at least" in result.errors[0]
    assert notices == result.errors  # said when it happened, not only at the end


def test_a_loop_budget_must_be_positive(tmp_path, start):
    with pytest.raises(InputError, match="--max-memory must be at least 1"):
        _config(tmp_path, start, max_memory=0)


def test_the_input_shift_is_the_same_in_chunks():
    torch.manual_seed(0)
    model = load_model("builtin:small_resnet").model.eval()
    frames = torch.rand(40, 3, 32, 32) * 2
    whole = input_shift(model, frames)
    assert whole > 0.1
    assert input_shift(model, frames, batch=7) == pytest.approx(whole, rel=1e-4)


def test_the_loop_command_takes_max_memory(tmp_path, start):
    from typer.testing import CliRunner

    from gprebn_edge.cli import app

    bad = CliRunner().invoke(app, ["loop", "--source", STREAM, "--state", str(tmp_path / "st"), "--model",
                                   str(start), "--max-memory", "lots"])
    assert bad.exit_code == 1 and "--max-memory must be a size such as 2GB" in bad.output
    assert len(bad.output.strip().splitlines()) == 1 and not (tmp_path / "st").exists()
    ok = CliRunner().invoke(app, ["loop", "--source", "stream:clean*120", "--state", str(tmp_path / "st"),
                                  "--model", str(start), "--max-memory", "8GB", "--frames", "120"])
    assert ok.exit_code == 0, ok.output
    assert "peak RSS" in ok.output
    assert np.isfinite(json.loads((tmp_path / "st" / "state.json").read_text())["frames"])
