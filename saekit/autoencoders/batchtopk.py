"""BatchTopK SAE (Bussmann et al. 2024): top k·B activations over the whole batch, so tokens share a
budget of k latents on average; at inference a single learned threshold replaces the batch top-k.

The threshold is an EMA of the smallest activation each training batch kept (dictionary_learning does
the same), stored as a buffer so it is saved and loaded. The activations drift while the model trains,
so the EMA must forget early batches within the run: the default decay (0.99 per step, a ~100-step
memory) does; dictionary_learning's 0.999 is made for runs of many thousands of steps and leaves a
short run's threshold stuck near its untrained start. In eval mode the code is
relu(pre) * (relu(pre) > threshold), a per-token rule like JumpReLU's; until the first training batch
has set it (threshold < 0) eval falls back to the batch top-k. Decoder rows are unit norm as for TopK.

The step runs on sparse kernels (sparse_paths.py): an exact batch top-k by threshold extraction, CSR
codes with a variable number of latents per token, sparse decode and backward, AuxK's dead columns;
inference with the learned threshold takes the same path. ``kernels.fast_path: false`` is the dense
reference (``forward_dense``). The output is sparse (``Output.indices``/``values``, padded with zeros;
``Output.code`` forms the dense code when read).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.autoencoders.base import Output, register
from saekit.autoencoders.kernels import auxk_decode
from saekit.autoencoders.sparse_paths import GUESS_MARGIN, Rule, SparseResult, padded, sparse_sae
from saekit.autoencoders.sae import AuxKConfig, AuxKSAE, auxk_loss
from saekit.metrics import mse
from saekit.schema import value


def batch_topk(acts_BN: Tensor, k: int) -> Tensor:
    """Keep the k * B largest entries of the whole [B, n] batch, zero the rest."""
    flat = acts_BN.flatten()
    vals, idx = flat.topk(k * acts_BN.shape[0], sorted=False)
    return torch.zeros_like(flat).scatter(0, idx, vals).view_as(acts_BN)


@dataclass
class BatchTopKConfig(AuxKConfig):
    """AuxKConfig (``k``: mean active latents per token) plus the inference threshold's EMA."""

    # EMA decay of the inference threshold, per training step. 0.99 averages the last ~100 batches:
    # enough to smooth a per-batch order statistic of k*B values, short enough to follow the drifting
    # activations of a run of a few hundred steps (0.999 still weighted the first, untrained batches by
    # ~0.55 after 600 steps, so inference L0 landed far from k).
    threshold_beta: float = value(0.99, ge=0, lt=1)

    RENAMED = {**AuxKConfig.RENAMED, "batchtopk_threshold_beta": "threshold_beta"}


@register("batchtopk", BatchTopKConfig)
class BatchTopKSAE(AuxKSAE):
    def __init__(self, d_in: int, cfg: BatchTopKConfig):
        super().__init__(d_in, cfg)
        self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not estimated yet
        # The sparse selection's starting lo: any value gives the exact top k·B, but which of two tied
        # values is kept may depend on it, so checkpoints carry it (step_state).
        self._guess: Tensor | None = None

    def step_state(self) -> dict[str, Tensor]:
        state = super().step_state()
        if self._guess is not None:
            state["guess"] = self._guess.detach().cpu()
        return state

    def load_step_state(self, state: dict[str, Tensor]) -> None:
        super().load_step_state(state)
        if "guess" in state:
            self._guess = state["guess"].to(self.threshold.device)

    def _code(self, pre_BN: Tensor) -> Tensor:
        acts_BN = pre_BN.relu()
        if self.training or self.threshold.item() < 0:
            return batch_topk(acts_BN, self.cfg.k)
        return acts_BN * (acts_BN > self.threshold)

    @torch.no_grad()
    def _update_threshold(self, code_BN: Tensor) -> None:
        kept = code_BN[code_BN > 0]
        if kept.numel() == 0:
            return
        self._update_threshold_low(kept.min())

    @torch.no_grad()
    def _update_threshold_low(self, low: Tensor) -> None:
        low = low.to(self.threshold)
        beta = self.cfg.threshold_beta
        self.threshold.copy_(torch.where(self.threshold < 0, low, beta * self.threshold + (1 - beta) * low))

    def encode(self, x: Tensor) -> Tensor:
        return self._code(self.pre_acts(self.scale_in(x)))

    def forward(self, x: Tensor) -> Output:
        if not self.kernels.fast_path:
            return self.forward_dense(x)
        x_n_BD = self.scale_in(x)
        opts = self.kernels.on(x.device)
        batch = self.training or self.threshold.item() < 0
        rule = Rule("batchtopk", lo=self._guess, k=self.cfg.k) if batch else Rule("above", lo=self.threshold.detach())
        dead_M = self.dead_ids()
        r = sparse_sae(x_n_BD, self.weights, rule, opts, dead_M=dead_M, auxk_k=self.auxk_latents,
                       group_ends=self.sparse_groups())
        if batch:
            kept = r.enc.vals_E.numel() > 0
            self._guess = r.enc.low.detach() * GUESS_MARGIN if kept else None
            if self.training and kept:
                self._update_threshold_low(r.enc.low)
        x_hat_n_BD, losses = self.reconstruct_sparse(x_n_BD, r)
        losses["auxk"] = auxk_loss(x_n_BD - x_hat_n_BD.detach(), r.ehat_BD, self.cfg.auxk_alpha)
        idx, vals = padded(r.enc.p, r.enc.vals_E)
        return Output(x_hat=self.scale_out(x_hat_n_BD), indices=idx, values=vals, losses=losses,
                      n_latents=self.n_latents)

    def sparse_groups(self) -> list[int] | None:
        """Where the nested groups end (Matryoshka); None: one group."""
        return None

    def reconstruct_sparse(self, x_n_BD: Tensor, r: SparseResult) -> tuple[Tensor, dict[str, Tensor]]:
        """``reconstruct`` from the sparse step's decode."""
        x_hat_n_BD = r.xhat_BD + self.b_dec
        return x_hat_n_BD, {"mse": mse(x_n_BD, x_hat_n_BD)}

    def forward_dense(self, x: Tensor) -> Output:
        """The dense reference step: [B, n] pre-activations and code, dense decode, autograd's backward."""
        x_n_BD = self.scale_in(x)
        pre_BN = self.pre_acts(x_n_BD)
        code_BN = self._code(pre_BN)
        if self.training:
            self._update_threshold(code_BN)
        x_hat_n_BD, losses = self.reconstruct(x_n_BD, code_BN)
        dead_M = self.dead_ids()
        e_hat_BD = None
        if dead_M is not None:
            e_hat_BD = auxk_decode(pre_BN.index_select(1, dead_M), dead_M, self.auxk_latents, self.W_dec)
        losses["auxk"] = auxk_loss(x_n_BD - x_hat_n_BD.detach(), e_hat_BD, self.cfg.auxk_alpha)
        return Output(x_hat=self.scale_out(x_hat_n_BD), code=code_BN, losses=losses)

    def reconstruct(self, x_n_BD: Tensor, code_BN: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(normalized reconstruction, its loss parts); Matryoshka adds one part per nested prefix."""
        x_hat_n_BD = code_BN @ self.W_dec + self.b_dec
        return x_hat_n_BD, {"mse": mse(x_n_BD, x_hat_n_BD)}
