"""The adapt stage as a library: adapt_model's artifact contents, input probing, evaluation."""

import numpy as np
import pytest
import torch
from torch import nn

from gprebn_edge.adaptation import AdaptConfig, adapt_model, evaluate, probe, statistics_shift
from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.sources import open_source
from gprebn_edge.errors import InputError
from gprebn_edge.models.spec import batchnorm_layers, load_model


@pytest.fixture(scope="module")
def loaded():
    return load_model("builtin:small_resnet")


def test_adapt_model_metadata_and_state(loaded):
    source = open_source("synthetic:gaussian_noise:5:n=128", loaded.preprocess)
    result = adapt_model(loaded, source, AdaptConfig(batch_size=32))
    meta = result.metadata
    assert set(result.model.state_dict()) == set(loaded.model.state_dict())
    assert meta["method"]["method"] == "gprebn" and meta["method"]["freeze"] == "refresh"
    assert meta["method"]["stats"]["momentum"] == "cumulative"
    assert meta["num_classes"] == 10
    assert len(meta["statistics_shift"]) == len(batchnorm_layers(loaded.model))
    assert meta["calibration"]["count"] == 128 and meta["calibration"]["fingerprint"].startswith("sha256:")
    assert len(meta["source_bn"]) == 5 * len(batchnorm_layers(loaded.model))  # weight, bias, mean, var, count
    s = result.summary
    # 16 of the 128 images are held back for the health check (at least 16 are), never adapted on
    assert s["held_back"] == 16 and meta["calibration"]["held_back"] == 16
    assert s["images"] == 112 and s["steps"] == 4
    assert s["health"]["images"] == 16 and s["health"]["verdict"] == "ok"
    assert s["health"]["after"]["classes_predicted"] > s["health"]["before"]["classes_predicted"]
    # on heavy noise the source model is wrong most of the time and adaptation helps a lot
    assert s["calibration_before"]["error"] > 0.5
    assert s["calibration_after"]["error"] < 0.6 * s["calibration_before"]["error"]
    # (entropy is not asserted: the source model is confidently wrong on noise, 0.49 nats, the adapted one
    # less confident and far more often right)
    assert s["calibration_after"]["entropy"] > 0
    # noise moves the statistics several times further than clean data from the source domain does
    clean = adapt_model(loaded, open_source("synthetic:clean:n=128", loaded.preprocess), AdaptConfig(batch_size=32))

    def moved(rows):
        return sum(r["mean_shift"] + abs(np.log(r["std_ratio"])) for r in rows)

    assert meta["statistics_shift"][0]["layer"] == "bn1"
    assert moved(meta["statistics_shift"]) > 3 * moved(clean.metadata["statistics_shift"])


def test_statistics_shift_is_zero_for_the_same_model(loaded):
    rows = statistics_shift(loaded.model, loaded.model)
    assert all(r["mean_shift"] == 0 and r["std_ratio"] == pytest.approx(1) for r in rows)


def test_evaluate_respects_limit(loaded):
    source = open_source("synthetic:clean:n=100", loaded.preprocess)
    r = evaluate(loaded.model, source, limit=30, batch_size=16)
    assert r["images"] == 30 and r["error"] < 0.1


def test_probe_names_the_fix_for_a_wrong_input_size(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 32 * 32, 3))
    np.save(tmp_path / "x.npy", np.zeros((4, 40, 40, 3), np.uint8))
    source = open_source(str(tmp_path / "x.npy"), Preprocess())
    with pytest.raises(InputError, match="--resize/--crop"):
        probe(model.eval(), source, "net.py:make")
    fits = open_source(str(tmp_path / "x.npy"), Preprocess(resize=32, crop=32))
    assert probe(model.eval(), fits, "net.py:make") == 3


def test_probe_rejects_non_logit_outputs(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 8, 8, 3), np.uint8))
    source = open_source(str(tmp_path / "x.npy"), Preprocess())
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(InputError, match=r"\(N, classes\)"):
        probe(model, source, "m")


def test_adaptation_is_deterministic(loaded):
    source = open_source("synthetic:fog:5:n=64", loaded.preprocess)
    a = adapt_model(loaded, source, AdaptConfig(batch_size=16)).model.state_dict()
    b = adapt_model(loaded, source, AdaptConfig(batch_size=16)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _mlp_source(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 255, (6, 4, 4, 3), dtype=np.uint8))
    return open_source(str(tmp_path / "x.npy"), Preprocess())


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()


def test_gprebn_runs_a_batchnorm1d_model_at_batch_1(tmp_path):
    from gprebn_edge.adaptation import adapt_and_freeze

    static, online, _ = adapt_and_freeze(_mlp(), _mlp_source(tmp_path), AdaptConfig(batch_size=1))
    assert online["steps"] == 6 and isinstance(static[2], nn.BatchNorm1d)


def test_batch_statistics_methods_explain_batch_1_with_batchnorm1d(tmp_path):
    from gprebn_edge.adaptation import adapt_and_freeze
    from gprebn_edge.errors import GprebnError

    with pytest.raises(GprebnError, match="larger --batch-size"):
        adapt_and_freeze(_mlp(), _mlp_source(tmp_path), AdaptConfig(method="tent", batch_size=1))


