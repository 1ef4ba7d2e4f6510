"""ReLU SAE with an L1 penalty weighted by decoder norms (Anthropic, "Towards Monosemanticity" and the
April 2024 update): the decoder is unconstrained, and weighting |code_j| by ||W_dec_j|| stops the
optimizer from shrinking codes while growing decoder rows to dodge the penalty.

Once the code is sparse (the L1 warm-up makes it so) the step runs on sparse kernels (sparse_paths.py:
the entries pre > 0 as CSR by token, sparse decode and backward); while more than
``SPARSE_MAX_DENSITY`` of [B, n] is active the dense step is faster and runs instead
(``forward_dense``, always with ``kernels.fast_path: false``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.autoencoders.base import Output, register
from saekit.autoencoders.sae import SAEConfig, SparseAutoencoder
from saekit.autoencoders.sparse_paths import Rule, padded, pattern_density, sparse_sae
from saekit.metrics import mse
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
        if not self.use_sparse_step():
            return self.forward_dense(x)
        x_n_BD = self.scale_in(x)
        r = sparse_sae(x_n_BD, self.weights, Rule("above", lo=0.0), self.kernels.on(x.device))
        self.pattern_density = pattern_density(r.enc, self.n_latents)
        p, vals_E = r.enc.p, r.enc.vals_E
        weighted_l1 = (vals_E * self.W_dec.norm(dim=-1)[p.col]).sum() / x.shape[0]
        l1 = self.cfg.l1_coefficient * self.sparsity_scale * weighted_l1
        x_hat_n_BD = r.xhat_BD + self.b_dec
        idx, vals = padded(p, vals_E)
        return Output(x_hat=self.scale_out(x_hat_n_BD), indices=idx, values=vals,
                      losses={"mse": mse(x_n_BD, x_hat_n_BD), "l1": l1}, n_latents=self.n_latents)

    def forward_dense(self, x: Tensor) -> Output:
        x_n_BD = self.scale_in(x)
        code_BN = self.pre_acts(x_n_BD).relu()
        if self.kernels.fast_path:  # the sparse pattern's size, to know when to switch
            with torch.no_grad():
                self.pattern_density = ((code_BN > 0).sum() / code_BN.numel()).item()
        weighted_l1_B = code_BN @ self.W_dec.norm(dim=-1)  # code >= 0, so |code_j| = code_j
        l1 = self.cfg.l1_coefficient * self.sparsity_scale * weighted_l1_B.mean()
        return self._output_dense(x_n_BD, code_BN, {"l1": l1})
