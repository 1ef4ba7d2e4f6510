"""Gated SAE (Rajamanoharan et al. 2024): which latents fire and how strongly are estimated separately.

With x_c = x_n - b_dec (normalized units), and the magnitude path tied to the gate by a per-latent
rescaling, W_mag[:, j] = exp(r_mag_j) * W_gate[:, j]:

    pi_gate = x_c @ W_gate + b_gate            f_gate = 1[pi_gate > 0]
    f_mag   = relu(x_c @ W_mag + b_mag)        code   = f_gate * f_mag
    x_hat_n = code @ W_dec + b_dec

W_gate and b_gate are the SAE base's W_enc and b_enc. The step f_gate passes no gradient, so the gate
learns from the two extra loss parts only: "l1" = l1_coefficient * sparsity_scale * mean_tokens
sum_j relu(pi_gate_j) (decoder rows are unit norm, so no norm weighting is needed), and "aux" =
|| x_n - (relu(pi_gate) @ W_dec' + b_dec') ||^2 through a frozen (detached) copy of the decoder, which
teaches relu(pi_gate) to reconstruct on its own without pulling the decoder towards the gate's scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saekit.autoencoders.base import Output, register
from saekit.autoencoders.sae import SAEConfig, SparseAutoencoder, normalize_rows_, remove_parallel_grad_
from saekit.metrics import mse
from saekit.schema import value


@dataclass
class GatedConfig(SAEConfig):
    l1_coefficient: float = value(1.0, ge=0)  # weight of the L1 penalty on relu(pi_gate)


@register("gated", GatedConfig)
class GatedSAE(SparseAutoencoder):
    def __init__(self, d_in: int, cfg: GatedConfig):
        super().__init__(d_in, cfg)
        self.r_mag = nn.Parameter(torch.zeros(cfg.n_latents))  # W_mag = exp(r_mag) * W_gate: tied at init
        self.b_mag = nn.Parameter(torch.zeros(cfg.n_latents))

    def _paths(self, x_n_BD: Tensor) -> tuple[Tensor, Tensor]:
        """(pi_gate, code) of normalized inputs."""
        # x_c @ (W_gate * exp(r_mag)) == (x_c @ W_gate) * exp(r_mag): one GEMM serves both paths.
        proj_BN = (x_n_BD - self.b_dec) @ self.W_enc
        pi_gate_BN = proj_BN + self.b_enc
        f_mag_BN = (proj_BN * self.r_mag.exp() + self.b_mag).relu()
        return pi_gate_BN, (pi_gate_BN > 0).to(f_mag_BN.dtype) * f_mag_BN

    def encode(self, x: Tensor) -> Tensor:
        return self._paths(self.scale_in(x))[1]

    def forward(self, x: Tensor) -> Output:
        x_n_BD = self.scale_in(x)
        pi_gate_BN, code_BN = self._paths(x_n_BD)
        gate_BN = pi_gate_BN.relu()
        x_hat_n_BD = code_BN @ self.W_dec + self.b_dec
        frozen_BD = gate_BN @ self.W_dec.detach() + self.b_dec.detach()
        losses = {"mse": mse(x_n_BD, x_hat_n_BD),
                  "l1": self.cfg.l1_coefficient * self.sparsity_scale * gate_BN.sum(-1).mean(),
                  "aux": mse(x_n_BD, frozen_BD)}
        return Output(x_hat=self.scale_out(x_hat_n_BD), code=code_BN, losses=losses)

    def before_optimizer_step(self) -> None:
        remove_parallel_grad_(self.W_dec)

    def after_optimizer_step(self) -> None:
        normalize_rows_(self.W_dec)