def test_collapsed_adaptation_is_refused_and_keeps_the_previous_file(tmp_path):
    from gprebn_edge.adaptation import AdaptationRefused, adapt_to_file

    out = tmp_path / "a.safetensors"
    out.write_bytes(b"good artifact")
    data = "synthetic:fog:5:n=256"
    with pytest.raises(AdaptationRefused, match="collapsed.*--force"):
        adapt_to_file("builtin:small_resnet", data, out, AdaptConfig(lr=1.0))
    assert out.read_bytes() == b"good artifact"
    result = adapt_to_file("builtin:small_resnet", data, out, AdaptConfig(lr=1.0), force=True)
    assert result.summary["health"]["verdict"] == "collapsed"
    from gprebn_edge.checkpoint import load_checkpoint

    assert load_checkpoint(out)[1]["summary"]["health"]["verdict"] == "collapsed"


def test_too_few_images_are_not_checked(loaded):
    result = adapt_model(loaded, open_source("synthetic:clean:n=30", loaded.preprocess), AdaptConfig(batch_size=8))
    assert result.summary["health"]["verdict"] == "unchecked" and result.summary["images"] == 30
    assert "too few" in result.summary["health"]["reason"] and "add images" in result.summary["health"]["reason"]


def test_a_non_finite_model_is_never_written_even_unchecked(tmp_path, loaded, monkeypatch):
    from gprebn_edge import adaptation as adapt_module
    from gprebn_edge.adaptation import AdaptationRefused, adapt_to_file

    real = adapt_module.adapt_and_freeze

    def poisoned(*args, **kwargs):
        static, online, adapter = real(*args, **kwargs)
        with torch.no_grad():
            next(m for m in static.modules() if isinstance(m, nn.BatchNorm2d)).running_var.fill_(float("nan"))
        return static, online, adapter

    monkeypatch.setattr(adapt_module, "adapt_and_freeze", poisoned)
    out = tmp_path / "a.safetensors"
    for n in (30, 200):  # 30: too few images to hold any back; 200: checked on the held-back images
        with pytest.raises(AdaptationRefused, match="not finite"):
            adapt_to_file("builtin:small_resnet", f"synthetic:clean:n={n}", out, AdaptConfig(batch_size=16))
        assert not out.exists()


# -- passes and progress (issue 17) ----------------------------------------------------------------------------

# images each method forwards for 128 calibration images at batch 32: probe 1, the online pass 112, the refresh
# 112 (freeze "refresh"), the health check 2 x 16 held back; `source` runs only the probe and the health check
_EXPECTED_IMAGES = {"source": 1 + 32, "bn": 1 + 112 + 112 + 32, "adabn": 1 + 112 + 32, "tent": 1 + 112 + 112 + 32,
                    "gprebn": 1 + 112 + 112 + 32}


@pytest.mark.parametrize("method", sorted(_EXPECTED_IMAGES))
def test_adapt_makes_only_the_passes_its_method_needs(loaded, method):
    """Counts the model's forward calls (a hook on the root module travels into every copy the adapter and
    the freeze make), so a redundant pass over the calibration set cannot come back unnoticed."""
    import copy

    model = copy.deepcopy(loaded.model)
    images: list[int] = []
    model.register_forward_pre_hook(lambda m, args: images.append(args[0].shape[0]))
    counted = type(loaded)(model=model, spec=loaded.spec, preprocess=loaded.preprocess)
    source = open_source("synthetic:gaussian_noise:5:n=128", loaded.preprocess)
    s = adapt_model(counted, source, AdaptConfig(method=method, batch_size=32)).summary
    assert sum(images) == _EXPECTED_IMAGES[method]
    assert sum(s["passes"].values()) == sum(images)
    assert s["passes"]["online"] == (0 if method == "source" else 112)


def test_adapt_reports_progress_per_stage(loaded):
    import io

    from gprebn_edge.progress import progress_lines

    log = io.StringIO()
    source = open_source("synthetic:gaussian_noise:5:n=128", loaded.preprocess)
    adapt_model(loaded, source, AdaptConfig(batch_size=32), progress=progress_lines(every=0.0, stream=log))
    lines = log.getvalue().splitlines()
    assert "adapting (gprebn): 32/112 images" in lines[0] and "ETA" in lines[0]
    assert any(line.startswith("adapting (gprebn): 112/112 images") and "done in" in line for line in lines)
    assert any(line.startswith("refreshing statistics: 112/112 images") for line in lines)


def test_adapt_within_a_memory_budget_records_its_plan(loaded, monkeypatch):
    import gprebn_edge.budget as budget_module
    from gprebn_edge.budget import SLACK, footprint

    monkeypatch.setattr(budget_module, "current_rss", lambda: 100_000_000)  # the process, made deterministic
    source = open_source("synthetic:gaussian_noise:5:n=128", loaded.preprocess)
    fp = footprint(loaded.model, (3, 32, 32), "gprebn")
    # room for 12 images per step (16 held back, 3 copies of a logical batch of 32)
    budget = 100_000_000 + 4 * fp.model + (16 + 3 * 32) * fp.image + int(SLACK * 12.5 * fp.step(True))
    s = adapt_model(loaded, source, AdaptConfig(batch_size=32, max_memory=budget)).summary
    plan = s["memory_plan"]
    assert plan["micro_batch"] == 12 and plan["budget"] == budget and not plan["checkpoint"]
    assert s["steps"] == 4 and s["health"]["verdict"] == "ok"  # still one step per logical batch of 32
