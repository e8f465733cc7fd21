"""Fold BatchNorm in an ONNX graph: the second level of folding. The export folds in PyTorch first
(fold.py, torch.fx); the BNs it cannot prove foldable stay BatchNormalization nodes in the export, and this
module folds those it can prove foldable in the graph. A model torch.fx cannot trace at all is folded here
entirely.

Getting a graph that still has its BatchNorms (facts seen with torch 2.13, TorchScript exporter, opset 17):

- By default (eval model, `do_constant_folding=True`) the exporter fuses Conv+BN itself, in a pass that runs
  only when constant folding is on and `training` is EVAL, and names the fused weights anonymously
  (`onnx::Conv_89`). It does not fuse Gemm+BN.
- `training=TrainingMode.PRESERVE` with the model in eval mode skips that pass and changes nothing else: each
  BN is an inference-form BatchNormalization node (training_mode 0, one output), constant folding still runs
  elsewhere, and every initializer keeps its state-dict name (`layers.0.0.conv1.weight`,
  `layers.0.0.bn1.running_mean`). The exporter then advises turning constant folding off; that advice is for
  models in training mode, and the warning is silenced here. `do_constant_folding=False` keeps BN and names
  too, but leaves shape arithmetic unfolded (a `Shape` node before an `Expand`), so its graph differs from the
  export of the fx-folded model; with PRESERVE, the folded graph has the same nodes and initializer names.
- With `keep_initializers_as_inputs` False (its default at opset >= 9) the exporter merges initializers with
  equal values (BN defaults: weight == running_var == 1, bias == running_mean == 0): the duplicate becomes an
  `Identity` of the kept one, named with the duplicate's state-dict name, and the graph would depend on the
  weight values. As in onnx_export.py, the export here sets it True, which switches that off, and then drops
  the initializers from the graph inputs. Values are still read through Identity and Constant nodes (BN
  with affine=False gets its scale and shift from `Constant` nodes), and a folded weight or bias that came
  from one becomes an initializer of that name.
- A Linear without bias exports as MatMul with an anonymous weight, transposed by constant folding
  (`onnx::MatMul_10`). A BN after it is not folded here (it is reported); fold.py folds it.
- BatchNorm with track_running_stats=False does not export with a dynamic batch axis.
- Tracing follows only the branch that the example input takes: a data-dependent `if` in forward() is baked
  into the graph, and the exporter emits a TracerWarning ("Converting a tensor to a Python boolean might cause
  the trace to be incorrect"). Folding keeps exactly what the unfolded ONNX computes, the traced path; the
  parity check against the eval-mode PyTorch model on real inputs shows whether the data takes that path.

A BN folds into the Conv, ConvTranspose or Gemm whose output only it consumes, possibly through Identity
nodes and Pad nodes of mode reflect, edge or wrap (they copy values within a channel, so they commute with
BN's per-channel affine; the Pad stays), when the producer's weight (and bias) are constants used by no other
node. A constant Pad in between keeps the BN (BN maps the pad value to a different value per channel); other
BNs stay and are reported, as in fold.py. The folded producer gets a bias named after its weight
(`conv1.weight` -> `conv1.bias`), inserted next to it. The maths is fold_math.fold_bn, as in fold.py: float64,
cast once to the weight's dtype. The BN's epsilon is stored as a float32 attribute; it is read back as the
shortest decimal that float32 rounds to it (1e-05, not 9.99999974738e-06), the value PyTorch held, so that
both levels fold to bit-identical weights.
"""

from __future__ import annotations

import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from gprebn_edge.errors import ModelError
from gprebn_edge.export.fold import FoldReport
from gprebn_edge.export.fold_math import bn_scale_shift, fold_bn
from gprebn_edge.export.onnx_export import DEFAULT_OPSET, INPUT, OUTPUT, drop_initializer_inputs
from gprebn_edge.validate import oneline

__all__ = ["bn_scale_shift_np", "fold_bn_np", "fold_onnx_batchnorm", "export_bn_onnx",
           "export_folded_onnx_fallback"]

_FOLDABLE = ("Conv", "ConvTranspose", "Gemm")
_VALUE_NODES = ("Identity", "Constant")


# --- maths: fold_math.py's, on numpy arrays ---------------------------------------------------------

def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a))  # a writable copy: torch warns on read-only arrays


