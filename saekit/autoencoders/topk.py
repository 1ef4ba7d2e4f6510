"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per token, ReLU'd; AuxK for dead latents.

Decoder rows are unit norm (see ``AuxKSAE``). Output is sparse (indices, values [B, k]; code=None).
The step runs on the sparse kernels in kernels.py; how (chunking, top-k method, backend, or the dense
reference with ``fast_path: false``) is the run's ``KernelOptions``, handed over by ``use_kernels``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from saekit.autoencoders.base import Output, register
from saekit.autoencoders.kernels import topk_encode, topk_sae_fast, topk_sae_naive
from saekit.autoencoders.sae import AuxKConfig, AuxKSAE, auxk_loss
from saekit.metrics import mse


@dataclass
class TopKConfig(AuxKConfig):
    """n_latents, k, auxk_latents, auxk_alpha, decoder_init: nothing of its own beyond AuxKConfig."""


@register("topk", TopKConfig)
class TopKSAE(AuxKSAE):
    sparse_encoder = True

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Raw x [B, d] -> (indices [B, k], values [B, k]), indices ascending within each row. The
        pre-activations are computed in chunks (never all [B, n] at once), and gradients flow through
        the sparse backward."""
        vals_BK, idx_BK, _ = topk_encode(self.scale_in(x), self.weights, self.cfg.k, opts=self.kernels)
        return idx_BK, vals_BK

    def encode(self, x: Tensor) -> Tensor:
        idx_BK, vals_BK = self.encode_sparse(x)
        return vals_BK.new_zeros(x.shape[0], self.n_latents).scatter_(1, idx_BK, vals_BK)

    def forward(self, x: Tensor) -> Output:
        x_n_BD = self.scale_in(x)
        step = topk_sae_fast if self.kernels.fast_path else topk_sae_naive
        r = step(x_n_BD, self.weights, self.cfg.k, self.dead_ids(), self.auxk_latents, self.kernels)
        x_hat_n_BD = r.xhat_BD + self.b_dec
        losses = {"mse": mse(x_n_BD, x_hat_n_BD),
                  "auxk": auxk_loss(x_n_BD - x_hat_n_BD.detach(), r.ehat_BD, self.cfg.auxk_alpha)}
        return Output(x_hat=self.scale_out(x_hat_n_BD), indices=r.idx_BK, values=r.vals_BK, losses=losses)
