"""Transcoders (Dunefsky et al. 2024) and skip transcoders (Paulo et al. 2025): a TopK dictionary that
predicts a *target* activation y (an MLP's output) from an *input* activation x (that MLP's input),

    x_c     = x * input_scale - b_in                 b_in [d_in]: the inputs' mean, fixed at init
    pre     = x_c @ W_enc + b_enc                    W_enc [d_in, n], b_enc [n]
    code    = ReLU(TopK_k(pre))
    y_hat_n = code @ W_dec + b_dec                   W_dec [n, d_out] (unit rows), b_dec [d_out]
            (+ x_c @ W_skip, skip transcoder)        W_skip [d_in, d_out], zero at init
    y_hat   = y_hat_n / output_scale

with the loss parts on the normalized target y_n = y * output_scale: "mse" = ||y_n - y_hat_n||^2 (summed
over d_out, averaged over tokens, as every family's) and "auxk" (the dead latents' top auxk_latents
pre-activations decode the prediction's residual y_n - y_hat_n, as for TopK). Both scales are set by
the trainer from the first batches (E||x_n||^2 = d_in, E||y_n||^2 = d_out) and saved in the model, so
it works on raw activations. b_in is not trained (b_enc absorbs any shift of it); it only centers the
inputs, the role b_dec plays on an SAE's input side.

One interface with the SAEs: ``forward(x, target)`` returns an ``Output`` whose ``x_hat`` is the
prediction y_hat and whose losses measure it against ``target`` (without a target, e.g. when spliced
into the LM, no losses). ``predicts_target`` tells the trainer and the evaluation to pass targets.
``encode`` and ``encode_sparse`` read the input, so analysis shows input contexts; ``decode(code)`` is
the dictionary part ``code @ W_dec + b_dec`` (no skip path: it needs x), whose per-latent directions are
the decoder rows, the predicted output directions the output lens reads.

The step is the TopK fast path of kernels.py (``topk_sae_fast`` with ``b_in`` as the input center):
one encoder GEMM, then O(k·d) per token; no dense [batch x latents] decode. The skip path adds one
[d_in, d_out] GEMM per token (2·d_in·d_out FLOP, 1/16 of the encoder's at n = 16·d).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saekit.autoencoders.base import Autoencoder, Output, register
from saekit.autoencoders.kernels import SAEWeights, topk_encode, topk_sae_fast, topk_sae_naive
from saekit.autoencoders.sae import AuxKConfig, auxk_loss, normalize_rows_, remove_parallel_grad_
from saekit.metrics import mse
from saekit.schema import value


@dataclass
class TranscoderConfig(AuxKConfig):
    """AuxKConfig (n_latents, k, auxk_latents, auxk_alpha, decoder_init) plus the target's width.

    ``decoder_init: data`` points latent j's encoder column at a centered sample input and its decoder
    row at that sample's centered target (a latent starts as "inputs like this one give outputs like
    that one"); ``random``: independent random unit vectors. ``auxk_latents`` defaults to d_out // 2."""

    d_out: int | None = value(None, ge=1)  # the target's width; None: the training data's (an MLP: d_in)


@dataclass
class SkipTranscoderConfig(TranscoderConfig):
    """TranscoderConfig; the model adds the learned linear skip path W_skip (zero at init)."""


