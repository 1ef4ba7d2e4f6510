"""JumpReLU SAE (Rajamanoharan et al. 2024): code_j = pre_j * H(pre_j - theta_j), learned thresholds,
trained with a direct L0 penalty through straight-through estimators (STEs).

Neither the step H nor the L0 count has a useful gradient with respect to theta, so both use the
paper's pseudo-derivative: a rectangle kernel of width eps = jumprelu_bandwidth around the threshold,

    d/dtheta JumpReLU(z)  = -(theta / eps) * rect((z - theta) / eps)
    d/dtheta H(z - theta) = -(1 / eps)     * rect((z - theta) / eps)

with rect(u) = 1 for |u| < 1/2. The gradient with respect to z is the ordinary one for JumpReLU
(H(z - theta)) and zero for the L0 step (the L0 penalty trains thresholds only, as in the paper).

theta = exp(log_threshold) keeps every threshold positive and makes Adam's steps multiplicative: each
step changes theta by about the same factor whatever its scale, so a threshold initialized at 1e-3 and
one grown to the O(1) scale of normalized pre-activations move at the same relative rate. Thresholds
only get gradient from pre-activations within eps/2 of them, so eps must not be tiny next to the
spread of pre-activations near the threshold, or the thresholds barely move.

Units: inputs are normalized to E||x||^2 = d, so useful thresholds and the spread of pre-activations
around them are O(1); paper values such as theta = eps = 1e-3 belong to another normalization and are
far too small here (the thresholds then get almost no gradient). Adam moves the log-threshold by ~lr
per step, a factor of ~3 over a 600-step run, while the encoder columns change ~sqrt(d) times faster
relative to their size; so the thresholds get their own learning-rate multiplier
(``jumprelu_threshold_lr_scale``, via ``lr_scales``), without which the encoder adapts around frozen
thresholds and l0_coefficient barely matters. The initial threshold defaults to sqrt(l0_coefficient),
the activation at which firing pays for its L0 cost.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from saekit.autoencoders.base import Output, register
from saekit.autoencoders.sae import SparseAutoencoder
from saekit.config import ModelConfig


def _rect(u: Tensor) -> Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre_BN: Tensor, theta_N: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre_BN, theta_N)
        ctx.eps = eps
        return pre_BN * (pre_BN > theta_N)

    @staticmethod
    def backward(ctx, g_BN: Tensor):
        pre_BN, theta_N = ctx.saved_tensors
        g_pre = g_BN * (pre_BN > theta_N)
        g_theta = (-(theta_N / ctx.eps) * _rect((pre_BN - theta_N) / ctx.eps) * g_BN).sum(0)
        return g_pre, g_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre_BN: Tensor, theta_N: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre_BN, theta_N)
        ctx.eps = eps
        return (pre_BN > theta_N).to(pre_BN.dtype)

    @staticmethod
    def backward(ctx, g_BN: Tensor):
        pre_BN, theta_N = ctx.saved_tensors
        g_theta = (-(1.0 / ctx.eps) * _rect((pre_BN - theta_N) / ctx.eps) * g_BN).sum(0)
        return None, g_theta, None


@register("jumprelu")
class JumpReLUSAE(SparseAutoencoder):
    """Config: n_latents, jumprelu_threshold (initial theta; default sqrt(l0_coefficient)),
    jumprelu_bandwidth (eps, in normalized units), l0_coefficient. Loss parts: "mse", "l0" = l0_coefficient * sparsity_scale * mean over
    tokens of the number of active latents (STE gradient to the thresholds)."""

    def __init__(self, d_in: int, cfg: ModelConfig):
        super().__init__(d_in, cfg)
        self.log_threshold = nn.Parameter(torch.full((cfg.n_latents,), math.log(self.initial_threshold(cfg))))

    @staticmethod
    def initial_threshold(cfg: ModelConfig) -> float:
        """``jumprelu_threshold``, or by default sqrt(l0_coefficient): the activation at which a latent
        with a unit-norm decoder row removes as much squared error as the L0 penalty charges for it."""
        if cfg.jumprelu_threshold is not None:
            theta = cfg.jumprelu_threshold
        else:
            theta = math.sqrt(cfg.l0_coefficient)
        if not theta > 0:
            raise ValueError(f"the initial JumpReLU threshold must be positive, got {theta} (set "
                             "jumprelu_threshold, or a positive l0_coefficient)")
        return theta

    def lr_scales(self) -> dict[str, float]:
        return {"log_threshold": self.cfg.jumprelu_threshold_lr_scale}

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def encode(self, x: Tensor) -> Tensor:
        pre_BN = self.pre_acts(self.scale_in(x))
        return _JumpReLU.apply(pre_BN, self.threshold, self.cfg.jumprelu_bandwidth)

    def forward(self, x: Tensor) -> Output:
        x_n_BD = self.scale_in(x)
        pre_BN = self.pre_acts(x_n_BD)
        theta_N, eps = self.threshold, self.cfg.jumprelu_bandwidth
        code_BN = _JumpReLU.apply(pre_BN, theta_N, eps)
        l0_B = _Step.apply(pre_BN, theta_N, eps).sum(-1)
        l0 = self.cfg.l0_coefficient * self.sparsity_scale * l0_B.mean()
        return self._output_dense(x_n_BD, code_BN, {"l0": l0})
