"""The classical autoencoder family: linear, nonlinear (any depth), denoising and contractive.

These are the models sparse autoencoders grew out of, kept behind the same interface so that one
trainer and one set of metrics cover them all. Inside, everything works in the normalized space
(``xn = scale_in(x)``); ``encode`` / ``decode`` / ``forward`` take and return raw activations, and
methods whose names end in ``_normalized`` (or that take ``xn``) work in the normalized space.

Loss parts (all per-token means over the batch, in the normalized space):

- every kind: ``"mse"``, the sum over dimensions of the squared error against the *clean* input;
- ``contractive``: ``"contractive"``, ``contractive_coefficient * mean ||d code / d xn||_F^2``.

``init_from_data(x, b_dec)`` expects ``b_dec`` in raw units, like ``x`` (e.g. the geometric median of
the raw sample); without it the sample mean is used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saekit.autoencoders.base import Autoencoder, AutoencoderConfig, Output, register
from saekit.metrics import mse
from saekit.schema import FieldError, value

Activation = Literal["relu", "gelu", "tanh", "sigmoid"]


def _gelu_grad(a: Tensor) -> Tensor:
    # d/da [a * Phi(a)] = Phi(a) + a * phi(a), for the exact (erf) GELU that F.gelu computes.
    cdf = 0.5 * (1.0 + torch.erf(a / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
    return cdf + a * pdf


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}

def _relu_grad(a: Tensor) -> Tensor:
    return (a > 0).to(a.dtype)  # 0 at a == 0, as autograd has it


def _tanh_grad(a: Tensor) -> Tensor:
    return 1.0 - torch.tanh(a).pow(2)


def _sigmoid_grad(a: Tensor) -> Tensor:
    s = torch.sigmoid(a)
    return s * (1.0 - s)


# Elementwise derivatives s'(a), used by the contractive penalty's closed form.
ACTIVATION_GRADS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": _relu_grad,
    "gelu": _gelu_grad,
    "tanh": _tanh_grad,
    "sigmoid": _sigmoid_grad,
}


@torch.no_grad()
def init_center(model: Autoencoder, param: Tensor, x: Tensor, b_dec: Tensor | None) -> None:
    """Set ``param`` (a normalized-space center such as b_dec) from the raw ``b_dec`` or the sample mean."""
    center_D = b_dec if b_dec is not None else x.reshape(-1, model.d_in).mean(0)
    center_D = center_D.to(device=param.device, dtype=param.dtype)
    param.copy_(model.scale_in(center_D))


# ------------------------------------------------------------------------------------------ configs
@dataclass
class LinearConfig(AutoencoderConfig):
    """n_latents only."""


@dataclass
class NonlinearConfig(AutoencoderConfig):
    hidden: list[int] = value(factory=list, ge=1)  # widths of extra hidden layers, input side first
    activation: Activation = "relu"


@dataclass
class DenoisingConfig(NonlinearConfig):
    noise: Literal["gaussian", "mask"] = "gaussian"
    noise_level: float = value(0.1, ge=0)  # Gaussian: std in normalized units; mask: drop probability

    def validate(self) -> None:
        if self.noise == "mask" and self.noise_level > 1:
            raise FieldError("noise_level", f"is a drop probability for noise 'mask': it must be <= 1, got "
                             f"{self.noise_level}")


@dataclass
class ContractiveConfig(AutoencoderConfig):
    """One hidden layer, the code (so no ``hidden``)."""

    activation: Activation = "relu"
    contractive_coefficient: float = value(0.1, ge=0)


# ------------------------------------------------------------------------------------------ linear
@register("linear", LinearConfig)
class LinearAE(Autoencoder):
    """``code = (xn - b_dec) W_enc + b_enc``, ``xn_hat = code W_dec + b_dec``.

    Trained on the "mse" alone, its decoder rows come to span the top principal subspace of the data
    (Baldi & Hornik, 1989): the same reconstruction PCA gives in closed form, so PCA is its yardstick.
    """

    def __init__(self, d_in: int, cfg: LinearConfig):
        super().__init__(d_in, cfg)
        n = cfg.n_latents
        # Tied start: W_dec = W_enc^T makes the initial map close to a projection, not a random mix.
        W_DN = torch.randn(d_in, n) / math.sqrt(d_in)
        self.W_enc = nn.Parameter(W_DN.clone())  # [d, n]
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(W_DN.T.clone())  # [n, d]
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def encode_normalized(self, xn_BD: Tensor) -> Tensor:
        return (xn_BD - self.b_dec) @ self.W_enc + self.b_enc

    def decode_normalized(self, code_BN: Tensor) -> Tensor:
        return code_BN @ self.W_dec + self.b_dec

    def encode(self, x: Tensor) -> Tensor:
        return self.encode_normalized(self.scale_in(x))

    def decode(self, code: Tensor) -> Tensor:
        return self.scale_out(self.decode_normalized(code))

    def forward(self, x: Tensor) -> Output:
        xn_BD = self.scale_in(x)
        code_BN = self.encode_normalized(xn_BD)
        xn_hat_BD = self.decode_normalized(code_BN)
        return Output(x_hat=self.scale_out(xn_hat_BD), code=code_BN,
                      losses={"mse": mse(xn_BD, xn_hat_BD)})

    def init_from_data(self, x: Tensor, b_dec: Tensor | None = None) -> None:
        init_center(self, self.b_dec, x, b_dec)


# --------------------------------------------------------------------------------------- nonlinear
@register("autoencoder", NonlinearConfig)
class NonlinearAE(Autoencoder):
    """An MLP autoencoder: ``d -> hidden[0] -> ... -> hidden[-1] -> n_latents`` and the mirror back.

    Every encoder layer, the code layer included, is followed by the activation (so with relu the code
    is nonnegative and often sparse); every decoder layer but the last is too, and the last is linear
    with ``b_dec`` as its bias, which is also subtracted from the input (the SAE convention).
    Subclasses change the training input (``corrupt``) or add loss parts (``penalties``).
    """

    def __init__(self, d_in: int, cfg: NonlinearConfig | ContractiveConfig):
        super().__init__(d_in, cfg)
        self.act = ACTIVATIONS[cfg.activation]
        widths = [d_in, *self.hidden_widths(), cfg.n_latents]
        self.encoder = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        back = widths[::-1]
        n_dec = len(back) - 1
        self.decoder = nn.ModuleList(nn.Linear(a, b, bias=i < n_dec - 1)
                                     for i, (a, b) in enumerate(zip(back[:-1], back[1:])))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def hidden_widths(self) -> list[int]:
        return self.cfg.hidden

    def encode_with_pre(self, xn_BD: Tensor) -> tuple[Tensor, Tensor]:
        """(pre-activation of the code layer, code), from normalized input."""
        h = xn_BD - self.b_dec
        for layer in self.encoder:
            pre = layer(h)
            h = self.act(pre)
        return pre, h

    def encode_normalized(self, xn_BD: Tensor) -> Tensor:
        return self.encode_with_pre(xn_BD)[1]

    def decode_normalized(self, code_BN: Tensor) -> Tensor:
        h = code_BN
        for layer in self.decoder[:-1]:
            h = self.act(layer(h))
        return self.decoder[-1](h) + self.b_dec

    def encode(self, x: Tensor) -> Tensor:
        """The clean (never corrupted) code, in train mode as in eval mode."""
        return self.encode_normalized(self.scale_in(x))

    def decode(self, code: Tensor) -> Tensor:
        return self.scale_out(self.decode_normalized(code))

    def corrupt(self, xn_BD: Tensor) -> Tensor:
        """The input the encoder sees in forward; identity here, noise in the denoising AE."""
        return xn_BD

    def penalties(self, pre_BN: Tensor, code_BN: Tensor) -> dict[str, Tensor]:
        """Extra loss parts beside "mse"; none here."""
        return {}

    def forward(self, x: Tensor) -> Output:
        xn_BD = self.scale_in(x)
        pre_BN, code_BN = self.encode_with_pre(self.corrupt(xn_BD))
        xn_hat_BD = self.decode_normalized(code_BN)
        # Reconstruction is always scored against the clean input.
        losses = {"mse": mse(xn_BD, xn_hat_BD), **self.penalties(pre_BN, code_BN)}
        return Output(x_hat=self.scale_out(xn_hat_BD), code=code_BN, losses=losses)

    def init_from_data(self, x: Tensor, b_dec: Tensor | None = None) -> None:
        init_center(self, self.b_dec, x, b_dec)


# --------------------------------------------------------------------------------------- denoising
@register("denoising", DenoisingConfig)
class DenoisingAE(NonlinearAE):
    """A nonlinear AE whose encoder sees a corrupted input during training only (``self.training``).

    ``noise="gaussian"``: ``xn + noise_level * N(0, I)`` in the normalized space;
    ``noise="mask"``: each input dimension zeroed with probability ``noise_level`` (no rescaling, as in
    Vincent et al. 2008, so eval-mode inputs are used as they are). The loss targets the clean input.
    """

    def corrupt(self, xn_BD: Tensor) -> Tensor:
        if not self.training or self.cfg.noise_level == 0:
            return xn_BD
        if self.cfg.noise == "gaussian":
            return xn_BD + self.cfg.noise_level * torch.randn_like(xn_BD)
        keep_BD = torch.rand_like(xn_BD) >= self.cfg.noise_level
        return xn_BD * keep_BD


# ------------------------------------------------------------------------------------- contractive
@register("contractive", ContractiveConfig)
class ContractiveAE(NonlinearAE):
    """One hidden layer ``code = s(a)``, ``a = (xn - b_dec) W + b`` (Rifai et al. 2011), with the penalty
    ``contractive_coefficient * mean ||J||_F^2``, ``J = d code / d xn``, in closed form:
    ``||J||_F^2 = sum_j s'(a_j)^2 ||W[:, j]||^2`` — no per-example Jacobian is ever formed.
    """

    def __init__(self, d_in: int, cfg: ContractiveConfig):
        super().__init__(d_in, cfg)
        self.act_grad = ACTIVATION_GRADS[cfg.activation]

    def hidden_widths(self) -> list[int]:
        return []

    def _jacobian_sq_norm_from_pre(self, pre_BN: Tensor) -> Tensor:
        # nn.Linear keeps W transposed ([n, d]), so ||W[:, j]||^2 is the squared norm of weight row j.
        w_sq_N = self.encoder[0].weight.pow(2).sum(1)
        return (self.act_grad(pre_BN).pow(2) * w_sq_N).sum(-1)

    def jacobian_sq_norm(self, xn_BD: Tensor) -> Tensor:
        """[B] squared Frobenius norm of d code / d xn at each (normalized) input row."""
        return self._jacobian_sq_norm_from_pre(self.encode_with_pre(xn_BD)[0])

    def penalties(self, pre_BN: Tensor, code_BN: Tensor) -> dict[str, Tensor]:
        penalty = self._jacobian_sq_norm_from_pre(pre_BN).mean()
        return {"contractive": self.cfg.contractive_coefficient * penalty}
