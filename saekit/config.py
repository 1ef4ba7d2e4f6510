"""One small dataclass per pipeline stage, loaded from YAML plus command-line overrides.

Unknown keys are errors that name the nearest valid key, so a typo never silently falls back to a
default. Nested sections (e.g. ``model:`` inside a TrainConfig) are dataclasses too and are checked the
same way; overrides use dotted names (``--model.k 64``).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_HOOK = "blocks.3.hook_resid_post"


class ConfigError(ValueError):
    """A configuration file or override that cannot be used as written."""


# --------------------------------------------------------------------------------------------- stages
@dataclass
class HarvestConfig:
    """Which model, text and hook points to capture, and where the store goes."""

    out: str = "runs/store"
    model: str = DEFAULT_MODEL
    revision: str | None = None
    backend: str = "hf"  # "hf" (forward hooks, early stop) or "transformer_lens" (TransformerBridge)
    hooks: list[str] = field(default_factory=lambda: [DEFAULT_HOOK])
    dataset: str = "builtin:stdlib-docstrings"  # HF dataset name, local file/dir, or builtin:...
    dataset_config: str | None = None
    split: str = "train"
    text_column: str = "text"
    context_size: int = 128
    max_tokens: int = 200_000  # activation rows to store per hook (special tokens excluded by default)
    keep_special_tokens: bool = False
    batch_size: int = 32  # sequences per forward pass
    shard_sequences: int = 256  # whole sequences per shard file: fixes shard boundaries for resume
    dtype: str = "float32"  # storage dtype of activations
    model_dtype: str = "float32"
    device: str = "auto"
    progress: bool = True


@dataclass
class DataConfig:
    """How a training run reads a store."""

    store: str = "runs/store"
    hook: str = DEFAULT_HOOK
    batch_size: int = 1024  # activations per training batch (global, over all ranks)
    buffer_tokens: int = 262_144  # token-level shuffle buffer (rows)
    heldout_tokens: int = 0  # rows at the end of the store kept out of training for evaluation
    seed: int = 0
    prefetch: int = 4


@dataclass
class ModelConfig:
    """Which autoencoder to build; unused fields are ignored by families that don't need them."""

    kind: str = "topk"
    n_latents: int = 6144
    k: int = 32
    l1_coefficient: float = 5.0
    # JumpReLU, all in normalized units (E||x||^2 = d, so pre-activations are O(1), not O(1e-3)).
    # A latent firing at value c with a unit-norm decoder row removes at most c^2 of squared error and
    # costs l0_coefficient, so sqrt(l0_coefficient) is the break-even threshold, where the initial
    # threshold starts by default. On the built-in store (6144 latents, 600k tokens) 0.3 gives L0 ~35,
    # 0.5 ~25, 2.0 ~9.
    l0_coefficient: float = 0.3
    jumprelu_threshold: float | None = None  # initial threshold; None: sqrt(l0_coefficient)
    jumprelu_bandwidth: float = 1.0  # STE kernel width: enough pre-activations near theta give it gradient
    # Learning-rate multiplier of the log-thresholds: Adam moves each by ~lr per step, while an encoder
    # column (unit norm, entries ~1/sqrt(d)) changes by ~lr*sqrt(d) relative to itself; without it the
    # thresholds cannot keep up with the encoder and the L0 coefficient barely acts in a short run.
    jumprelu_threshold_lr_scale: float = 10.0
    # SAE decoder rows at init: "data" = centered, normalized sample activations (encoder = transpose),
    # "random" = random unit vectors. Data init converges faster on short runs (measured in the notes).
    decoder_init: str = "data"
    auxk_alpha: float = 1 / 32
    auxk_k: int | None = None  # default d_model // 2
    # A latent idle this many tokens counts as dead (AuxK revives it); default: a twentieth of the run,
    # at most 10M (Gao et al.'s value for long runs).
    dead_tokens: int | None = None
    fast_path: bool = True  # topk: sparse kernels (autoencoders/kernels.py); False = dense reference
    # topk: tokens per chunk of pre-activations, so memory stays bounded at large widths (0: auto, at
    # most 2^27 pre-activations at a time, see kernels.PRE_CHUNK_ELEMENTS).
    chunk_tokens: int = 0
    # topk fast path: where its sparse products run, "torch" (library calls) or "triton" (optional
    # package; one kernel per product, CUDA, see autoencoders/triton_kernels.py).
    sparse_kernels: str = "torch"
    # topk fast path: how the top k are selected, "torch" (torch.topk), "two_stage" (group maxima first,
    # exact, see kernels.two_stage_topk) or "auto" (two_stage on CUDA, torch elsewhere).
    topk_method: str = "auto"
    # batchtopk: EMA decay of the inference threshold, per training step. 0.99 averages the last ~100
    # batches: enough to smooth a per-batch order statistic of k*B values, short enough to follow the
    # drifting activations of a run of a few hundred steps (0.999 still weighted the first, untrained
    # batches by ~0.55 after 600 steps, so inference L0 landed far from k).
    batchtopk_threshold_beta: float = 0.99
    hidden: list[int] = field(default_factory=list)  # nonlinear AE: extra hidden layers
    activation: str = "relu"
    noise: str = "gaussian"  # denoising AE: "gaussian" or "mask"
    noise_level: float = 0.1
    contractive_coefficient: float = 0.1
    visible: str = "gaussian"  # RBM visible units: "gaussian" or "bernoulli"
    cd_k: int = 1
    persistent: bool = False


