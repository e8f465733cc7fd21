"""Fold every BatchNorm into the op that produces its input, where that is exact (module plumbing; the
maths is in fold_math.py).

The model is traced with torch.fx. A BN module folds into its input's producer when the producer is

- a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear module (torch.nn's own, which fx keeps as one call), or
- a call of conv1d/2d/3d, conv_transpose1d/2d/3d or linear (torch.* or F.*), as real models write their
  convolutions (EfficientNet's `Conv2dStaticSamePadding` pads, then calls F.conv2d on its own weight),
  whose weight, and bias if it has one, are model parameters,

and the producer's output reaches only this BN, possibly through eval-time no-ops (Identity, Dropout) and
reflect/replicate/circular pads (they copy values within a channel, so they commute with BN's per-channel
affine; the pad stays). The producer's parameters must be used nowhere else (no module called twice, no tied
weights), and a Linear's output must be (N, C), so that BatchNorm1d's channels are its outputs. Every other
BN stays in the graph as a static eval-mode BN and is reported with its reason: pre-activation, after an add
or concat, a producer with other consumers, on the model input, or behind a constant pad (BN maps the pad
value to a different value per channel, so the border would change).

Every folded producer gets a bias: a call without one gets a new Parameter `bias` on the module that owns
its weight (`_blocks.0._project_conv.bias`). Module names are kept, so the folded weights keep their PyTorch
parameter names, which become the ONNX initializer names and TensorRT's refit names.

A model torch.fx cannot trace (data-dependent control flow) raises UntraceableModelError naming the cause;
the export pipeline then folds in the ONNX graph instead (onnx_fold.py), which also folds, after this fold,
what it can prove foldable there.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.padding import _CircularPadNd, _ConstantPadNd, _ReflectionPadNd, _ReplicationPadNd

from gprebn_edge.errors import ModelError
from gprebn_edge.export.fold_math import fold_bn
from gprebn_edge.validate import oneline

__all__ = ["FoldReport", "UntraceableModelError", "fold_batchnorm"]

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
# F.conv2d is torch.conv2d (and so on): one entry covers both spellings
_FUNCTIONS: dict[Any, tuple[str, tuple[str, ...]]] = {
    **{f: ("conv", _CONV_ARGS) for f in (torch.conv1d, torch.conv2d, torch.conv3d)},
    **{f: ("transposed", _CONV_T_ARGS) for f in (torch.conv_transpose1d, torch.conv_transpose2d,
                                                 torch.conv_transpose3d)},
    F.linear: ("linear", ("input", "weight", "bias")),
}
# functional dropouts: (function, position of its `training` argument, default)
_DROPOUTS: dict[Callable[..., Any], tuple[int, bool]] = {
    **{f: (2, True) for f in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                              F.feature_alpha_dropout)},
    **{f: (2, True) for f in (torch.dropout, torch.alpha_dropout, torch.feature_dropout,
                              torch.feature_alpha_dropout)},
}


class UntraceableModelError(ModelError):
    """torch.fx cannot trace the model; the export falls back to folding in the ONNX graph (onnx_fold.py)."""


@dataclass
class FoldReport:
    folded: list[tuple[str, str]] = field(default_factory=list)   # (bn, producer)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (bn, reason)
    where: dict[str, str] = field(default_factory=dict)           # bn -> "pytorch" or "onnx", per folded BN
    deferred: dict[str, str] = field(default_factory=dict)        # bn folded in ONNX -> why torch.fx did not

    def add(self, bn: str, into: str, where: str) -> None:
        self.folded.append((bn, into))
        self.where[bn] = where

    def then(self, onnx: FoldReport) -> FoldReport:
        """This torch.fx report followed by the ONNX fold of the export, which saw only the BNs left here."""
        done = {b for b, _ in onnx.folded}
        mine = dict(self.skipped)
        left = [(b, r) for b, r in self.skipped if b not in done]
        left += [(b, r) for b, r in onnx.skipped if b not in mine]  # only if the names did not match
        return FoldReport(self.folded + onnx.folded, left, {**self.where, **onnx.where},
                          {**self.deferred, **{b: mine[b] for b in done if b in mine}})

    def to_dict(self) -> dict:
        def entry(b: str, p: str) -> dict:
            e = {"bn": b, "into": p, "where": self.where.get(b, "pytorch")}
            return e | ({"pytorch_skipped": self.deferred[b]} if b in self.deferred else {})

        return {"folded": [entry(b, p) for b, p in self.folded],
                "skipped": [{"bn": b, "reason": r} for b, r in self.skipped]}


class _Skip(Exception):
    """A BN that cannot be folded; the message is the reason."""


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError, ... for untraceable code
        raise UntraceableModelError(f"cannot fold BatchNorm: torch.fx cannot trace {type(model).__name__} "
                                    f"({oneline(e, 160)}); remove data-dependent control flow from forward(), or "
                                    "mark such code with torch.fx.wrap") from None


def _name(node: fx.Node) -> str:
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    return node.name


def _arg(node: fx.Node, names: tuple[str, ...], name: str, default: Any = None) -> Any:
    i = names.index(name)
    if i < len(node.args):
        return node.args[i]
    return node.kwargs.get(name, default)


def _set_arg(node: fx.Node, names: tuple[str, ...], name: str, value: Any) -> None:
    i = names.index(name)
    if i < len(node.args):
        node.args = (*node.args[:i], value, *node.args[i + 1:])
    else:
        node.kwargs = {**node.kwargs, name: value}


def _passthrough(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """"noop" or "pad" where `node` passes its first input through with values unchanged per channel;
    "constant pad" for a pad with a constant; None otherwise."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if isinstance(m, nn.Identity) or (isinstance(m, _DropoutNd) and not m.training):
            return "noop"
        if isinstance(m, _ReflectionPadNd | _ReplicationPadNd | _CircularPadNd):
            return "pad"
        if isinstance(m, _ConstantPadNd):
            return "constant pad"
    elif node.op == "call_function":
        if node.target in _DROPOUTS:
            pos, default = _DROPOUTS[node.target]
            training = node.args[pos] if len(node.args) > pos else node.kwargs.get("training",
                                                                                   node.kwargs.get("train", default))
            return "noop" if training is False else None
        if node.target is F.pad:
            mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
            return "pad" if mode in ("reflect", "replicate", "circular") else "constant pad"
    return None


