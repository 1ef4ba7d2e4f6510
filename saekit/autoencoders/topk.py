"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per token, ReLU'd; AuxK for dead latents.

Decoder rows are unit norm: before each optimizer step the gradient component along each row is
removed, after it the rows are renormalized. Output is sparse (indices, values [B, k]; code=None).
By default the step runs on the sparse kernels in kernels.py; ``ModelConfig.fast_path = False`` runs
the dense reference instead (same math, for tests and the benchmark).
"""
from __future__ import annotations

from torch import Tensor

from saekit.autoencoders.base import Output, register
from saekit.autoencoders.kernels import (BACKENDS, TOPK_METHODS, resolve_backend, sparse_decode, topk_encode,
                                         topk_sae_fast, topk_sae_naive)
from saekit.autoencoders.sae import (SparseAutoencoder, auxk_loss, mse, normalize_rows_,
                                     remove_parallel_grad_)
from saekit.config import ModelConfig


@register("topk")
class TopKSAE(SparseAutoencoder):
    """Config: n_latents, k, auxk_k (default d_in // 2), auxk_alpha, fast_path, chunk_tokens,
    sparse_kernels, topk_method."""

    def __init__(self, d_in: int, cfg: ModelConfig):
        super().__init__(d_in, cfg)
        if cfg.sparse_kernels not in BACKENDS:
            raise ValueError(f"unknown sparse_kernels '{cfg.sparse_kernels}'; valid: {', '.join(BACKENDS)}")
        if cfg.topk_method not in TOPK_METHODS:
            raise ValueError(f"unknown topk_method '{cfg.topk_method}'; valid: {', '.join(TOPK_METHODS)}")

    def _backend(self, t: Tensor) -> str:
        # Resolved per call, not at build: a model trained on triton kernels loads and runs anywhere.
        return resolve_backend(self.cfg.sparse_kernels, t.device)

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Raw x [B, d] -> (indices [B, k], values [B, k]), indices ascending within each row. The
        pre-activations are computed in chunks (never all [B, n] at once), and gradients flow through
        the sparse backward."""
        vals_BK, idx_BK, _ = topk_encode(self.scale_in(x), self.b_dec, self.W_enc, self.b_enc, self.cfg.k,
                                         chunk=self.cfg.chunk_tokens, backend=self._backend(x),
                                         topk_method=self.cfg.topk_method)
        return idx_BK, vals_BK

    def encode(self, x: Tensor) -> Tensor:
        idx_BK, vals_BK = self.encode_sparse(x)
        return vals_BK.new_zeros(x.shape[0], self.n_latents).scatter_(1, idx_BK, vals_BK)

    def decode_sparse(self, idx_BK: Tensor, vals_BK: Tensor) -> Tensor:
        return self.scale_out(sparse_decode(idx_BK, vals_BK, self.W_dec, self._backend(vals_BK)) + self.b_dec)

    def forward(self, x: Tensor) -> Output:
        x_n_BD = self.scale_in(x)
        step = topk_sae_fast if self.cfg.fast_path else topk_sae_naive
        r = step(x_n_BD, self.b_dec, self.W_enc, self.b_enc, self.W_dec, self.cfg.k, self.dead_ids(),
                 self.auxk_k, self.cfg.chunk_tokens, self._backend(x), self.cfg.topk_method)
        x_hat_n_BD = r.xhat_BD + self.b_dec
        losses = {"mse": mse(x_n_BD, x_hat_n_BD),
                  "auxk": auxk_loss(x_n_BD - x_hat_n_BD.detach(), r.ehat_BD, self.cfg.auxk_alpha)}
        return Output(x_hat=self.scale_out(x_hat_n_BD), indices=r.idx_BK, values=r.vals_BK, losses=losses)

    def before_optimizer_step(self) -> None:
        remove_parallel_grad_(self.W_dec)

    def after_optimizer_step(self) -> None:
        normalize_rows_(self.W_dec)

