"""The one autoencoder interface every family implements, the base of their configs, and the registry.

``encode(x) -> code``, ``decode(code) -> x_hat``, ``forward(x) -> Output`` and ``save(dir)`` /
``load(dir)``; families that predict a target activation instead of reconstructing their input
(transcoders, ``predicts_target``) take it as ``forward(x, target)``. Inputs are always *raw* activations: each model owns an ``input_scale`` buffer that the
trainer sets once (to bring the mean squared norm of the data to d_in) and that the model applies on the
way in and undoes on the way out, so a saved model works on raw activations without any folding step,
and every loss part is computed in the normalized space, independent of the activation scale.

Each family owns a config dataclass beside its model (deriving from ``AutoencoderConfig``, which holds
the shared fields); ``@register(kind, Config)`` puts the pair in ``REGISTRY``, the one map from a
``kind`` to (model class, config class). A ``model:`` section of a YAML file is read with the config
class of its ``kind``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable, NamedTuple

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from saekit.autoencoders.kernels import KernelOptions
from saekit.errors import ConfigError, UserError
from saekit.files import read_json, write_json, write_tensors
from saekit.schema import Section, field_types, from_dict, nearest, to_dict, value

DEFAULT_KIND = "topk"
MODEL_FORMAT = 2  # 1 (no "format" key): one flat config of every family's fields


@dataclass
class AutoencoderConfig(Section):
    """What every family shares; ``kind`` is the class's tag (written first by ``to_dict``)."""

    n_latents: int = value(6144, ge=1)  # code size: dictionary width, PCA components, hidden units

    # Training settings that lived in the model section before the per-family configs.
    MOVED: ClassVar[dict[str, str]] = {
        "fast_path": "the training config's 'kernels.fast_path'",
        "chunk_tokens": "the training config's 'kernels.chunk_tokens'",
        "sparse_kernels": "the training config's 'kernels.backend'",
        "topk_method": "the training config's 'kernels.topk_method'",
        "dead_tokens": "the training config's 'dead_after_tokens'",
    }

    @classmethod
    def for_kind(cls, kind: str, **fields) -> "AutoencoderConfig":
        """The config of family ``kind``, checked like a YAML ``model:`` section: ``for_kind("topk", k=16)``."""
        return from_dict(cls, {"kind": kind, **fields})

    @classmethod
    def section_class(cls, data: dict, where: str) -> type:
        """The config class of ``data["kind"]`` (popped; default topk, or this class's own kind)."""
        kind = data.pop("kind", None)
        if cls.kind is not None:
            if kind not in (None, cls.kind):
                raise ConfigError(f"config key '{where}kind' is {kind!r}, but this is a {cls.kind} config")
            return cls
        kind = DEFAULT_KIND if kind is None else str(kind)
        families = registry()
        if kind not in families:
            near = nearest(kind, families)
            raise ConfigError(f"config key '{where}kind': unknown autoencoder kind {kind!r}; did you mean "
                              f"'{near}'? (valid: {', '.join(sorted(families))})")
        return families[kind].config

    @classmethod
    def foreign_key_hint(cls, key: str) -> str | None:
        owners = sorted(k for k, fam in registry().items() if key in field_types(fam.config))
        if not owners:
            return None
        homes = sorted({next(c for c in registry()[kind].config.__mro__ if key in c.__dict__.get("__annotations__", {}))
                        .__name__ for kind in owners})
        return (f"does not apply to kind '{cls.kind}': it belongs to {' and '.join(homes)} "
                f"(kinds that accept it: {', '.join(owners)})")


class Family(NamedTuple):
    model: type["Autoencoder"]
    config: type[AutoencoderConfig]


REGISTRY: dict[str, Family] = {}


def register(kind: str, config: type[AutoencoderConfig]):
    """Class decorator: ``kind`` names the model class and its config class."""

    def wrap(cls):
        cls.kind = config.kind = kind
        cls.config_class = config
        REGISTRY[kind] = Family(cls, config)
        return cls

    return wrap