def _param_uses(gm: fx.GraphModule) -> Counter[int]:
    """How many graph uses each parameter (by identity) has: a get_attr per user, a module call per call."""
    uses: Counter[int] = Counter()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj = _resolve(gm, str(node.target))
            if isinstance(obj, torch.Tensor):
                uses[id(obj)] += max(1, len(node.users))
        elif node.op == "call_module":
            for p in {id(p) for p in gm.get_submodule(str(node.target)).parameters()}:
                uses[p] += 1
    return uses


def _resolve(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


@dataclass
class _Producer:
    """What a BN folds into: its name, weight and bias, layout, and how to write the folded values back."""

    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    transposed: bool
    groups: int
    write: Callable[[torch.Tensor, torch.Tensor], None]


def _module_producer(gm: fx.GraphModule, node: fx.Node, uses: Counter[int]) -> _Producer:
    target = str(node.target)
    module = gm.get_submodule(target)
    assert isinstance(module, _ConvNd | nn.Linear)
    calls = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target)
    if calls > 1:  # one module applied twice: folding one BN into it would change the other call too
        raise _Skip(f"its producer `{target}` is called more than once (shared weights)")
    if any(uses[id(p)] > 1 for p in module.parameters()):
        raise _Skip(f"the parameters of its producer `{target}` are also used elsewhere (tied weights)")

    def write(w: torch.Tensor, b: torch.Tensor) -> None:
        module.weight.copy_(w)
        if module.bias is None:
            module.bias = nn.Parameter(b)  # type: ignore[assignment]  # registers it as a parameter
        else:
            module.bias.copy_(b)

    return _Producer(target, module.weight, module.bias, isinstance(module, _ConvTransposeNd),
                     int(getattr(module, "groups", 1)), write)


def _parameter(gm: fx.GraphModule, value: Any, what: str, producer: str, uses: Counter[int]) -> nn.Parameter:
    if not isinstance(value, fx.Node) or value.op != "get_attr":
        origin = f" (`{_name(value)}`)" if isinstance(value, fx.Node) else ""
        raise _Skip(f"the {what} of `{producer}` is computed in the graph{origin}, not a model parameter")
    param = _resolve(gm, str(value.target))
    if not isinstance(param, nn.Parameter):
        raise _Skip(f"the {what} of `{producer}` (`{value.target}`) is not a parameter")
    if uses[id(param)] > 1:
        raise _Skip(f"the {what} `{value.target}` of `{producer}` is also used elsewhere (shared weights)")
    return param


