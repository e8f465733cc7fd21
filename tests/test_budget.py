"""budget.py: sizes, the footprint of a step, and the plan that fits a budget."""

import pytest

from gprebn_edge.budget import SLACK, BudgetError, footprint, format_size, parse_size, plan_memory
from gprebn_edge.errors import GprebnError
from gprebn_edge.methods import make_adapter
from gprebn_edge.models.spec import load_model

SHAPE = (3, 32, 32)


@pytest.fixture(scope="module")
def model():
    return load_model("builtin:small_resnet").model


@pytest.mark.parametrize(("text", "value"), [("2GB", 2_000_000_000), ("1.5GiB", 1.5 * 2 ** 30), ("800MB", 8e8),
                                             ("512m", 512e6), ("4096", 4096), (" 3 kB ", 3000)])
def test_parse_size(text, value):
    assert parse_size(text) == int(value)


@pytest.mark.parametrize("text", ["", "GB", "2XB", "-1GB", "0", "1e3GB", "nan"])
def test_parse_size_refuses_with_one_line(text):
    with pytest.raises(GprebnError, match="--max-memory must be") as e:
        parse_size(text)
    assert "\n" not in str(e.value)


def test_format_size_reads_back():
    assert format_size(2_000_000_000) == "2.00 GB" and parse_size(format_size(123_456_789).replace(" ", "")) > 1e8


def test_footprint_of_gradient_and_statistics_methods(model):
    grad, stats = footprint(model, SHAPE, "gprebn"), footprint(model, SHAPE, "adabn")
    assert grad.saved > 4 * grad.largest_activation > 0   # a step keeps many activations for its backward
    assert stats.saved == 0                                # inference mode keeps nothing
    assert grad.blocks == 3 and grad.saved_checkpointed < grad.saved
    assert grad.image == 3 * 32 * 32 * 4
    assert grad.step(True) > grad.step(True, checkpoint=True) and grad.step(False) < grad.step(True)


def test_plan_picks_the_largest_micro_batch_that_fits(model):
    fp = footprint(model, SHAPE, "gprebn")
    roomy = plan_memory(model, SHAPE, "gprebn", 64, 10 ** 10, baseline_bytes=0)
    assert roomy.micro_batch == 64 and not roomy.checkpoint and roomy.no_grad_batch == 64
    budget = roomy.fixed + int(SLACK * 10.5 * fp.step(True))  # room for 10 images per step
    tight = plan_memory(model, SHAPE, "gprebn", 64, budget, baseline_bytes=0)
    assert tight.micro_batch == 10 and not tight.checkpoint and tight.estimated_peak <= budget
    adapter = tight.apply(make_adapter("gprebn", model))
    assert adapter.micro_batch == 10 and adapter.no_grad_batch == tight.no_grad_batch
    # what the caller holds beside the plan (the loop's onnxruntime sessions) leaves less room for a step
    reserved = plan_memory(model, SHAPE, "gprebn", 64, budget, baseline_bytes=0,
                           reserve_bytes=int(SLACK * 4 * fp.step(True)))
    assert reserved.fixed == tight.fixed + int(SLACK * 4 * fp.step(True)) and reserved.micro_batch == 6


def test_plan_checkpoints_when_one_image_does_not_fit_otherwise(model):
    fp = footprint(model, SHAPE, "gprebn")
    fixed = plan_memory(model, SHAPE, "gprebn", 64, 10 ** 10, baseline_bytes=0).fixed
    budget = fixed + int(SLACK * (fp.step(True) + fp.step(True, checkpoint=True)) / 2)
    plan = plan_memory(model, SHAPE, "gprebn", 64, budget, baseline_bytes=0)
    assert plan.checkpoint and plan.micro_batch == 1
    adapter = plan.apply(make_adapter("gprebn", model))
    assert any("forward" in m.__dict__ for m in adapter.model.modules())


def test_plan_refuses_a_budget_that_holds_not_one_image(model):
    with pytest.raises(BudgetError, match=r"too small for gprebn: one image needs about .* give at least") as e:
        plan_memory(model, SHAPE, "gprebn", 64, 2_000_000, baseline_bytes=1_000_000)
    assert "\n" not in str(e.value)


def test_cli_adapt_max_memory_refusals_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from gprebn_edge.cli import app

    runner = CliRunner()
    base = ["adapt", "--model", "builtin:small_resnet", "--data", "synthetic:fog:n=64", "-o",
            str(tmp_path / "a.safetensors")]
    bad = runner.invoke(app, [*base, "--max-memory", "2XB"])
    assert bad.exit_code == 1 and "--max-memory must be a size such as 2GB" in bad.output
    small = runner.invoke(app, [*base, "--max-memory", "1MB"])
    assert small.exit_code == 1 and "too small for gprebn" in small.output and "Traceback" not in small.output
    assert len(small.output.strip().splitlines()) == 1 and not (tmp_path / "a.safetensors").exists()