def bn_scale_shift_np(mean: np.ndarray, var: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                      eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) with BN(z) = s * z + t per channel, in float64."""
    t = [_tensor(np.asarray(a, dtype=np.float64)) for a in (mean, var, weight, bias)]
    scale, shift = bn_scale_shift(*t, eps)
    return scale.numpy(), shift.numpy()


def fold_bn_np(weight: np.ndarray, bias: np.ndarray | None, mean: np.ndarray, var: np.ndarray,
               bn_weight: np.ndarray, bn_bias: np.ndarray, eps: float, *, transposed: bool = False,
               groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """fold_math.fold_bn on numpy arrays: (weight, bias) of the op with the BN folded, computed in float64
    and returned in `weight`'s dtype."""
    w, b = fold_bn(_tensor(weight), None if bias is None else _tensor(bias), _tensor(mean), _tensor(var),
                   _tensor(bn_weight), _tensor(bn_bias), eps, transposed=transposed, groups=groups)
    return w.numpy(), b.numpy()


def _epsilon(bn: onnx.NodeProto) -> float:
    """The BN's epsilon as PyTorch held it: the attribute is float32, so 1e-5 reads back as 9.99999974738e-06;
    the shortest decimal that rounds to it in float32 is the value that was written."""
    return float(str(np.float32(_attr(bn, "epsilon", 1e-5))))


# --- graph plumbing -------------------------------------------------------------------------------------

class _Skip(Exception):
    """A BN that cannot be folded; the message is the reason."""


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """The graph's nodes and those of its subgraphs (If/Loop bodies may read outer values by name)."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _all_nodes(sub)


class _Graph:
    """Lookups over a graph being edited, rebuilt after each change (graphs here have hundreds of nodes)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.after: dict[str, str] = {}
        self.refresh()

    def refresh(self) -> None:
        g = self.graph
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.uses = Counter(i for n in _all_nodes(g) for i in n.input if i)
        self.uses.update(o.name for o in g.output)
        self.inputs = {i.name for i in g.input}

    def constant(self, name: str) -> np.ndarray | None:
        """The value of `name` where it is fixed: an initializer that is not a graph input, or an Identity
        or Constant node's output."""
        while True:
            if name in self.inits:
                return None if name in self.inputs else numpy_helper.to_array(self.inits[name])
            node = self.producer.get(name)
            if node is None or node.op_type not in _VALUE_NODES:
                return None
            if node.op_type == "Constant":
                value = _attr(node, "value", None)
                return None if value is None else numpy_helper.to_array(value)
            name = node.input[0]

    def fresh(self, name: str) -> str:
        taken = set(self.inits) | set(self.producer) | set(self.uses) | self.inputs
        candidate, i = name, 0
        while candidate in taken:
            i += 1
            candidate = f"{name}_{i}"
        return candidate

    def write(self, name: str, value: np.ndarray, *, after: str | None = None) -> None:
        """Make `name` an initializer holding `value`: in place, replacing the Identity/Constant node that
        produced it, or new (to be placed after initializer `after` by `order_initializers`)."""
        tensor = numpy_helper.from_array(value, name)
        if name in self.inits:
            self.inits[name].CopyFrom(tensor)
            return
        if name in self.producer:
            self.graph.node.remove(self.producer[name])
        self.graph.initializer.add().CopyFrom(tensor)
        if after is not None:
            self.after[name] = after
        self.refresh()

    def order_initializers(self) -> None:
        """Move each new initializer next to the one it was written after (one sort; rebuilding the list
        would copy every weight)."""
        rank = {t.name: 2 * i for i, t in enumerate(self.graph.initializer) if t.name not in self.after}
        self.graph.initializer.sort(key=lambda t: rank.get(t.name, rank.get(self.after.get(t.name, ""), 1 << 60) + 1))


def _strip(name: str, suffix: str) -> str | None:
    return name[: -len(suffix)] if name.endswith(suffix) and len(name) > len(suffix) else None


def _bn_name(bn: onnx.NodeProto) -> str:
    """The BN's PyTorch module name, from its parameter names (node name as a fallback)."""
    return (_strip(bn.input[1], ".weight") or _strip(bn.input[3], ".running_mean") or bn.name
            or bn.output[0])


def _producer_name(node: onnx.NodeProto) -> str:
    weight = node.input[1] if len(node.input) > 1 else ""
    return _strip(weight, ".weight") or node.name or node.output[0]


