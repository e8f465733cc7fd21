"""Fold every BatchNorm into the op that produces its input, where that is exact (module plumbing; the
maths is in fold_math.py).

The model is traced with torch.fx. A BN module is folded when its input is the output of a Conv1d/2d/3d,
ConvTranspose1d/2d/3d or Linear module that nothing else consumes (and, for Linear, whose output is
(N, C), so that BatchNorm1d's channels are the Linear's outputs). Every other BN (pre-activation, after an
add or concat, a producer with other consumers, on the input) is skipped and reported, and stays in the
graph as a static eval-mode BN. Every folded producer gets a bias. Module names are kept, so the folded
weights keep the PyTorch parameter names (`layer1.0.conv1.weight`).

A model torch.fx cannot trace (data-dependent control flow) raises UntraceableModelError naming the cause;
the export pipeline then folds in the ONNX graph instead (onnx_fold.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from gprebn_edge.errors import ModelError
from gprebn_edge.export.fold_math import fold_bn

__all__ = ["FoldReport", "UntraceableModelError", "fold_batchnorm"]


class UntraceableModelError(ModelError):
    """torch.fx cannot trace the model; the export falls back to folding in the ONNX graph (onnx_fold.py)."""


@dataclass
class FoldReport:
    folded: list[tuple[str, str]] = field(default_factory=list)   # (bn, producer)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (bn, reason)

    def to_dict(self) -> dict:
        return {"folded": [{"bn": b, "into": p} for b, p in self.folded],
                "skipped": [{"bn": b, "reason": r} for b, r in self.skipped]}


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError, ... for untraceable code
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UntraceableModelError(f"cannot fold BatchNorm: torch.fx cannot trace {type(model).__name__} "
                                    f"({first[:160]}); remove data-dependent control flow from forward(), or "
                                    "mark such code with torch.fx.wrap") from None


def _skip_reason(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why this BN node cannot be folded into its input's producer, or None when it can."""
    src = node.args[0] if node.args else None
    if not isinstance(src, fx.Node):
        return "its input is not a tensor produced in the graph"
    if src.op != "call_module":
        what = "the model input" if src.op == "placeholder" else f"`{getattr(src.target, '__name__', src.target)}`"
        return f"no foldable producer (its input comes from {what})"
    producer = gm.get_submodule(str(src.target))
    if not isinstance(producer, _ConvNd | nn.Linear):
        return f"no foldable producer (its input comes from {type(producer).__name__} `{src.target}`)"
    if len(src.users) != 1:
        return f"its producer `{src.target}` has other consumers"
    calls = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == src.target)
    if calls > 1:  # one module applied twice: folding one BN into it would change the other call too
        return f"its producer `{src.target}` is called more than once (shared weights)"
    if isinstance(producer, nn.Linear):
        shape = src.meta.get("tensor_meta")
        if shape is None or len(shape.shape) != 2:
            return f"Linear `{src.target}` output is not (N, C), so BN channels are not its outputs"
    return None


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> tuple[fx.GraphModule, FoldReport]:
    """A folded copy of an eval-mode model and the report of what was folded and skipped. `example` is one
    input batch, used to check shapes."""
    gm = _trace(copy.deepcopy(model).eval())
    ShapeProp(gm).propagate(example)
    report = FoldReport()
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(str(node.target)), _BatchNorm):
            continue
        bn = gm.get_submodule(str(node.target))
        assert isinstance(bn, _BatchNorm)
        mean, var = bn.running_mean, bn.running_var
        if mean is None or var is None:
            report.skipped.append((str(node.target), "no running statistics"))
            continue
        reason = _skip_reason(gm, node)
        if reason is not None:
            report.skipped.append((str(node.target), reason))
            continue
        src = node.args[0]
        producer = gm.get_submodule(str(src.target))
        assert isinstance(producer, _ConvNd | nn.Linear)
        weight, bias = fold_bn(producer.weight, producer.bias, mean, var,
                               bn.weight if bn.affine else torch.ones_like(mean),
                               bn.bias if bn.affine else torch.zeros_like(mean), bn.eps,
                               transposed=isinstance(producer, _ConvTransposeNd),
                               groups=getattr(producer, "groups", 1))
        producer.weight.copy_(weight)
        if producer.bias is None:
            producer.bias = nn.Parameter(bias)
        else:
            producer.bias.copy_(bias)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        report.folded.append((str(node.target), str(src.target)))
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm.eval(), report
