"""What the sparse-autoencoder family shares: parameters, the encoder affine map, losses, init.

Every SAE here maps raw activations x to x_n = x * input_scale and then

    pre = (x_n - b_dec) @ W_enc + b_enc        W_enc [d, n], b_enc [n]
    code = f(pre)                              ReLU, TopK, BatchTopK or JumpReLU
    x_hat_n = code @ W_dec + b_dec             W_dec [n, d] (row j = latent j's direction), b_dec [d]

and returns x_hat = x_hat_n / input_scale. Every loss part is computed on the normalized x_n, x_hat_n.
The families live in relu_l1.py, topk.py, batchtopk.py and jumprelu.py; the TopK fast path in kernels.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saekit.autoencoders.base import Autoencoder, AutoencoderConfig, Output
from saekit.autoencoders.kernels import SAEWeights
from saekit.autoencoders.sparse_paths import SPARSE_MAX_DENSITY
from saekit.metrics import mse
from saekit.schema import FieldError, value


@dataclass
class SAEConfig(AutoencoderConfig):
    """What every SAE family shares."""

    # Decoder rows at init: "data" = centered, normalized sample activations (encoder = transpose),
    # "random" = random unit vectors. Data init converges faster on short runs.
    decoder_init: Literal["data", "random"] = "data"


@dataclass
class AuxKConfig(SAEConfig):
    """The k-sparse families (TopK, BatchTopK): k active latents per token and AuxK (Gao et al. 2024)
    for the latents the trainer marks dead (its ``dead_after_tokens``)."""

    k: int = value(32, ge=1)  # active latents per token (BatchTopK: on average over the batch)
    auxk_latents: int | None = value(None, ge=1)  # dead latents AuxK decodes per token; None: d_in // 2
    auxk_alpha: float = value(1 / 32, ge=0)  # weight of the AuxK loss

    RENAMED = {"auxk_k": "auxk_latents"}

    def validate(self) -> None:
        if self.k > self.n_latents:
            raise FieldError("k", f"is {self.k}, more than n_latents ({self.n_latents}); lower k or widen the "
                             "dictionary")


class SparseAutoencoder(Autoencoder):
    """Base of the SAE family. Init: random unit-norm decoder rows, encoder tied to the decoder's
    transpose (W_enc = W_dec.T, Gao et al. 2024; Conerly et al. 2024), zero biases."""

    config_class = SAEConfig

    def __init__(self, d_in: int, cfg: SAEConfig):
        super().__init__(d_in, cfg)
        W_dec_ND = torch.randn(cfg.n_latents, d_in)
        W_dec_ND /= W_dec_ND.norm(dim=-1, keepdim=True)
        # .T.clone() keeps the transposed strides: W_enc's memory is [n, d] row-major, the layout of the
        # gradient the sparse kernels produce (latent rows), so autograd takes it without a copy.
        self.W_enc = nn.Parameter(W_dec_ND.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.W_dec = nn.Parameter(W_dec_ND)
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.sparsity_scale = 1.0
        self.dead_mask: Tensor | None = None
        # Fraction of [B, n] the last step's sparse pattern covered (ReLU, JumpReLU: the dense-fallback
        # signal, see use_sparse_step); 1.0 until measured, so the first step runs dense and measures it.
        self.pattern_density = 1.0

    def step_state(self) -> dict[str, Tensor]:
        return {"pattern_density": torch.tensor(self.pattern_density, dtype=torch.float64)}

    def load_step_state(self, state: dict[str, Tensor]) -> None:
        if "pattern_density" in state:
            self.pattern_density = float(state["pattern_density"])

    def use_sparse_step(self) -> bool:
        """The variable-count families' per-step choice: the sparse kernels unless the fast path is off
        or the previous step's pattern was denser than the measured crossover."""
        return self.kernels.fast_path and self.pattern_density <= SPARSE_MAX_DENSITY

    # --- pieces the families compose -----------------------------------------------------------
    def pre_acts(self, x_n_BD: Tensor) -> Tensor:
        return torch.addmm(self.b_enc, x_n_BD - self.b_dec, self.W_enc)

    def decode(self, code_BN: Tensor) -> Tensor:
        """Dense code [B, n] -> raw-unit reconstruction [B, d]."""
        return self.scale_out(code_BN @ self.W_dec + self.b_dec)

    def dead_ids(self) -> Tensor | None:
        """Ids of the latents the trainer marked dead, or None when there are none."""
        if self.dead_mask is None:
            return None
        ids = self.dead_mask.to(self.W_dec.device).nonzero().flatten()
        return ids if ids.numel() else None

    @property
    def weights(self) -> SAEWeights:
        return SAEWeights(self.b_dec, self.W_enc, self.b_enc, self.W_dec)

    def init_from_data(self, x: Tensor, b_dec: Tensor | None = None) -> None:
        """Set b_dec from a raw-unit estimate of the data's center (the trainer's geometric median or
        mean; the model stores b_dec in normalized units, hence the input_scale; None: unchanged), and
        with ``decoder_init: data`` point the decoder rows at distinct centered sample activations, the
        encoder tied to their transpose: every latent starts where the data is, so fewer die early."""
        with torch.no_grad():
            if b_dec is not None:
                self.b_dec.copy_(b_dec.to(self.b_dec) * self.input_scale)
            if self.cfg.decoder_init == "random":
                return
            g = torch.Generator().manual_seed(0)
            take = torch.randperm(len(x), generator=g)[: self.n_latents]
            rows_ND = self.scale_in(x[take].to(self.W_dec)) - self.b_dec
            rows_ND = rows_ND / rows_ND.norm(dim=-1, keepdim=True).clamp(min=1e-8)
            self.W_dec[: len(rows_ND)] = rows_ND  # a sample smaller than n leaves the rest random
            self.W_enc.copy_(self.W_dec.T)

    def _output_dense(self, x_n_BD: Tensor, code_BN: Tensor, losses: dict[str, Tensor]):
        x_hat_n = code_BN @ self.W_dec + self.b_dec
        losses = {"mse": mse(x_n_BD, x_hat_n), **losses}
        return Output(x_hat=self.scale_out(x_hat_n), code=code_BN, losses=losses)


