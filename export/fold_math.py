"""BatchNorm folding maths: tensors in, tensors out (the module plumbing lives apart, as in torch's
`fuse_conv_bn_weights` / `fuse_conv_bn_eval`). Both folding paths, torch.fx (fold.py) and ONNX
(onnx_fold.py), call `fold_bn`, so they give bit-identical weights.

An eval-mode BN after a linear op z = W x + b computes y = s (z - mu) + beta with s = gamma / sqrt(var + eps)
per output channel, so it folds exactly into W' = s W (scaled along the output channels) and
b' = s (b - mu) + beta. Where the output channels sit in W depends on the op:

- Conv1d/2d/3d (grouped and depthwise included) and Linear: weight (C_out, C_in / groups, *k) or
  (out, in): output channels on dim 0.
- ConvTranspose1d/2d/3d: weight (C_in, C_out / groups, *k); output channel g * (C_out / groups) + j is
  column j of the rows of group g, so the scale is applied per (group, column).

Everything is computed in float64 and rounded once, to the weight's dtype: computing in float32 rounds
the scale, then the product, and lands one ulp away from the float64 result on a large share of weights.
"""

from __future__ import annotations

import torch

__all__ = ["bn_scale_shift", "fold_bn"]


def bn_scale_shift(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) with BN(z) = s * z + t per channel, in the inputs' dtype."""
    scale = weight * torch.rsqrt(var + eps)
    return scale, bias - mean * scale


def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor,
            bn_weight: torch.Tensor, bn_bias: torch.Tensor, eps: float, *, transposed: bool = False,
            groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BN into the op before it. Returns (weight, bias), both of `weight`'s dtype,
    computed in float64; the bias always exists.

    transposed: the op is a ConvTranspose (weight (C_in, C_out / groups, *k)) with `groups` groups."""
    mu, sigma2, gamma, beta = (t.detach().to(torch.float64) for t in (mean, var, bn_weight, bn_bias))
    scale, shift = bn_scale_shift(mu, sigma2, gamma, beta, eps)
    w = weight.detach().to(torch.float64)
    if transposed:
        c_in, c_out_per_group = w.shape[:2]
        kernel = w.shape[2:]
        if groups < 1 or c_in % groups or scale.numel() != groups * c_out_per_group:
            raise ValueError(f"ConvTranspose weight {tuple(w.shape)} with groups={groups} does not match "
                             f"{scale.numel()} BN channels")
        grouped = w.reshape(groups, c_in // groups, c_out_per_group, *kernel)
        s = scale.reshape(groups, 1, c_out_per_group, *([1] * len(kernel)))
        new_weight = (grouped * s).reshape(w.shape)
    else:
        if w.shape[0] != scale.numel():
            raise ValueError(f"weight {tuple(w.shape)} has {w.shape[0]} output channels, BN has "
                             f"{scale.numel()}")
        new_weight = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    base = bias.detach().to(torch.float64) if bias is not None else torch.zeros_like(scale)
    if base.shape != scale.shape:
        raise ValueError(f"bias of shape {tuple(base.shape)} is not one value per output channel "
                         f"({scale.numel()})")
    return new_weight.to(weight.dtype), (base * scale + shift).to(weight.dtype)
