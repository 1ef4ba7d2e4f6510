"""One small dataclass per pipeline stage, loaded from YAML plus command-line overrides.

Every value is checked when the config is read (schema.py: choices, ranges, unknown or renamed keys,
each with a hint); nothing downstream re-checks a string. The ``model:`` section of a TrainConfig is
the config class of its ``kind``, defined beside the model in ``saekit/autoencoders/``. Names carry
their unit: ``*_tokens`` count activation rows, ``*_sequences`` whole token windows, ``*_steps``
optimizer or sampling steps.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from saekit.autoencoders.base import AutoencoderConfig
from saekit.autoencoders.kernels import KernelOptions
from saekit.autoencoders.topk import TopKConfig
from saekit.schema import (ConfigError, FieldError, Section, apply_overrides, check_choice,  # noqa: F401
                           from_dict, read_yaml, to_dict, value)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_HOOK = "blocks.3.hook_resid_post"

Dtype = Literal["float32", "float16", "bfloat16"]
Backend = Literal["hf", "transformer_lens"]  # capture: forward hooks with early stop, or TransformerBridge


def _device_problem(name: str) -> str | None:
    """What is wrong with a device name ("auto", "cpu", "cuda", "cuda:1", ...), or None."""
    if name == "auto":
        return None
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return f"is {name!r}, not a device; use auto, cpu, cuda or cuda:N"
    return None


def device_field():
    return value("auto", check=_device_problem)


# --------------------------------------------------------------------------------------------- stages
@dataclass
class HarvestConfig(Section):
    """Which model, text and hook points to capture, and where the store goes."""

    out: str = "runs/store"
    model: str = DEFAULT_MODEL  # hub id, local directory, or the built-in MiniLM
    revision: str | None = None
    backend: Backend = "hf"
    hooks: list[str] = field(default_factory=lambda: [DEFAULT_HOOK])
    dataset: str = "builtin:stdlib-docstrings"  # HF dataset name, local file/dir, or builtin:...
    dataset_config: str | None = None
    split: str = "train"
    text_column: str = "text"
    text_encoding: str = "utf-8"  # of local text files
    text_errors: Literal["strict", "replace", "ignore"] = "strict"  # an undecodable byte: error, U+FFFD, drop
    context_size: int = value(128, ge=2)  # tokens per window, special tokens included
    max_tokens: int = value(200_000, ge=1)  # activation rows to store per hook (special tokens excluded)
    keep_special_tokens: bool = False
    batch_sequences: int = value(32, ge=1)  # windows per forward pass
    shard_sequences: int = value(256, ge=1)  # windows per shard file: fixes shard boundaries for resume
    dtype: Dtype = "float32"  # storage dtype of activations
    model_dtype: Dtype = "float32"
    device: str = device_field()
    progress: bool = True

    RENAMED = {"batch_size": "batch_sequences"}

    def validate(self) -> None:
        if not self.hooks:
            raise FieldError("hooks", "is empty; name at least one hook, e.g. blocks.3.hook_resid_post")
        if self.shard_sequences % self.batch_sequences:
            # Resumed batches must line up with an uninterrupted run's, or float results could differ.
            raise FieldError("shard_sequences", f"({self.shard_sequences}) must be a multiple of "
                             f"batch_sequences ({self.batch_sequences})")


@dataclass
class CaptureConfig(HarvestConfig):
    """``data.harvest`` of a run with ``data.source: model``: the harvest's own settings (model, dataset,
    context_size, batch_sequences, keep_special_tokens, model_dtype, device, ...) for capturing on the
    fly. ``model`` must be named; ``dtype`` is the shuffle buffer's. The hooks are ``data.hook`` (and
    ``data.target_hook``), and nothing is written, so the store-only keys below must stay unset."""

    model: str | None = None  # hub id, local directory, or all-MiniLM-L6-v2 (required)

    STORE_ONLY: ClassVar[tuple[str, ...]] = ("out", "hooks", "max_tokens", "shard_sequences", "progress")

    def validate(self) -> None:  # not HarvestConfig's: no shards, no hooks list
        if self.model is None:
            raise FieldError("model", "is not set; name the model to capture from (a hub id, a local "
                             f"directory, or {DEFAULT_MODEL})")
        defaults = HarvestConfig()
        for name in self.STORE_ONLY:
            if getattr(self, name) != getattr(defaults, name):
                why = ("the hooks are data.hook and data.target_hook" if name == "hooks"
                       else "the total_tokens of the run decide how much is captured" if name == "max_tokens"
                       else "no store is written")
                raise FieldError(name, f"does not apply with data.source 'model' ({why}); drop it")


@dataclass
class DataConfig(Section):
    """Where a training run's activations come from: a harvested store (``source: store``), or the
    model itself, captured on the fly into the shuffle buffer (``source: model`` with ``harvest:``)."""

    source: Literal["store", "model"] = "store"
    store: str = "runs/store"  # source store only
    harvest: CaptureConfig | None = None  # source model only: what to capture from (CaptureConfig)
    hook: str = DEFAULT_HOOK
    # Transcoders: the activation they predict from `hook`'s, another hook of the same store (e.g. hook
    # blocks.3.mlp.hook_in, target_hook blocks.3.hook_mlp_out); batches are then row-aligned pairs.
    target_hook: str | None = None
    batch_tokens: int = value(1024, ge=1)  # activations per training batch (global, over all ranks)
    buffer_tokens: int = value(262_144, ge=1)  # token-level shuffle buffer
    heldout_tokens: int = value(0, ge=0)  # rows at the end of the store kept out of training for evaluation
    seed: int = 0
    prefetch_batches: int = value(4, ge=1)  # batches the loader's thread prepares ahead

    RENAMED = {"batch_size": "batch_tokens", "prefetch": "prefetch_batches"}

    def validate(self) -> None:
        if self.source == "store" and self.harvest is not None:
            raise FieldError("harvest", "is set, but data.source is 'store' (the store was harvested "
                             "already); set data.source: model to capture from the model, or drop data.harvest")
        if self.source == "model":
            if self.harvest is None:
                raise FieldError("harvest", "is not set, but data.source is 'model'; add a data.harvest "
                                 f"section naming at least its model, e.g. data.harvest.model {DEFAULT_MODEL}")
            if self.heldout_tokens:
                raise FieldError("heldout_tokens", f"({self.heldout_tokens}) needs a store to hold rows out "
                                 "of; with data.source 'model' drop it (evaluate on a harvested store)")


@dataclass
class TrainConfig(Section):
    """One training run: data, model, how its kernels run, optimizer and schedules, logging."""

    out: str = "runs/train"
    data: DataConfig = field(default_factory=DataConfig)
    model: AutoencoderConfig = field(default_factory=TopKConfig)  # the class of model.kind
    kernels: KernelOptions = field(default_factory=KernelOptions)  # the TopK fast path
    total_tokens: int = value(600_000, ge=1)
    # Optimizer (Adam) and schedules, all in tokens so they mean the same at any batch or world size.
    lr: float | None = value(None, gt=0)  # default: scaled with width (Gao et al.)
    betas: list[float] = value(factory=lambda: [0.9, 0.999], ge=0, lt=1)
    lr_warmup_tokens: int = value(0, ge=0)
    lr_decay_start_fraction: float = value(0.8, ge=0, le=1)  # lr decays linearly to 0 after this much
    sparsity_warmup_tokens: int = value(0, ge=0)
    grad_clip: float = value(1.0, ge=0)  # max gradient norm (0: off)
    # Initialization from the first batches.
    normalize: bool = True  # scale inputs to E||x||^2 = d (the scale is saved in the model)
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    # Dead latents: idle this many tokens means dead, and AuxK trains it (default: a twentieth of the
    # run, at most 10M, Gao et al.'s value for long runs); the dead fraction is reported over the last
    # dead_window_tokens.
    dead_after_tokens: int | None = value(None, ge=1)
    dead_window_tokens: int = value(1_000_000, ge=1)
    checkpoint_every_tokens: int = value(0, ge=0)  # 0 = only at the end
    seed: int = 0
    device: str = device_field()
    autocast: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 on CUDA
    compile: bool = False
    # Under torchrun: split a TopK dictionary's latents across the ranks (training/sharded.py) instead
    # of splitting the data; every rank reads the same batches.
    shard_latents: bool = False
    wandb: bool = False
    wandb_project: str = "saekit"
    log_every_steps: int = value(10, ge=0)  # 0: only at the end
    progress: bool = True

    RENAMED = {"warmup_tokens": "lr_warmup_tokens", "decay_start": "lr_decay_start_fraction",
               "log_every": "log_every_steps"}

    def validate(self) -> None:
        if len(self.betas) != 2:
            raise FieldError("betas", f"must be two numbers (Adam's beta1, beta2), got {self.betas}")
        from saekit.autoencoders.base import registry

        kind = self.model.kind
        if self.shard_latents and kind != "topk":
            raise FieldError("shard_latents", f"splits a TopK dictionary across ranks; model.kind is '{kind}' "
                             "(set model.kind topk, or drop shard_latents)")
        predicts = registry()[kind].model.predicts_target
        if self.data.target_hook is not None and not predicts:
            raise FieldError("data.target_hook", f"is set ({self.data.target_hook!r}), but kind '{kind}' "
                             "reconstructs its input; drop data.target_hook, or set model.kind to transcoder "
                             "or skip_transcoder")
        if predicts and self.data.target_hook is None:
            raise FieldError("data.target_hook", f"is not set, but kind '{kind}' predicts a target activation "
                             "from data.hook; set it, e.g. data.hook blocks.3.mlp.hook_in with "
                             "data.target_hook blocks.3.hook_mlp_out")


SUITES = ("core", "absorption", "probing", "interp")  # what `saekit evaluate --suite` accepts
# Prompts for the first-letter task ({word}: one token of the LM's vocabulary); an encoder reads the
# word's own position, so no in-context examples are needed.
ABSORPTION_TEMPLATES = ("{word}", "the word {word} means", "{word} has the first letter:")


def _suite_problem(names: list[str]) -> str | None:
    from saekit.schema import nearest

    for name in names:
        if name not in SUITES:
            return (f"names an unknown evaluation {name!r}; did you mean '{nearest(name, SUITES)}'? "
                    f"(valid: {','.join(SUITES)}, e.g. --suite core,absorption)")
    return None if names else f"is empty; name at least one of {','.join(SUITES)}"


def _template_problem(templates: list[str]) -> str | None:
    bad = [t for t in templates if t.count("{word}") != 1]
    return f"template {bad[0]!r} must hold {{word}} exactly once" if bad else (None if templates else "is empty")


@dataclass
class EvalConfig(Section):
    """`saekit evaluate RUN_DIR`: reconstruction metrics on the store's held-out rows, downstream
    metrics by splicing the reconstruction into the LM; written to RUN_DIR/eval.json."""

    run: str = "runs/train"
    store: str | None = None  # default: the store the run trained on
    heldout_tokens: int | None = value(None, ge=1)  # the LAST rows of the store; default: the run's own
    batch_tokens: int = value(4096, ge=1)
    dead_window_tokens: int | None = value(None, ge=1)  # dead/dense over the first N held-out tokens (default all)
    downstream: bool = True
    downstream_sequences: int = value(64, ge=0)  # whole windows from the held-out end of the token table
    downstream_batch_sequences: int = value(8, ge=1)  # windows per LM forward pass
    positions: Literal["auto", "real", "all"] = "auto"  # spliced: non-special, all, or as the store kept rows
    backend: Backend = "hf"  # splice backend
    error_check: bool = True  # also splice x_hat + (x - x_hat), which must change nothing
    probe: bool = False  # linear probe (word continuation) on the codes and on the raw activations
    probe_tokens: int = value(6000, ge=10)
    rbm_samples: int = value(1000, ge=0)  # RBMs only: Gibbs samples for the moment check (0 = skip)
    gibbs_steps: int = value(200, ge=1)
    device: str = device_field()
    out: str | None = None  # default: RUN_DIR/eval.json
    # The suite beyond reconstruction (saekit/evaluation/suite.py; README "Evaluations beyond
    # reconstruction"): each named evaluation is written into eval.json and as RUN_DIR/eval_<type>.json
    # in SAEBench's schema. core = reconstruction + downstream (the sections above).
    suite: list[str] = value(factory=lambda: ["core"], check=_suite_problem)
    absorption_words: int = value(3000, ge=50)  # single-token words sampled from the LM's vocabulary
    absorption_templates: list[str] = value(factory=lambda: list(ABSORPTION_TEMPLATES), check=_template_problem)
    absorption_max_k: int = value(10, ge=1)  # the most latents a letter may split into
    absorption_min_probe_f1: float = value(0.6, ge=0, le=1)  # letters whose probe does worse are left out (SAEBench: 0.6)
    probing_examples: int = value(2000, ge=20)  # per task, half positive (fewer when the text has fewer)
    probing_k: list[int] = value(factory=lambda: [1, 2, 5, 20], ge=1)
    interp_latents: int = value(100, ge=1)  # latents sampled (among those firing in both halves)
    interp_context_tokens: int = value(4, ge=0)  # tokens each side of a scored position
    interp_explainer: Literal["tokens", "openai"] = "tokens"  # token-set (offline) or a chat endpoint
    interp_base_url: str = "http://127.0.0.1:8000/v1"  # an OpenAI-compatible API (…/chat/completions)
    interp_model: str = "gpt-4o-mini"
    interp_api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key
    seed: int = 0
    progress: bool = True

    RENAMED = {"batch_size": "batch_tokens", "downstream_batch_size": "downstream_batch_sequences",
               "samples": "rbm_samples"}


@dataclass
class AnalyzeConfig(Section):
    """`saekit analyze RUN_DIR`: top-activating contexts per feature and an HTML dashboard."""

    run: str = "runs/train"
    store: str | None = None
    out: str | None = None  # default: RUN_DIR/dashboard
    top_examples: int = value(20, ge=1)  # top-activating examples kept per feature
    context_tokens: int = value(8, ge=0)  # tokens shown on each side of an example
    quantile_bins: int = value(5, ge=1)
    max_features: int = value(200, ge=1)  # cards in the dashboard
    worst_tokens: int = value(20, ge=0)  # list the tokens the model reconstructs worst (anomaly scores)
    max_tokens: int | None = value(None, ge=1)  # store rows to read (default all)
    batch_tokens: int = value(4096, ge=1)
    device: str = device_field()
    progress: bool = True

    RENAMED = {"top_k": "top_examples", "context": "context_tokens", "quantiles": "quantile_bins",
               "worst": "worst_tokens", "batch_size": "batch_tokens"}


@dataclass
class DemoConfig(Section):
    """`saekit demo`: the whole pipeline on the built-in model and corpus, sized for a 2-core CPU."""

    out: str = "runs/demo"
    model: str = DEFAULT_MODEL
    hook: str = DEFAULT_HOOK
    harvest_tokens: int = value(1_000_000, ge=1)  # at most: the built-in corpus runs out at about 408k tokens
    heldout_tokens: int = value(50_000, ge=1)
    train_tokens: int = value(600_000, ge=1)
    batch_tokens: int = value(512, ge=1)
    n_latents: int = value(6144, ge=1)
    k: int = value(32, ge=1)
    features: int = value(200, ge=1)  # cards in the dashboard
    device: str = device_field()

    RENAMED = {"batch_size": "batch_tokens"}


# ------------------------------------------------------------------------------------------ loading
def load_config(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """Load ``cls`` from an optional YAML file, then apply overrides; both are checked key by key."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or {})
    return from_dict(cls, data)


