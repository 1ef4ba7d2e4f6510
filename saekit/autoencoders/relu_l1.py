"""ReLU SAE with an L1 penalty weighted by decoder norms (Anthropic, "Towards Monosemanticity" and the
April 2024 update): the decoder is unconstrained, and weighting |code_j| by ||W_dec_j|| stops the
optimizer from shrinking codes while growing decoder rows to dodge the penalty.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from saekit.autoencoders.base import Output, register
from saekit.autoencoders.sae import SAEConfig, SparseAutoencoder
from saekit.schema import value


@dataclass
class ReLUConfig(SAEConfig):
    l1_coefficient: float = value(5.0, ge=0)  # weight of the decoder-norm-weighted L1 penalty


@register("relu", ReLUConfig)
class ReLUSAE(SparseAutoencoder):
    """Loss parts: "mse", "l1" = l1_coefficient * sparsity_scale * mean over tokens of
    sum_j |code_j| * ||W_dec_j||."""

    def encode(self, x: Tensor) -> Tensor:
        return self.pre_acts(self.scale_in(x)).relu()

    def forward(self, x: Tensor) -> Output:
        x_n_BD = self.scale_in(x)
        code_BN = self.pre_acts(x_n_BD).relu()
        weighted_l1_B = code_BN @ self.W_dec.norm(dim=-1)  # code >= 0, so |code_j| = code_j
        l1 = self.cfg.l1_coefficient * self.sparsity_scale * weighted_l1_B.mean()
        return self._output_dense(x_n_BD, code_BN, {"l1": l1})