def registry() -> dict[str, Family]:
    import saekit.autoencoders  # noqa: F401  (importing the package registers every family)

    return REGISTRY


@dataclass
class Output:
    """What ``forward`` returns. ``losses`` are the named parts; the trainer minimizes their sum.

    The code comes either dense (``code``, [B, n]) or, for TopK-style models whose fast path never
    forms a dense [B, n] tensor, sparse (``indices`` and ``values``, [B, k]; entries with value 0 are
    padding); ``code`` may then be None. The variable-count families (BatchTopK, Matryoshka, JumpReLU,
    ReLU) return the sparse form and set ``n_latents``: their ``code`` is then formed from it on first
    access (and kept), so callers that read ``code`` see what the dense path returns, and those that
    do not (the trainer, the metrics) never pay for a [B, n] tensor.
    """

    x_hat: Tensor  # [B, d] in raw activation units
    code: Tensor | None = None  # [B, n] dense code
    indices: Tensor | None = None  # [B, k] active latent ids (sparse form)
    values: Tensor | None = None  # [B, k] their activations
    losses: dict[str, Tensor] = field(default_factory=dict)
    # Extra per-batch tensors a trainer or metric may want (e.g. pre-activations), never required.
    extras: dict[str, Tensor] = field(default_factory=dict)
    n_latents: int | None = None  # set: ``code`` is formed from (indices, values) when first read

    @property
    def loss(self) -> Tensor:
        return sum(self.losses.values())

    def nonzero_per_token(self) -> Tensor:
        """[B] number of nonzero code entries per token."""
        if self._code is not None:
            return (self._code != 0).sum(-1)
        return (self.values != 0).sum(-1)

    def fire_counts(self, n_latents: int) -> Tensor:
        """[n] number of tokens in the batch on which each latent was nonzero. Scatter-add rather than
        boolean indexing, which would force a host sync on CUDA (the trainer calls this every step)."""
        if self._code is not None:
            return (self._code != 0).sum(0)
        counts = torch.zeros(n_latents, dtype=torch.long, device=self.values.device)
        return counts.scatter_add_(0, self.indices.flatten().long(), (self.values != 0).flatten().long())

    def dense_code(self, n_latents: int) -> Tensor:
        if self._code is not None:
            return self._code
        dense = self.values.new_zeros(self.values.shape[0], n_latents)
        return dense.scatter_add_(1, self.indices, self.values)  # add: padding (latent 0, value 0) may repeat


def _get_code(self: Output) -> Tensor | None:
    if self._code is None and self.n_latents is not None and self.values is not None:
        self._code = self.dense_code(self.n_latents)
    return self._code


def _set_code(self: Output, code: Tensor | None) -> None:
    self._code = code


Output.code = property(_get_code, _set_code)  # after @dataclass: __init__ assigns through the setter


