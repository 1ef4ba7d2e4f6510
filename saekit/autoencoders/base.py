"""The one autoencoder interface every family implements.

``encode(x) -> code``, ``decode(code) -> x_hat``, ``forward(x) -> Output`` and ``save(dir)`` /
``load(dir)``. Inputs are always *raw* activations: each model owns an ``input_scale`` buffer that the
trainer sets once (to bring the mean squared norm of the data to d_in) and that the model applies on the
way in and undoes on the way out, so a saved model works on raw activations without any folding step,
and every loss part is computed in the normalized space, independent of the activation scale.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saekit.config import ModelConfig, from_dict

REGISTRY: dict[str, type["Autoencoder"]] = {}


def register(kind: str):
    def wrap(cls):
        cls.kind = kind
        REGISTRY[kind] = cls
        return cls

    return wrap


@dataclass
class Output:
    """What ``forward`` returns. ``losses`` are the named parts; the trainer minimizes their sum.

    The code comes either dense (``code``, [B, n]) or, for TopK-style models whose fast path never
    forms a dense [B, n] tensor, sparse (``indices`` and ``values``, [B, k]); ``code`` may then be None.
    """

    x_hat: Tensor  # [B, d] in raw activation units
    code: Tensor | None = None  # [B, n] dense code
    indices: Tensor | None = None  # [B, k] active latent ids (sparse form)
    values: Tensor | None = None  # [B, k] their activations
    losses: dict[str, Tensor] = field(default_factory=dict)
    # Extra per-batch tensors a trainer or metric may want (e.g. pre-activations), never required.
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def loss(self) -> Tensor:
        return sum(self.losses.values())

    def active(self) -> Tensor:
        """Boolean [B, n] of nonzero code entries (dense code only)."""
        return self.code != 0

    def nonzero_per_token(self) -> Tensor:
        """[B] number of nonzero code entries per token."""
        if self.code is not None:
            return (self.code != 0).sum(-1)
        return (self.values != 0).sum(-1)

    def fire_counts(self, n_latents: int) -> Tensor:
        """[n] number of tokens in the batch on which each latent was nonzero. Scatter-add rather than
        boolean indexing, which would force a host sync on CUDA (the trainer calls this every step)."""
        if self.code is not None:
            return (self.code != 0).sum(0)
        counts = torch.zeros(n_latents, dtype=torch.long, device=self.values.device)
        return counts.scatter_add_(0, self.indices.flatten().long(), (self.values != 0).flatten().long())

    def dense_code(self, n_latents: int) -> Tensor:
        if self.code is not None:
            return self.code
        dense = self.values.new_zeros(self.values.shape[0], n_latents)
        return dense.scatter_(1, self.indices, self.values)


class Autoencoder(nn.Module):
    kind: ClassVar[str] = "base"

    def __init__(self, d_in: int, cfg: ModelConfig):
        super().__init__()
        self.d_in = d_in
        self.cfg = cfg
        self.register_buffer("input_scale", torch.ones(()))

    # --- the interface ----------------------------------------------------------------------
    @property
    def n_latents(self) -> int:
        return self.cfg.n_latents

    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, code: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Output:
        raise NotImplementedError

    # --- hooks the trainer calls; default no-ops ------------------------------------------------
    def set_sparsity_scale(self, scale: float) -> None:
        """Warm-up factor in [0, 1] for the sparsity penalty (ReLU+L1, JumpReLU)."""
        self.sparsity_scale = scale

    def before_optimizer_step(self) -> None:
        """E.g. remove the gradient component along unit-norm decoder columns."""

    def after_optimizer_step(self) -> None:
        """E.g. renormalize decoder columns."""

    def set_dead_mask(self, dead: Tensor | None) -> None:
        """Latents the trainer has seen idle too long (used by AuxK)."""
        self.dead_mask = dead

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers by parameter name (as in ``named_parameters``); the rest get 1.
        E.g. JumpReLU's log-thresholds, which must travel further per step than the weights do."""
        return {}

    def init_from_data(self, x: Tensor, b_dec: Tensor | None = None) -> None:
        """Data-dependent initialization from a sample of raw activations (decoder bias, thresholds)."""

    # --- scale helpers --------------------------------------------------------------------------
    def scale_in(self, x: Tensor) -> Tensor:
        return x * self.input_scale.to(x.dtype)

    def scale_out(self, x: Tensor) -> Tensor:
        return x / self.input_scale.to(x.dtype)

    # --- files ------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Weights as safetensors plus a JSON config; atomic (temp file, then rename)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"kind": self.kind, "d_in": self.d_in, "model": dataclasses.asdict(self.cfg)}
        tmp_w, tmp_c = directory / "model.safetensors.tmp", directory / "config.json.tmp"
        save_file(tensors, str(tmp_w))
        tmp_c.write_text(json.dumps(meta, indent=2))
        tmp_w.replace(directory / "model.safetensors")
        tmp_c.replace(directory / "config.json")

    @staticmethod
    def load(directory: str | Path, device: str | torch.device = "cpu") -> "Autoencoder":
        directory = Path(directory)
        meta = json.loads((directory / "config.json").read_text())
        model = build(meta["kind"], meta["d_in"], from_dict(ModelConfig, meta["model"]))
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model.to(device)


def build(kind: str, d_in: int, cfg: ModelConfig) -> Autoencoder:
    import saekit.autoencoders  # noqa: F401  (registers every family)

    if kind not in REGISTRY:
        import difflib

        near = difflib.get_close_matches(kind, list(REGISTRY), n=1, cutoff=0.0)
        raise ValueError(f"unknown autoencoder kind '{kind}'" + (f"; did you mean '{near[0]}'?" if near else "")
                         + f" (valid: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[kind](d_in, cfg)