def _function_producer(gm: fx.GraphModule, node: fx.Node, uses: Counter[int]) -> _Producer:
    kind, names = _FUNCTIONS[node.target]
    w_node = _arg(node, names, "weight")
    name = node.name
    if isinstance(w_node, fx.Node) and w_node.op == "get_attr":
        target = str(w_node.target)
        name = target[: -len(".weight")] if target.endswith(".weight") else target
    weight = _parameter(gm, w_node, "weight", name, uses)
    b_node = _arg(node, names, "bias")
    bias = None if b_node is None else _parameter(gm, b_node, "bias", name, uses)
    groups = _arg(node, names, "groups", 1) if kind != "linear" else 1
    if not isinstance(groups, int):
        raise _Skip(f"the groups of `{name}` are computed in the graph")
    owner_path = str(w_node.target).rpartition(".")[0]
    owner = gm.get_submodule(owner_path)
    if bias is None and hasattr(owner, "bias") and owner._parameters.get("bias", 0) is not None:
        raise _Skip(f"`{owner_path or type(gm).__name__}.bias` exists and is not the bias of `{name}`, so the "
                    "folded bias has no free parameter name")

    def write(w: torch.Tensor, b: torch.Tensor) -> None:
        weight.copy_(w)
        if bias is not None:
            bias.copy_(b)
            return
        owner.register_parameter("bias", nn.Parameter(b))  # replaces a `bias` registered as None
        with gm.graph.inserting_before(node):
            _set_arg(node, names, "bias", gm.graph.get_attr(f"{owner_path}.bias" if owner_path else "bias"))

    return _Producer(name, weight, bias, kind == "transposed", groups, write)


def _producer(gm: fx.GraphModule, bn: fx.Node, uses: Counter[int]) -> tuple[_Producer, fx.Node]:
    """The producer `bn` folds into (raises _Skip with the reason where there is none) and its node."""
    src = bn.args[0] if bn.args else None
    while isinstance(src, fx.Node) and (kind := _passthrough(gm, src)) is not None:
        if kind == "constant pad":
            raise _Skip(f"a constant pad (`{_name(src)}`) comes before it: BN maps the pad value to a different "
                        "value per channel, so folding would change the border")
        if len(src.users) != 1:
            raise _Skip(f"`{_name(src)}` before it has other consumers")
        src = src.args[0] if src.args else None
    if not isinstance(src, fx.Node):
        raise _Skip("its input is not a tensor produced in the graph")
    if src.op == "call_module" and isinstance(gm.get_submodule(str(src.target)), _ConvNd | nn.Linear):
        producer = _module_producer(gm, src, uses)
        linear = isinstance(gm.get_submodule(str(src.target)), nn.Linear)
    elif src.op == "call_function" and src.target in _FUNCTIONS:
        producer = _function_producer(gm, src, uses)
        linear = _FUNCTIONS[src.target][0] == "linear"
    else:
        if src.op == "call_module":
            what = f"{type(gm.get_submodule(str(src.target))).__name__} `{src.target}`"
        else:
            what = "the model input" if src.op == "placeholder" else f"`{getattr(src.target, '__name__', src.target)}`"
        raise _Skip(f"no foldable producer (its input comes from {what})")
    if len(src.users) != 1:
        raise _Skip(f"its producer `{producer.name}` has other consumers")
    if linear:
        shape = src.meta.get("tensor_meta")
        if shape is None or len(shape.shape) != 2:
            raise _Skip(f"Linear `{producer.name}` output is not (N, C), so BN channels are not its outputs")
    return producer, src


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> tuple[fx.GraphModule, FoldReport]:
    """A folded copy of an eval-mode model and the report of what was folded and skipped. `example` is one
    input batch, used to check shapes."""
    gm = _trace(copy.deepcopy(model).eval())
    ShapeProp(gm).propagate(example)
    uses = _param_uses(gm)
    report = FoldReport()
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(str(node.target)), _BatchNorm):
            continue
        bn = gm.get_submodule(str(node.target))
        assert isinstance(bn, _BatchNorm)
        mean, var = bn.running_mean, bn.running_var
        try:
            if mean is None or var is None:
                raise _Skip("no running statistics")
            producer, _ = _producer(gm, node, uses)
            try:
                weight, bias = fold_bn(producer.weight, producer.bias, mean, var,
                                       bn.weight if bn.affine else torch.ones_like(mean),
                                       bn.bias if bn.affine else torch.zeros_like(mean), bn.eps,
                                       transposed=producer.transposed, groups=producer.groups)
            except ValueError as e:  # channels do not match (a BN over another dim than the op's outputs)
                raise _Skip(f"`{producer.name}`: {e}") from None
        except _Skip as e:
            report.skipped.append((str(node.target), str(e)))
            continue
        producer.write(weight, bias)
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        report.add(str(node.target), producer.name, "pytorch")
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm.eval(), report