def _gemm_bias(c: np.ndarray, n_out: int) -> np.ndarray:
    if c.size == 1:
        return np.full(n_out, c.reshape(()), dtype=c.dtype)
    if c.shape in ((n_out,), (1, n_out)):
        return c.reshape(n_out)
    raise _Skip(f"Gemm bias of shape {c.shape} is not one value per output channel")


_COMMUTING_PADS = ("reflect", "edge", "wrap")


def _through_passthroughs(g: _Graph, x: str) -> str:
    """The tensor a BN input comes from, looking through Identity nodes and reflect/edge/wrap Pads that only
    the BN path uses; a constant Pad raises _Skip."""
    while (node := g.producer.get(x)) is not None and node.op_type in ("Identity", "Pad"):
        what = f"{node.op_type} `{node.name or x}`"
        if node.op_type == "Pad":
            mode = _attr(node, "mode", b"constant")
            mode = mode.decode() if isinstance(mode, bytes) else str(mode)
            if mode not in _COMMUTING_PADS:
                raise _Skip(f"a constant pad ({what}) comes before it: BN maps the pad value to a different value "
                            "per channel, so folding would change the border")
        if g.uses[x] != 1:
            raise _Skip(f"{what} before it has other consumers")
        x = node.input[0]
    return x


def _fold_one(g: _Graph, bn: onnx.NodeProto) -> tuple[str, set[str]]:
    """Fold `bn` into its producer and return (producer name, names that may have become unused)."""
    if _attr(bn, "training_mode", 0) or any(bn.output[1:]):
        raise _Skip("it is a training-mode BatchNormalization")
    params = [g.constant(n) for n in bn.input[1:5]]
    if any(p is None for p in params):
        raise _Skip("no constant running statistics or affine parameters")
    gamma, beta, mean, var = (np.asarray(p) for p in params if p is not None)
    x = _through_passthroughs(g, bn.input[0])
    src = g.producer.get(x)
    if src is None:
        raise _Skip("no foldable producer (its input comes from the model input)" if x in g.inputs
                    else "its input is not a tensor produced in the graph")
    name = _producer_name(src)
    if src.op_type not in _FOLDABLE:
        raise _Skip(f"no foldable producer (its input comes from {src.op_type} `{src.name or x}`)")
    if g.uses[x] != 1 or len(src.output) != 1:
        raise _Skip(f"its producer `{name}` has other consumers")
    w_name = src.input[1]
    b_name = src.input[2] if len(src.input) > 2 and src.input[2] else None
    for n in filter(None, (w_name, b_name)):
        if g.constant(n) is None:
            raise _Skip(f"`{n}` of `{name}` is not a constant")
        if g.uses[n] != 1:
            raise _Skip(f"`{n}` of `{name}` is shared with other nodes")
    w = g.constant(w_name)
    assert w is not None
    new_w, new_b = _folded(src, w, g.constant(b_name) if b_name else None, (mean, var, gamma, beta, _epsilon(bn)))
    maybe_unused = set(bn.input[1:5]) | {w_name} | ({b_name} if b_name else set())
    maybe_unused.update([g.producer[n].input[0] for n in maybe_unused
                         if n in g.producer and g.producer[n].op_type == "Identity"])
    g.write(w_name, np.ascontiguousarray(new_w))
    if b_name is None:
        b_name = g.fresh(f"{name}.bias")
        g.write(b_name, new_b, after=w_name)
        while len(src.input) < 3:
            src.input.append("")
        src.input[2] = b_name
    else:
        g.write(b_name, new_b)
    if src.op_type == "Gemm":  # the bias now holds beta * C
        for a in [a for a in src.attribute if a.name == "beta"]:
            src.attribute.remove(a)
        src.attribute.append(helper.make_attribute("beta", 1.0))
    _bypass(g, bn)
    return name, maybe_unused


def _folded(src: onnx.NodeProto, w: np.ndarray, b: np.ndarray | None,
            stats: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]) -> tuple[np.ndarray, np.ndarray]:
    """The producer's new weight and bias, in its own layout (Gemm: transB, and beta folded into the bias)."""
    try:
        if src.op_type == "Gemm":
            trans_b = bool(_attr(src, "transB", 0))
            w_out_in = w if trans_b else w.T  # (out, in)
            beta_c = float(_attr(src, "beta", 1.0))
            bias = None if b is None else _gemm_bias(b, w_out_in.shape[0]).astype(np.float64) * beta_c
            new_w, new_b = fold_bn_np(w_out_in, bias, *stats)
            return (new_w if trans_b else new_w.T), new_b
        return fold_bn_np(w, b, *stats, transposed=src.op_type == "ConvTranspose", groups=int(_attr(src, "group", 1)))
    except ValueError as e:
        raise _Skip(str(e)) from None