class Autoencoder(nn.Module):
    kind: ClassVar[str] = "base"
    config_class: ClassVar[type[AutoencoderConfig]] = AutoencoderConfig
    # What callers may ask of a family, declared here rather than sniffed:
    closed_form: ClassVar[bool] = False  # fitted once by fit_stream(batches), not by gradient steps
    sparse_encoder: ClassVar[bool] = False  # encode_sparse gives (indices, values) without a [B, n] code
    generative: ClassVar[bool] = False  # sample(n, steps) draws from the model (RBMs)
    # forward(x, target) predicts another activation (transcoders: an MLP's output from its input);
    # x_hat is that prediction and the losses measure it against target. Trained with data.target_hook;
    # init_from_data then also gets the sample's targets (init_from_data(x, b_dec, target=y)).
    predicts_target: ClassVar[bool] = False

    def __init__(self, d_in: int, cfg: AutoencoderConfig):
        super().__init__()
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, "
                            f"got {type(cfg).__name__}")
        self.d_in = d_in
        self.cfg = cfg
        self.kernels = KernelOptions()
        self.register_buffer("input_scale", torch.ones(()))

    # --- the interface ----------------------------------------------------------------------
    @property
    def n_latents(self) -> int:
        return self.cfg.n_latents

    @property
    def device(self) -> torch.device:
        return self.input_scale.device  # every model has this buffer, parameters or not (PCA)

    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, code: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Output:
        raise NotImplementedError

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(indices [B, k], values [B, k]) of the active latents; families with ``sparse_encoder``."""
        raise NotImplementedError(f"{type(self).__name__} has no sparse encoder")

    def fit_stream(self, batches: Iterable[Tensor]) -> "Autoencoder":
        """Fit in closed form from raw-activation batches; families with ``closed_form``."""
        raise NotImplementedError(f"{type(self).__name__} is trained by gradient steps")

    # --- hooks the trainer calls; default no-ops ------------------------------------------------
    def use_kernels(self, options: KernelOptions) -> None:
        """How to run the fast path (families without sparse kernels ignore it)."""
        self.kernels = options

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

    def step_state(self) -> dict[str, Tensor]:
        """What a step reads besides the weights and buffers (e.g. which of two numerically different
        paths the next step takes); the trainer checkpoints it so a resumed run takes the same path."""
        return {}

    def load_step_state(self, state: dict[str, Tensor]) -> None:
        """Restore ``step_state`` (keys absent from an older checkpoint keep their fresh values)."""

    # --- scale helpers --------------------------------------------------------------------------
    def scale_in(self, x: Tensor) -> Tensor:
        return x * self.input_scale.to(x.dtype)

    def scale_out(self, x: Tensor) -> Tensor:
        return x / self.input_scale.to(x.dtype)

    # --- files ------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Weights as safetensors plus a JSON config, each written atomically (weights first)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_tensors(directory / "model.safetensors", self.state_dict())
        write_json(directory / "config.json",
                   {"format": MODEL_FORMAT, "kind": self.kind, "d_in": self.d_in, "model": to_dict(self.cfg)})

    @staticmethod
    def load(directory: str | Path, device: str | torch.device = "cpu") -> "Autoencoder":
        """A model saved by ``save``; or, for a directory another library wrote (SAELens, sparsify, Gemma
        Scope, dictionary_learning), the saekit model that computes what that library computes
        (``saekit.interop.load_foreign``, which also returns what the files say about it)."""
        directory = Path(directory)
        if (directory / "model" / "model.safetensors").is_file() and not (directory / "model.safetensors").exists():
            raise UserError(f"{directory}: a run directory; its model is {directory / 'model'}")
        if not (directory / "model.safetensors").is_file():
            # The one import of saekit.interop from here, late: interop builds on this package, and
            # reading other libraries' files is its job (test_layering lists this exception).
            from saekit.interop import detect_format, load_foreign

            detect_format(directory)  # else a UserError that says what is missing or what is there instead
            return load_foreign(directory, device)[0]
        meta = read_json(directory / "config.json")
        model_dict = meta["model"] if meta.get("format") else legacy_config(meta["kind"], meta["model"])
        cfg = from_dict(AutoencoderConfig, {"kind": meta["kind"], **model_dict}, where=f"{directory}: model.")
        model = build(cfg, meta["d_in"])
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model.to(device)


def legacy_config(kind: str, flat: dict) -> dict:
    """A format-1 model config (every family's fields in one flat dict) as ``kind``'s own config."""
    if kind not in registry():  # the reader's own error names the kinds there are
        return dict(flat)
    config = registry()[kind].config
    out = {config.RENAMED.get(k, k): v for k, v in flat.items() if k != "kind"}
    return {k: v for k, v in out.items() if k in field_types(config)}


def build(cfg: AutoencoderConfig, d_in: int) -> Autoencoder:
    """A fresh model of ``cfg``'s family for ``d_in``-dimensional activations."""
    families = registry()
    if cfg.kind not in families:
        raise TypeError(f"{type(cfg).__name__} is not a registered autoencoder config")
    return families[cfg.kind].model(d_in, cfg)