# ------------------------------------------------------------------------------- many runs, one file
# Short names of swept keys in run names: model.l1_coefficient 5 -> "relu-l1=5".
_SHORT = {"l1_coefficient": "l1", "l0_coefficient": "l0", "n_latents": "n", "noise_level": "noise",
          "contractive_coefficient": "c", "total_tokens": "tok", "initial_threshold": "theta"}


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, val in over.items():
        out[key] = _deep_merge(out[key], val) if isinstance(val, dict) and isinstance(out.get(key), dict) \
            else val
    return out


def _point_label(key: str, val) -> str:
    """``model.k``, 16 -> "k16"; ``model.l1_coefficient``, 5.0 -> "l1=5" (an "=" after a trailing digit)."""
    short = _SHORT.get(key.split(".")[-1], key.split(".")[-1])
    return short + ("=" if short[-1].isdigit() else "") + (f"{val:g}" if isinstance(val, float) else str(val))


def expand_models(base: dict, models: list, out: str | Path, where: str,
                  fixed: dict[str, Any] | None = None) -> list[tuple[str, "TrainConfig"]]:
    """(run name, TrainConfig) for every entry of a ``models:`` list and every point of its ``sweep:``,
    in order; shared by ``saekit train`` (a sweep file) and ``saekit compare``.

    Each entry is TrainConfig keys merged over ``base`` (so ``base`` is checked per entry, as that
    entry's kind), plus ``name`` (default: the kind) and ``sweep`` (dotted keys -> lists of values; one
    run per combination, named e.g. ``topk-k16``). Run ``name`` goes to ``<out>/<name>``; ``fixed``
    (dotted keys) is set last, over everything. ``where`` prefixes error messages."""
    if not models:
        raise ConfigError(f"{where}: `models` is empty; list at least one model")
    if not isinstance(models, list):
        raise ConfigError(f"{where}: `models` must be a list of entries, got {models!r}")
    runs: list[tuple[str, TrainConfig]] = []
    for i, entry in enumerate(models):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: models[{i}] must be a mapping, got {entry!r}")
        entry = dict(entry)
        name = str(entry.pop("name", None) or (entry.get("model") or {}).get("kind")
                   or (base.get("model") or {}).get("kind") or "topk")
        sweep = entry.pop("sweep", None) or {}
        if not isinstance(sweep, dict) or not all(isinstance(v, list) and v for v in sweep.values()):
            raise ConfigError(f"{where}: models[{i}].sweep must map keys to non-empty lists, got {sweep!r}")
        for values in itertools.product(*sweep.values()):
            point = dict(zip(sweep, values))
            run_name = name + "".join(f"-{_point_label(k, v)}" for k, v in point.items())
            data = apply_overrides(_deep_merge(base, entry), point)
            data = apply_overrides(data, {**(fixed or {}), "out": str(Path(out) / run_name)})
            try:
                runs.append((run_name, from_dict(TrainConfig, data)))
            except ConfigError as err:
                raise ConfigError(f"{where}: models[{i}] ({run_name}): {err}") from None
    names = [n for n, _ in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{where}: run names must be unique; repeated: {', '.join(dupes)} (give `name`)")
    return runs


def load_train_configs(path: str | Path | None = None,
                       overrides: dict[str, Any] | None = None) -> list[tuple[str, "TrainConfig"]]:
    """The runs of a train YAML: one (its out's name, TrainConfig), or with a top-level ``models:``
    list (see expand_models) one per entry and sweep point, each in ``<out>/<name>``. Command-line
    ``overrides`` apply to every run and win over the entries (``out`` names the parent directory)."""
    data = read_yaml(path) if path is not None else {}
    if "models" not in data:
        cfg = load_config(TrainConfig, path, overrides)
        return [(Path(cfg.out).name, cfg)]
    data = apply_overrides(data, overrides or {})
    models = data.pop("models")
    out = data.get("out", TrainConfig.out)
    fixed = {k: v for k, v in (overrides or {}).items() if k != "out"}
    return expand_models(data, models, out, str(path or "train"), fixed)


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
    return table[check_choice(name, table, "dtype")]