def _bypass(g: _Graph, bn: onnx.NodeProto) -> None:
    """Remove `bn`: its consumers read its input instead (a graph output keeps the BN's output name)."""
    y, z = bn.output[0], bn.input[0]
    if y in {o.name for o in g.graph.output}:
        g.producer[z].output[0] = y
    else:
        for node in _all_nodes(g.graph):
            for i, n in enumerate(node.input):
                if n == y:
                    node.input[i] = z
    g.graph.node.remove(bn)


def _prune(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove the Identity/Constant nodes and initializers among `names` that nothing uses any more."""
    while True:
        uses = Counter(i for n in _all_nodes(graph) for i in n.input if i)
        uses.update(o.name for o in graph.output)
        dead = [n for n in graph.node if n.op_type in _VALUE_NODES and n.output[0] in names and not uses[n.output[0]]]
        for node in dead:
            names.update(node.input)
            graph.node.remove(node)
        unused = [t for t in graph.initializer if t.name in names and not uses[t.name]]
        for t in unused:
            graph.initializer.remove(t)
        if not dead and not unused:
            break
    produced = {o for n in graph.node for o in n.output}
    for v in [v for v in graph.value_info if v.name not in produced]:
        graph.value_info.remove(v)


def fold_onnx_batchnorm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FoldReport]:
    """A copy of `model` with every foldable BatchNormalization of its main graph folded into its producer,
    and the report of what was folded and skipped (names are PyTorch module names where the initializers
    carry them). The result passes onnx.checker."""
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    g = _Graph(folded.graph)
    report = FoldReport()
    unused: set[str] = set()
    for bn in [n for n in folded.graph.node if n.op_type == "BatchNormalization"]:
        g.refresh()
        try:
            producer, names = _fold_one(g, bn)
        except _Skip as e:
            report.skipped.append((_bn_name(bn), str(e)))
            continue
        report.add(_bn_name(bn), producer, "onnx")
        unused |= names
    _prune(folded.graph, unused)
    g.order_initializers()
    onnx.checker.check_model(folded)
    return folded, report


# --- export -------------------------------------------------------------------------------------------

def export_bn_onnx(model: nn.Module, example: torch.Tensor, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Export `model` in eval mode (its mode is restored afterwards) with the TorchScript exporter, keeping
    BatchNormalization nodes and state-dict names; input "input" and output "logits" with a dynamic batch axis.
    A data-dependent branch is traced as `example` takes it (the exporter warns with a TracerWarning)."""
    was_training = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter's notice
            warnings.filterwarnings("ignore", message="It is recommended that constant folding be turned off")
            path = str(Path(tmp) / "model.onnx")
            torch.onnx.export(model, (example,), path, dynamo=False, opset_version=opset,
                              input_names=[INPUT], output_names=[OUTPUT], do_constant_folding=True,
                              training=torch.onnx.TrainingMode.PRESERVE, keep_initializers_as_inputs=True,
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
            proto = onnx.load(path)
    except Exception as e:  # the exporter raises many types (AssertionError, RuntimeError, OnnxExporterError)
        raise ModelError(f"the TorchScript ONNX exporter cannot export {type(model).__name__} "
                         f"({oneline(e, 160)})") from e
    finally:
        model.train(was_training)
    drop_initializer_inputs(proto)
    return proto


def export_folded_onnx_fallback(model: nn.Module, path: str | Path, example: torch.Tensor,
                                opset: int = DEFAULT_OPSET) -> FoldReport:
    """Export `model` with the BatchNorms it has, fold them in the ONNX graph and save it to `path`: a model
    torch.fx cannot trace, or the fx-folded model with the BNs torch.fx left. Check parity against the
    original eval-mode model afterwards (onnx_export.onnx_parity)."""
    folded, report = fold_onnx_batchnorm(export_bn_onnx(model, example, opset))
    onnx.save(folded, str(path))
    return report