class AuxKSAE(SparseAutoencoder):
    """Base of TopK and BatchTopK: unit-norm decoder rows (before each optimizer step the gradient
    component along each row is removed, after it the rows are renormalized) and AuxK."""

    config_class = AuxKConfig

    @property
    def auxk_latents(self) -> int:
        return self.cfg.auxk_latents if self.cfg.auxk_latents is not None else self.d_in // 2

    def before_optimizer_step(self) -> None:
        remove_parallel_grad_(self.W_dec)

    def after_optimizer_step(self) -> None:
        normalize_rows_(self.W_dec)


# --- losses -------------------------------------------------------------------------------------
def auxk_loss(e_BD: Tensor, e_hat_BD: Tensor | None, alpha: float) -> Tensor:
    """AuxK (Gao et al. 2024): alpha * ||e - e_hat||^2 / ||e - mean(e)||^2, sums over batch and d.

    e = x_n - x_hat_n is the main reconstruction's residual, taken as a fixed target (detached), and
    e_hat is decoded from the dead latents WITHOUT the decoder bias (x_hat already holds it once). The
    denominator, the residual's variance about its batch mean, makes this the FVU of the residual: it
    is scale-free and batch-size independent. Gao et al.'s code divides by ||e||^2 per token instead;
    sparsify divides by the input's variance. Zero when nothing is dead (e_hat None)."""
    if e_hat_BD is None:
        return e_BD.new_zeros(())
    e_BD = e_BD.detach()
    # sum of squared deviations from the batch mean; (e - mean)^2 summed, not var(dim=0), whose
    # column-wise CPU reduction took 9.6 against 1.7 ms at B 4096, d 384 on the 2-core CPU.
    denom = (e_BD - e_BD.mean(0)).square_().sum()
    denom = denom.clamp_min(torch.finfo(denom.dtype).tiny)
    return alpha * F.mse_loss(e_hat_BD, e_BD, reduction="sum") / denom


# --- unit-norm decoder rows (TopK, BatchTopK) ---------------------------------------------------
@torch.no_grad()
def remove_parallel_grad_(W_ND: nn.Parameter) -> None:
    """Remove from each row's gradient its component along the row (the part that would only change
    the row's norm, which the renormalization after the step undoes anyway). Two reductions and one
    in-place update, no [n, d] temporaries (the three a plain expression makes cost ~2 ms per step on
    the 2-core CPU, a fixed cost that weighs on small batches). The row dot products are n [1, d] @
    [d, 1] products: torch.linalg.vecdot forms the [n, d] elementwise product and then sums it (the whole
    projection, interleaved at n 6144, d 384: 2.7 against 6.4 ms)."""
    if W_ND.grad is not None:
        g_ND, W = W_ND.grad, W_ND.detach()
        n, d = W.shape
        dots_N1 = torch.bmm(g_ND.reshape(n, 1, d), W.reshape(n, d, 1)).view(n, 1)
        g_ND.addcmul_(dots_N1.div_(torch.linalg.vector_norm(W, dim=-1, keepdim=True).square_()), W, value=-1)


@torch.no_grad()
def normalize_rows_(W_ND: nn.Parameter) -> None:
    W_ND /= W_ND.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(W_ND.dtype).eps)
