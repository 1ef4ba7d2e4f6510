"""JumpReLU SAE (Rajamanoharan et al. 2024): code_j = pre_j * H(pre_j - theta_j), learned thresholds,
trained with a direct L0 penalty through straight-through estimators (STEs).

Neither the step H nor the L0 count has a useful gradient with respect to theta, so both use the
paper's pseudo-derivative: a rectangle kernel of width eps = ``bandwidth`` around the threshold,

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
(``threshold_lr_scale``, via ``lr_scales``), without which the encoder adapts around frozen
thresholds and l0_coefficient barely matters. The initial threshold defaults to sqrt(l0_coefficient),
the activation at which firing pays for its L0 cost.

The step runs on sparse kernels (sparse_paths.py) while the pattern is sparse: the code's entries plus
the "probe" entries within eps/2 below each threshold, where the code is 0 but the threshold's
pseudo-derivative needs the output gradient; both pseudo-derivatives are applied exactly as below.
Above ``SPARSE_MAX_DENSITY`` of [B, n] in that pattern (at init, or with a wide band) the dense step
is faster and runs instead; ``kernels.fast_path: false`` always runs it (``forward_dense``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saekit.autoencoders.base import Output, register
from saekit.autoencoders.sae import SAEConfig, SparseAutoencoder
from saekit.autoencoders.sparse_paths import Rule, padded, pattern_density, sparse_sae
from saekit.metrics import mse
from saekit.schema import FieldError, value


@dataclass
class JumpReLUConfig(SAEConfig):
    """All in normalized units (E||x||^2 = d, so pre-activations are O(1), not O(1e-3))."""

    # A latent firing at value c with a unit-norm decoder row removes at most c^2 of squared error and
    # costs l0_coefficient, so sqrt(l0_coefficient) is the break-even threshold, where the initial
    # threshold starts by default. On the built-in store (6144 latents, 600k tokens) 0.3 gives L0 ~35,
    # 0.5 ~25, 2.0 ~9.
    l0_coefficient: float = value(0.3, ge=0)
    initial_threshold: float | None = value(None, gt=0)  # None: sqrt(l0_coefficient)
    bandwidth: float = value(1.0, gt=0)  # STE kernel width: enough pre-activations near theta give it gradient
    # Learning-rate multiplier of the log-thresholds: Adam moves each by ~lr per step, while an encoder
    # column (unit norm, entries ~1/sqrt(d)) changes by ~lr*sqrt(d) relative to itself; without it the
    # thresholds cannot keep up with the encoder and the L0 coefficient barely acts in a short run.
    threshold_lr_scale: float = value(10.0, gt=0)

    RENAMED = {"jumprelu_threshold": "initial_threshold", "jumprelu_bandwidth": "bandwidth",
               "jumprelu_threshold_lr_scale": "threshold_lr_scale"}

    def validate(self) -> None:
        if self.initial_threshold is None and self.l0_coefficient <= 0:
            raise FieldError("initial_threshold", "is needed when l0_coefficient is 0 (the default initial "
                             "threshold is sqrt(l0_coefficient), which must be positive)")


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


@register("jumprelu", JumpReLUConfig)
class JumpReLUSAE(SparseAutoencoder):
    """Loss parts: "mse", "l0" = l0_coefficient * sparsity_scale * mean over tokens of the number of
    active latents (STE gradient to the thresholds)."""

    def __init__(self, d_in: int, cfg: JumpReLUConfig):
        super().__init__(d_in, cfg)
        self.log_threshold = nn.Parameter(torch.full((cfg.n_latents,), math.log(self.initial_threshold(cfg))))

    @staticmethod
    def initial_threshold(cfg: JumpReLUConfig) -> float:
        """``initial_threshold``, or by default sqrt(l0_coefficient): the activation at which a latent
        with a unit-norm decoder row removes as much squared error as the L0 penalty charges for it."""
        return cfg.initial_threshold if cfg.initial_threshold is not None else math.sqrt(cfg.l0_coefficient)

    def lr_scales(self) -> dict[str, float]:
        return {"log_threshold": self.cfg.threshold_lr_scale}

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def encode(self, x: Tensor) -> Tensor:
        pre_BN = self.pre_acts(self.scale_in(x))
        return _JumpReLU.apply(pre_BN, self.threshold, self.cfg.bandwidth)

    def forward(self, x: Tensor) -> Output:
        if not self.use_sparse_step():
            return self.forward_dense(x)
        x_n_BD = self.scale_in(x)
        theta_N, eps = self.threshold, self.cfg.bandwidth
        r = sparse_sae(x_n_BD, self.weights, Rule("jumprelu", eps=eps), self.kernels.on(x.device), theta_N=theta_N)
        self.pattern_density = pattern_density(r.enc, self.n_latents)
        l0 = self.cfg.l0_coefficient * self.sparsity_scale * r.enc.l0_B.mean()
        x_hat_n_BD = r.xhat_BD + self.b_dec
        idx, vals = padded(r.enc.p, r.enc.vals_E)
        return Output(x_hat=self.scale_out(x_hat_n_BD), indices=idx, values=vals,
                      losses={"mse": mse(x_n_BD, x_hat_n_BD), "l0": l0}, n_latents=self.n_latents)

    def forward_dense(self, x: Tensor) -> Output:
        x_n_BD = self.scale_in(x)
        pre_BN = self.pre_acts(x_n_BD)
        theta_N, eps = self.threshold, self.cfg.bandwidth
        if self.kernels.fast_path:  # the sparse pattern's size, to know when to switch
            with torch.no_grad():
                self.pattern_density = ((pre_BN > theta_N - eps / 2).sum() / pre_BN.numel()).item()
        code_BN = _JumpReLU.apply(pre_BN, theta_N, eps)
        l0_B = _Step.apply(pre_BN, theta_N, eps).sum(-1)
        l0 = self.cfg.l0_coefficient * self.sparsity_scale * l0_B.mean()
        return self._output_dense(x_n_BD, code_BN, {"l0": l0})
