"""Restricted Boltzmann machines, trained through the generic trainer by contrastive divergence.

Energies (v visible [d], h hidden [n] in {0, 1}, W [d, n]):

- ``visible="bernoulli"``: ``E(v, h) = -v.b_v - h.b_h - v W h``, v in {0, 1}^d;
- ``visible="gaussian"``:  ``E(v, h) = ||v - b_v||^2 / 2 - h.b_h - v W h``, v real, unit variance.

Summing h out gives the free energy ``F(v) = visible_term(v) - sum_j softplus(b_h_j + (v W)_j)`` with
``p(v) = exp(-F(v)) / Z``. The CD update is the gradient of ``mean F(v_data) - mean F(v_model)`` with
``v_model`` held fixed, so the training signal is the single loss part ``"cd"``; ``v_model`` comes from
``cd_steps`` block-Gibbs steps started at the batch (CD-k) or, with ``persistent``, from chains kept across
steps (PCD). ``"mse"`` (one mean-field reconstruction step) is in ``losses`` for uniform logging, but
detached: it adds a constant to ``Output.loss`` and nothing to its gradient.

Units. Gaussian visible units live in the normalized space (``v = scale_in(x)``) like every other model.
Bernoulli visible units read the raw input as probabilities / bits in [0, 1]: ``input_scale`` is ignored
there (rescaling binary data would make it non-binary). The sampling methods ``free_energy``,
``prob_h``, ``sample_h``, ``mean_v``, ``sample_v`` and ``gibbs`` work on ``v`` in the model's own space;
``encode`` / ``decode`` / ``forward`` / ``sample`` take and return raw units.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saekit.autoencoders.base import Autoencoder, AutoencoderConfig, Output, register
from saekit.autoencoders.classical import init_center
from saekit.metrics import mse
from saekit.schema import value


@dataclass
class RBMConfig(AutoencoderConfig):
    visible: Literal["gaussian", "bernoulli"] = "gaussian"  # visible unit type (hidden units are binary)
    cd_steps: int = value(1, ge=1)  # block-Gibbs steps per negative sample (the k of CD-k)
    persistent: bool = False  # persistent CD: chains kept across steps instead of restarted at the batch

    RENAMED = {"cd_k": "cd_steps"}


@register("rbm", RBMConfig)
class RBM(Autoencoder):
    generative = True

    def __init__(self, d_in: int, cfg: RBMConfig):
        super().__init__(d_in, cfg)
        self.visible = cfg.visible
        # Small random weights, zero biases (Hinton, "A practical guide to training RBMs", 2010).
        self.W = nn.Parameter(0.01 * torch.randn(d_in, cfg.n_latents))  # [d, n]
        self.b_v = nn.Parameter(torch.zeros(d_in))
        self.b_h = nn.Parameter(torch.zeros(cfg.n_latents))
        # PCD chains [chains, d]: state across steps, not weights, so not saved (persistent=False).
        self.register_buffer("chains", None, persistent=False)

    # --- units ---------------------------------------------------------------------------------------
    def scale_in(self, x: Tensor) -> Tensor:
        return x if self.visible == "bernoulli" else super().scale_in(x)

    def scale_out(self, x: Tensor) -> Tensor:
        return x if self.visible == "bernoulli" else super().scale_out(x)

    # --- the probabilistic model (v in model space) ------------------------------------------------
    def free_energy(self, v_BD: Tensor) -> Tensor:
        """[B] F(v) = -log sum_h exp(-E(v, h))."""
        if self.visible == "bernoulli":
            visible_B = -(v_BD @ self.b_v)
        else:
            visible_B = 0.5 * (v_BD - self.b_v).pow(2).sum(-1)
        return visible_B - F.softplus(v_BD @ self.W + self.b_h).sum(-1)

    def prob_h(self, v_BD: Tensor) -> Tensor:
        """P(h_j = 1 | v)."""
        return torch.sigmoid(v_BD @ self.W + self.b_h)

    def mean_v(self, h_BN: Tensor) -> Tensor:
        """E[v | h] (also accepts probabilities in place of h: a mean-field step)."""
        mean_BD = h_BN @ self.W.T + self.b_v
        return torch.sigmoid(mean_BD) if self.visible == "bernoulli" else mean_BD

    def sample_h(self, v_BD: Tensor) -> Tensor:
        return torch.bernoulli(self.prob_h(v_BD))

    def sample_v(self, h_BN: Tensor) -> Tensor:
        mean_BD = self.mean_v(h_BN)
        if self.visible == "bernoulli":
            return torch.bernoulli(mean_BD)
        return mean_BD + torch.randn_like(mean_BD)

    @torch.no_grad()
    def gibbs(self, v_BD: Tensor, steps: int = 1) -> Tensor:
        """``steps`` rounds of block Gibbs sampling v -> h -> v; chains never carry gradient."""
        for _ in range(steps):
            v_BD = self.sample_v(self.sample_h(v_BD))
        return v_BD

    @torch.no_grad()
    def sample(self, n: int, steps: int = 1000, init: Tensor | None = None) -> Tensor:
        """``n`` samples (raw units) after ``steps`` Gibbs rounds, started from ``init`` (raw units, [n, d])
        or, if None, from P(v | h = 0)."""
        if init is None:
            v_BD = self.sample_v(self.b_h.new_zeros(n, self.n_latents))
        else:
            v_BD = self.scale_in(init.to(self.W.device, self.W.dtype))
        return self.scale_out(self.gibbs(v_BD, steps))

    # --- the interface ----------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        return self.prob_h(self.scale_in(x))

    def decode(self, code: Tensor) -> Tensor:
        return self.scale_out(self.mean_v(code))

    def negative_samples(self, v_BD: Tensor) -> Tensor:
        """v_model for the CD loss. PCD advances its chains only in training mode, so evaluation leaves
        them alone; their number is fixed by the first batch (means over chains need not match B)."""
        if not (self.cfg.persistent and self.training):
            return self.gibbs(v_BD.detach(), self.cfg.cd_steps)
        if self.chains is None or self.chains.shape[1:] != v_BD.shape[1:]:
            self.chains = v_BD.detach().clone()  # start the chains at data
        self.chains = self.gibbs(self.chains.to(v_BD.dtype), self.cfg.cd_steps)
        return self.chains

    def forward(self, x: Tensor) -> Output:
        v_BD = self.scale_in(x)
        code_BN = self.prob_h(v_BD)
        v_hat_BD = self.mean_v(code_BN)
        v_model = self.negative_samples(v_BD)
        fe_data, fe_model = self.free_energy(v_BD).mean(), self.free_energy(v_model).mean()
        losses = {"cd": fe_data - fe_model, "mse": mse(v_BD, v_hat_BD).detach()}
        extras = {"free_energy_data": fe_data.detach(), "free_energy_model": fe_model.detach(),
                  "v_model": v_model}
        return Output(x_hat=self.scale_out(v_hat_BD), code=code_BN, losses=losses, extras=extras)

    @torch.no_grad()
    def init_from_data(self, x: Tensor, b_dec: Tensor | None = None) -> None:
        """Visible bias from the data: the mean (Gaussian; ``b_dec`` in raw units if given) or the
        log-odds of each unit's firing rate (Bernoulli, as Hinton's guide recommends)."""
        if self.visible == "gaussian":
            init_center(self, self.b_v, x, b_dec)
            return
        p_D = x.reshape(-1, self.d_in).float().mean(0).clamp(1e-3, 1 - 1e-3)
        self.b_v.copy_(torch.logit(p_D).to(self.b_v))
