"""Statistics of a data sample that set up a model before training: input scale and decoder bias."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from saekit.schema import check_choice


def input_scale(x: Tensor) -> float:
    """The s with E‖s·x‖² = d, so loss coefficients and learning rates transfer across models/layers."""
    mean_sq_norm = x.double().square().sum(-1).mean().item()
    return math.sqrt(x.shape[-1] / mean_sq_norm) if mean_sq_norm > 0 else 1.0


def geometric_median(x: Tensor, iters: int = 32, eps: float = 1e-8) -> Tensor:
    """Weiszfeld's iterations from the mean: the point minimizing the summed distances to the rows.

    Less pulled by outlier tokens (e.g. the first position's huge norms) than the mean.
    """
    x = x.double()
    median = x.mean(0)
    for _ in range(iters):
        weights = 1.0 / (x - median).norm(dim=-1).clamp_min(eps)
        new = (weights[:, None] * x).sum(0) / weights.sum()
        if (new - median).norm() <= 1e-7 * median.norm().clamp_min(eps):
            median = new
            break
        median = new
    return median


def decoder_bias(x: Tensor, method: str) -> Tensor:
    """Initial decoder bias in raw activation units: "geometric_median", "mean" or "zeros" (the
    choices of TrainConfig.b_dec_init)."""
    check_choice(method, ("geometric_median", "mean", "zeros"), "b_dec_init")
    if method == "geometric_median":
        return geometric_median(x).to(x.dtype)
    if method == "mean":
        return x.double().mean(0).to(x.dtype)
    return torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device)
