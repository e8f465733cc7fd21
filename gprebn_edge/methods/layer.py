"""The GpreBN layer (docs/method.md), in the fused form.

Forward value: plain inference BN with the dataset-level statistics, y = gamma (x - mu) / sigma + beta.
Backward: training-mode BN's gradient through the batch statistics, scaled per channel by sigma_B / sigma.
Equivalently, one training-mode batch_norm with the re-parametrized affine
    w = gamma * sg(sigma_B) / sigma,   b = beta + gamma * (sg(mu_B) - mu) / sigma.
`_GpreBNFunction` computes exactly that without a second statistics pass: the forward is one statistics
pass (which also feeds the running estimate) plus one element-wise pass, the backward is one call of
training BN's backward kernel, so a step costs what a Tent step costs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from gprebn_edge.methods.blocks import recomputing
from gprebn_edge.methods.stats import StatsConfig, batch_stats, mix, update_running

__all__ = ["GpreBatchNorm", "gprebn_function", "swap_in", "swap_out", "gprebn_layers"]


class _GpreBNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, batch_mean, batch_var, eps):  # type: ignore[override]
        ctx.eps = eps
        ctx.save_for_backward(x, weight, mean, var, batch_mean, batch_var)
        return F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, mean, var, batch_mean, batch_var = ctx.saved_tensors
        inv_sigma = torch.rsqrt(var + ctx.eps)
        batch_invstd = torch.rsqrt(batch_var + ctx.eps)
        ratio = inv_sigma / batch_invstd                       # sigma_B / sigma
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_out.contiguous(), x, weight * ratio, None, None, batch_mean, batch_invstd, True, ctx.eps,
            [ctx.needs_input_grad[0], True, True])
        # d y / d gamma = x_hat * sigma_B / sigma + (mu_B - mu) / sigma = (x - mu) / sigma
        grad_weight = grad_w * ratio + grad_b * (batch_mean - mean) * inv_sigma
        return grad_x, grad_weight, grad_b, None, None, None, None, None


def gprebn_function(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                    var: torch.Tensor, batch_mean: torch.Tensor, batch_var: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """The GpreBN normalization given the dataset-level (mean, var) and the batch's (mean, biased var)."""
    return _GpreBNFunction.apply(x, weight, bias, mean, var, batch_mean, batch_var, eps)


class GpreBatchNorm(nn.Module):
    """Replaces one BatchNorm1d/2d/3d while adapting. Keeps the BN's parameter names (weight, bias), the
    frozen source statistics, and the running target estimate; `to_batchnorm()` gives the static BN back."""

    source_mean: torch.Tensor
    source_var: torch.Tensor
    target_mean: torch.Tensor
    target_var: torch.Tensor

    def __init__(self, bn: _BatchNorm, config: StatsConfig) -> None:
        super().__init__()
        assert bn.affine and bn.running_mean is not None and bn.running_var is not None
        self.bn_class = type(bn)
        self.num_features = bn.num_features
        self.eps = bn.eps
        self.bn_momentum = bn.momentum
        self.config = config
        self.weight = bn.weight
        self.bias = bn.bias
        self.register_buffer("source_mean", bn.running_mean.detach().clone())
        self.register_buffer("source_var", bn.running_var.detach().clone())
        self.register_buffer("target_mean", bn.running_mean.detach().clone())
        self.register_buffer("target_var", bn.running_var.detach().clone())
        self.seen = 0  # items the target estimate has absorbed; a Python int (saved as extra state)
        self.adapting = True
        # what the last gradient-mode forward normalized with: a checkpointed block's recomputation in the
        # backward (blocks.py) uses it again instead of updating the estimate a second time
        self._used: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, {self.config}"

    def restart(self) -> None:
        """Forget the target estimate (the next batch starts it afresh)."""
        self.target_mean.copy_(self.source_mean)
        self.target_var.copy_(self.source_var)
        self.seen = 0

    def get_extra_state(self) -> dict:
        return {"seen": self.seen}

    def set_extra_state(self, state: dict) -> None:
        self.seen = int(state["seen"])

    def dataset_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        theta = self.config.theta
        return mix(self.target_mean, self.source_mean, theta), mix(self.target_var, self.source_var, theta)

    def _update(self, batch_mean: torch.Tensor, batch_var: torch.Tensor, n: int) -> None:
        mean, var = update_running(self.target_mean, self.target_var, batch_mean, batch_var,
                                   self.config.rate(n, self.seen))
        if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():  # dynamo cannot trace it
            # in place: new tensors made here would be inference tensors, which a later gradient-mode
            # forward or load_state_dict could not use; no autograd graph can hold the old values here
            self.target_mean.copy_(mean)
            self.target_var.copy_(var)
        else:
            # out of place: tensors an autograd graph saved from the previous forward are never modified
            self.target_mean, self.target_var = mean, var
        self.seen += n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected (N, {self.num_features}, ...) input, got {tuple(x.shape)}")
        if not self.adapting:
            mean, var = self.dataset_stats()
            return F.batch_norm(x, mean, var, self.weight, self.bias, training=False, eps=self.eps)
        # a compiled step never checkpoints blocks: keep the thread-local flag and the stored tensors out of
        # the graph (dynamo would guard on them and recompile at every step)
        compiling = torch.compiler.is_compiling()
        if not compiling and recomputing() and self._used is not None:
            used_mean, used_var, used_batch_mean, used_batch_var = self._used
            return gprebn_function(x, self.weight, self.bias, used_mean, used_var, used_batch_mean, used_batch_var,
                                   self.eps)
        batch_mean, batch_var = batch_stats(x.detach())
        n = x.shape[0]
        # "after" normalizes with the estimate so far, which does not exist before the first batch
        before = self.config.order == "before" or (self.seen == 0 and self.config.init == "first")
        if before:
            self._update(batch_mean, batch_var, n)
        mean, var = self.dataset_stats()
        if not before:
            self._update(batch_mean, batch_var, n)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            if not compiling:
                self._used = (mean, var, batch_mean, batch_var)
            return gprebn_function(x, self.weight, self.bias, mean, var, batch_mean, batch_var, self.eps)
        return F.batch_norm(x, mean, var, self.weight, self.bias, training=False, eps=self.eps)

    @torch.no_grad()
    def to_batchnorm(self) -> _BatchNorm:
        """A static, eval-mode BN of the original class: running statistics = the dataset-level ones."""
        bn = self.bn_class(self.num_features, eps=self.eps, momentum=self.bn_momentum)
        bn = bn.to(device=self.weight.device, dtype=self.weight.dtype)
        mean, var = self.dataset_stats()
        assert bn.running_mean is not None and bn.running_var is not None and bn.num_batches_tracked is not None
        bn.weight.copy_(self.weight)
        bn.bias.copy_(self.bias)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.num_batches_tracked.fill_(self.seen)
        return bn.eval()


def swap_in(model: nn.Module, config: StatsConfig) -> nn.Module:
    """In place: every BatchNorm becomes a GpreBatchNorm under the same name. Returns the model."""
    for name, child in model.named_children():
        if isinstance(child, _BatchNorm):
            setattr(model, name, GpreBatchNorm(child, config))
        else:
            swap_in(child, config)
    return model


def swap_out(model: nn.Module) -> nn.Module:
    """In place: every GpreBatchNorm becomes its static BatchNorm again. Returns the model."""
    for name, child in model.named_children():
        if isinstance(child, GpreBatchNorm):
            setattr(model, name, child.to_batchnorm())
        else:
            swap_out(child)
    return model


def gprebn_layers(model: nn.Module) -> list[tuple[str, GpreBatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GpreBatchNorm)]
