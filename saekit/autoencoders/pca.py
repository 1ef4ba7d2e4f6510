"""PCA as an autoencoder, fitted in closed form from a streamed covariance.

``PCA.closed_form`` is True: the trainer calls ``fit_stream(batches)`` once instead of taking gradient
steps (the model has no parameters). The statistics are kept in raw units, so the fit does not depend on
whether ``input_scale`` was set before or after it; ``eigenvalues`` and ``discarded_variance()`` are
reported in the normalized space, the space of the "mse" loss part, so ``discarded_variance()`` is the
lowest "mse" any rank-``n_latents`` linear (affine) autoencoder can reach on the fitted data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

from saekit.autoencoders.base import Autoencoder, AutoencoderConfig, Output, register
from saekit.errors import ConfigError, UserError
from saekit.metrics import mse


class StreamingMoments:
    """Running sum x and sum x x^T in float64 over batches of rows.

    Rows are shifted by the first batch's mean before accumulating, so a large common offset (typical of
    residual streams) does not cancel catastrophically in E[x x^T] - m m^T.
    """

    def __init__(self, d: int, device: torch.device):
        self.n = 0
        self.shift_D: Tensor | None = None
        self.sum_D = torch.zeros(d, dtype=torch.float64, device=device)
        self.sum_DD = torch.zeros(d, d, dtype=torch.float64, device=device)

    def add(self, x_BD: Tensor) -> None:
        if x_BD.shape[0] == 0:
            return
        x_BD = x_BD.to(self.sum_D.device, torch.float64)
        if self.shift_D is None:
            self.shift_D = x_BD.mean(0)
        x_BD = x_BD - self.shift_D
        self.n += x_BD.shape[0]
        self.sum_D += x_BD.sum(0)
        self.sum_DD += x_BD.T @ x_BD

    def mean_and_cov(self) -> tuple[Tensor, Tensor]:
        """Mean and population covariance (divided by n: the per-token MSE is what PCA's optimum bounds)."""
        m_D = self.sum_D / self.n
        cov_DD = self.sum_DD / self.n - torch.outer(m_D, m_D)
        return self.shift_D + m_D, (cov_DD + cov_DD.T) / 2


def _fix_signs(vecs_DN: Tensor) -> Tensor:
    """Make each column's largest-magnitude entry positive, so refits give the same components."""
    rows_N = vecs_DN.abs().argmax(0)
    signs_N = vecs_DN[rows_N, torch.arange(vecs_DN.shape[1], device=vecs_DN.device)].sign()
    return vecs_DN * torch.where(signs_N == 0, torch.ones_like(signs_N), signs_N)


@dataclass
class PCAConfig(AutoencoderConfig):
    """n_latents (the number of components, at most d_in) only."""


@register("pca", PCAConfig)
class PCA(Autoencoder):
    """``code = scale_in(x - mean) @ components``, ``x_hat = scale_out(code @ components^T) + mean``."""

    closed_form = True  # fitted by fit_stream, not by gradient steps

    def __init__(self, d_in: int, cfg: PCAConfig):
        super().__init__(d_in, cfg)
        if cfg.n_latents > d_in:  # d_in is known only here, from the data
            raise ConfigError(f"config key 'model.n_latents': PCA keeps at most d_in = {d_in} components; "
                              f"got {cfg.n_latents}")
        self.register_buffer("mean", torch.zeros(d_in))  # raw units
        self.register_buffer("components", torch.zeros(d_in, cfg.n_latents))  # orthonormal columns
        # All d eigenvalues of the raw covariance, descending (float64: their tail sum is a small number).
        self.register_buffer("raw_eigenvalues", torch.zeros(d_in, dtype=torch.float64))
        self.register_buffer("n_tokens", torch.zeros((), dtype=torch.int64))

    # --- fitting ------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_stream(self, batches: Iterable[Tensor], max_tokens: int | None = None) -> "PCA":
        """Fit from an iterable of raw-activation batches ([..., d] tensors), reading at most
        ``max_tokens`` rows (all of them if None, so pass a finite iterable then). Returns self."""
        moments = StreamingMoments(self.d_in, self.mean.device)
        for x in batches:
            x_BD = x.reshape(-1, self.d_in)
            if max_tokens is not None:
                x_BD = x_BD[: max_tokens - moments.n]
            moments.add(x_BD)
            if max_tokens is not None and moments.n >= max_tokens:
                break
        if moments.n < 2:
            raise UserError(f"PCA needs at least 2 training rows; got {moments.n}")
        mean_D, cov_DD = moments.mean_and_cov()
        evals_D, evecs_DD = torch.linalg.eigh(cov_DD)  # ascending
        evals_D, evecs_DD = evals_D.flip(0).clamp_min(0), evecs_DD.flip(1)
        self.mean.copy_(mean_D)
        self.components.copy_(_fix_signs(evecs_DD[:, : self.n_latents]))
        self.raw_eigenvalues.copy_(evals_D)
        self.n_tokens.fill_(moments.n)
        return self

    @property
    def fitted(self) -> bool:
        return bool(self.n_tokens > 0)

    # --- what the fit says ------------------------------------------------------------------------
    @property
    def eigenvalues(self) -> Tensor:
        """[d] variances along the principal axes, descending, in the normalized space."""
        return self.raw_eigenvalues.double() * self.input_scale.double() ** 2

    def discarded_variance(self) -> float:
        """Sum of the discarded eigenvalues: the least per-token "mse" of a rank-n_latents reconstruction."""
        return self.eigenvalues[self.n_latents:].sum().item()

    # --- the interface ------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        return self.scale_in(x - self.mean) @ self.components

    def decode(self, code: Tensor) -> Tensor:
        return self.scale_out(code @ self.components.T) + self.mean

    def forward(self, x: Tensor) -> Output:
        xn_centered_BD = self.scale_in(x - self.mean)
        code_BN = xn_centered_BD @ self.components
        xn_hat_centered_BD = code_BN @ self.components.T
        # "mse" has no gradient (no parameters): it is reported, never trained on.
        return Output(x_hat=self.scale_out(xn_hat_centered_BD) + self.mean, code=code_BN,
                      losses={"mse": mse(xn_centered_BD, xn_hat_centered_BD)})