@dataclass
class TrainConfig:
    """One training run: data, model, optimizer, checkpoints, logging."""

    out: str = "runs/train"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    total_tokens: int = 600_000
    lr: float | None = None  # default: scaled with width (Gao et al.)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_tokens: int = 0
    decay_start: float = 0.8  # fraction of training after which lr decays linearly to 0
    sparsity_warmup_tokens: int = 0
    grad_clip: float = 1.0
    normalize: bool = True
    b_dec_init: str = "geometric_median"  # "geometric_median", "mean" or "zeros"
    dead_window_tokens: int = 1_000_000
    checkpoint_every_tokens: int = 0  # 0 = only at the end
    seed: int = 0
    device: str = "auto"
    autocast: str = "auto"  # "auto" (bf16 on cuda), "bf16", "off"
    compile: bool = False
    wandb: bool = False
    wandb_project: str = "saekit"
    log_every: int = 10
    progress: bool = True


@dataclass
class EvalConfig:
    """`saekit evaluate RUN_DIR`: reconstruction metrics on the store's held-out rows, downstream
    metrics by splicing the reconstruction into the LM; written to RUN_DIR/eval.json."""

    run: str = "runs/train"
    store: str | None = None  # default: the store the run trained on
    heldout_tokens: int | None = None  # the LAST rows of the store; default: the run's data.heldout_tokens
    batch_size: int = 4096
    dead_window_tokens: int | None = None  # dead/dense over the first N held-out tokens (default all)
    downstream: bool = True
    downstream_sequences: int = 64  # whole windows from the held-out end of the store's token table
    device: str = "auto"
    downstream_batch_size: int = 8  # sequences per LM forward pass
    positions: str = "auto"  # spliced positions: "real" (non-special), "all", "auto" (as the store kept rows)
    backend: str = "hf"  # splice backend: "hf" or "transformer_lens"
    error_check: bool = True  # also splice x_hat + (x - x_hat), which must change nothing
    probe: bool = False  # linear probe (word continuation) on the codes and on the raw activations
    probe_tokens: int = 6000
    samples: int = 1000  # RBMs only: Gibbs samples for the moment check (0 = skip)
    gibbs_steps: int = 200
    out: str | None = None  # default: RUN_DIR/eval.json


@dataclass
class AnalyzeConfig:
    run: str = "runs/train"
    store: str | None = None
    out: str | None = None
    top_k: int = 20
    context: int = 8
    quantiles: int = 5
    max_features: int = 200
    worst: int = 20  # list the tokens the model reconstructs worst (anomaly scores)
    max_tokens: int | None = None
    batch_size: int = 4096
    device: str = "auto"
    progress: bool = True


@dataclass
class DemoConfig:
    """`saekit demo`: the whole pipeline on the built-in model and corpus, sized for a 2-core CPU."""

    out: str = "runs/demo"
    model: str = DEFAULT_MODEL
    hook: str = DEFAULT_HOOK
    harvest_tokens: int = 1_000_000  # at most: the built-in corpus runs out at about 408k tokens
    heldout_tokens: int = 50_000
    train_tokens: int = 600_000
    batch_size: int = 512
    n_latents: int = 6144
    k: int = 32
    features: int = 200  # cards in the dashboard
    device: str = "auto"


# ------------------------------------------------------------------------------------------ loading
def _nearest(key: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    return near[0] if near else ""


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    near = _nearest(key, valid)
    hint = f"; did you mean '{near}'?" if near else ""
    return ConfigError(f"unknown config key '{where}{key}'{hint} (valid: {', '.join(sorted(valid))})")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn YAML/CLI values into the declared type; strings from the command line are parsed as YAML."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if isinstance(value, str) and tp is not str:
        value = yaml.safe_load(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{name}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"config key '{name}' must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{name}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        return str(value)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)):
            value = [value]
        return [_coerce(v, args[0], name) for v in value]
    if _is_dataclass_type(tp):
        return from_dict(tp, value, where=name + ".")
    return value


def from_dict(cls, data: dict | None, where: str = ""):
    """Build dataclass ``cls`` from a plain dict, rejecting unknown keys by name."""
    data = dict(data or {})
    types = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types:
            raise _unknown_key(key, list(types), where)
        kwargs[key] = _coerce(value, types[key], where + key)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"model": {"k": 32}}`` -> ``{"model.k": 32}``."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_diff(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every key that differs; a missing key reads '<absent>'."""
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(a.keys() | b.keys())
            if a.get(k, "<absent>") != b.get(k, "<absent>") and k not in ignore]


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys (``model.k``) in a nested dict."""
    data = json.loads(json.dumps(data))
    for dotted, value in overrides.items():
        node = data
        parts = dotted.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{dotted}': '{part}' is not a section")
        node[parts[-1]] = value
    return data


def load_config(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """Load ``cls`` from an optional YAML file, then apply overrides; both are checked key by key."""
    data: dict = {}
    if path is not None:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    data = apply_overrides(data, overrides or {})
    return from_dict(cls, data)


def parse_override_args(args: list[str]) -> dict[str, str]:
    """``['--model.k', '64', '--hooks=a,b']`` -> ``{'model.k': '64', 'hooks': 'a,b'}``."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value")
            i += 1
            value = args[i]
        out[key.replace("-", "_")] = value
        i += 1
    return out


def resolve_device(device):
    """"auto" picks CUDA when present; anything else is passed to torch.device."""
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(name):
    """A torch dtype from its config spelling ("float32", "bf16", ...); dtypes pass through."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise ConfigError(f"unknown dtype '{name}'; valid: float32, float16, bfloat16")
    return table[name]