@register("transcoder", TranscoderConfig)
class Transcoder(Autoencoder):
    sparse_encoder = True
    predicts_target = True
    skip = False

    def __init__(self, d_in: int, cfg: TranscoderConfig):
        super().__init__(d_in, cfg)
        self.d_out = d_out = cfg.d_out or d_in
        n = cfg.n_latents
        W_dec_ND = torch.randn(n, d_out)
        W_dec_ND /= W_dec_ND.norm(dim=-1, keepdim=True)
        W_enc_DN = torch.randn(d_in, n)
        W_enc_DN /= W_enc_DN.norm(dim=0, keepdim=True)
        self.W_enc = nn.Parameter(W_enc_DN)
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(W_dec_ND)
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        if self.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_in, d_out))
        self.register_buffer("b_in", torch.zeros(d_in))
        self.register_buffer("output_scale", torch.ones(()))
        self.sparsity_scale = 1.0
        self.dead_mask: Tensor | None = None

    # --- pieces ------------------------------------------------------------------------------------
    @property
    def weights(self) -> SAEWeights:
        return SAEWeights(self.b_in, self.W_enc, self.b_enc, self.W_dec)

    @property
    def auxk_latents(self) -> int:
        return self.cfg.auxk_latents if self.cfg.auxk_latents is not None else self.d_out // 2

    def dead_ids(self) -> Tensor | None:
        if self.dead_mask is None:
            return None
        ids = self.dead_mask.to(self.W_dec.device).nonzero().flatten()
        return ids if ids.numel() else None

    def target_in(self, y: Tensor) -> Tensor:
        return y * self.output_scale.to(y.dtype)

    def target_out(self, y_n: Tensor) -> Tensor:
        return y_n / self.output_scale.to(y_n.dtype)

    # --- the interface -------------------------------------------------------------------------------
    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Raw input x [B, d_in] -> (indices [B, k] ascending, values [B, k]), as TopK's."""
        vals_BK, idx_BK, _ = topk_encode(self.scale_in(x), self.weights, self.cfg.k, opts=self.kernels)
        return idx_BK, vals_BK

    def encode(self, x: Tensor) -> Tensor:
        idx_BK, vals_BK = self.encode_sparse(x)
        return vals_BK.new_zeros(x.shape[0], self.n_latents).scatter_(1, idx_BK, vals_BK)

    def decode(self, code_BN: Tensor) -> Tensor:
        """Dense code [B, n] -> the dictionary's prediction [B, d_out] in raw target units (no skip path)."""
        return self.target_out(code_BN @ self.W_dec + self.b_dec)

    def forward(self, x: Tensor, target: Tensor | None = None) -> Output:
        """Predict the target of raw inputs x [B, d_in]; losses against ``target`` [B, d_out] when given."""
        x_n_BD = self.scale_in(x)
        step = topk_sae_fast if self.kernels.fast_path else topk_sae_naive
        dead = self.dead_ids() if target is not None else None
        r = step(x_n_BD, self.weights, self.cfg.k, dead, self.auxk_latents, self.kernels)
        y_hat_n_BO = r.xhat_BD + self.b_dec
        if self.skip:
            y_hat_n_BO = y_hat_n_BO + (x_n_BD - self.b_in) @ self.W_skip
        losses = {}
        if target is not None:
            y_n_BO = self.target_in(target)
            losses = {"mse": mse(y_n_BO, y_hat_n_BO),
                      "auxk": auxk_loss(y_n_BO - y_hat_n_BO.detach(), r.ehat_BD, self.cfg.auxk_alpha)}
        return Output(x_hat=self.target_out(y_hat_n_BO), indices=r.idx_BK, values=r.vals_BK, losses=losses)

    # --- training hooks ------------------------------------------------------------------------------
    def before_optimizer_step(self) -> None:
        remove_parallel_grad_(self.W_dec)

    def after_optimizer_step(self) -> None:
        normalize_rows_(self.W_dec)

    def init_from_data(self, x: Tensor, b_dec: Tensor | None = None, target: Tensor | None = None) -> None:
        """From a sample of raw inputs ``x`` and their raw ``target`` rows (aligned): b_in = the inputs'
        mean; b_dec = ``b_dec`` (a raw-unit center of the targets; None: unchanged); with
        ``decoder_init: data`` latent j's encoder column and decoder row point at the centered input and
        target of the same sample row. Set ``input_scale`` and ``output_scale`` first."""
        with torch.no_grad():
            x_n = self.scale_in(x.to(self.W_enc))
            self.b_in.copy_(x_n.mean(0))
            if b_dec is not None:
                self.b_dec.copy_(self.target_in(b_dec.to(self.b_dec)))
            if self.cfg.decoder_init == "random" or target is None:
                return
            g = torch.Generator().manual_seed(0)
            take = torch.randperm(len(x), generator=g)[: self.n_latents]
            enc_ND = x_n[take] - self.b_in
            dec_ND = self.target_in(target[take].to(self.W_dec)) - self.b_dec
            m = len(take)  # a sample smaller than n leaves the rest random
            self.W_enc[:, :m] = (enc_ND / enc_ND.norm(dim=-1, keepdim=True).clamp(min=1e-8)).T
            self.W_dec[:m] = dec_ND / dec_ND.norm(dim=-1, keepdim=True).clamp(min=1e-8)


@register("skip_transcoder", SkipTranscoderConfig)
class SkipTranscoder(Transcoder):
    skip = True
