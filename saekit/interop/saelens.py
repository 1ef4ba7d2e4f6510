"""SAELens directories (``cfg.json`` + ``sae_weights.safetensors``) as saekit SAEs.

Two cfg.json layouts exist. SAELens 6.x writes the architecture's own fields (``architecture``,
``d_in``, ``d_sae``, ``apply_b_dec_to_input``, ``normalize_activations``, ``k`` ...) and a ``metadata``
block (model_name, hook_name, context_size, prepend_bos, sae_lens_version ...). Before 6.0 everything
was one flat dict (``hook_point`` or ``hook_name``, ``hook_point_layer``, ``activation_fn_str`` and
``activation_fn_kwargs`` for TopK ...). SAELens tells them apart by ``sae_lens_version`` (top level or in
``metadata``): absent or below 6.0 is the old layout; so does this module, and a ``metadata`` block
without a version is read as 6.x too.

What SAELens computes (``x`` raw, ``s = x - b_dec`` if ``apply_b_dec_to_input`` else ``x``)::

    standard   code = relu(s @ W_enc + b_enc)
    topk       h = s @ W_enc + b_enc; h *= ||W_dec_j|| if rescale_acts_by_decoder_norm
               code = relu(topk_k(h))
    jumprelu   h = s @ W_enc + b_enc; code = relu(h) * (h > threshold)
    gated      code = 1[s @ W_enc + b_gate > 0] * relu(s @ (W_enc * exp(r_mag)) + b_mag)   (saekit's gated, the
               same parameters: W_enc is the gate's, b_gate its bias)
    x_hat = (code / ||W_dec_j|| if rescaled else code) @ W_dec + b_dec

and saekit always computes ``pre = (x - b_dec) @ W_enc + b_enc``. So, exactly (in float64, then stored
as float32): the decoder-norm rescaling moves into the weights (W_enc and b_enc times the norms, W_dec
rows divided by them), and without ``apply_b_dec_to_input`` b_enc becomes ``b_enc + b_dec @ W_enc``
(gated: b_gate + b_dec @ W_enc, and b_mag + (b_dec @ W_enc) * exp(r_mag)).
Before 6.0 a ``scaling_factor`` tensor (``finetuning_scaling_factor``) multiplied the code before the
decoder; it moves into W_dec's rows. A JumpReLU threshold of zero or less acts as plain ReLU there; it is
stored as the smallest positive float32, which differs only for pre-activations in (0, 1.2e-38].

``normalize_activations``: "expected_average_only_in" and "covariance_whitening" are not applied by
SAELens when it loads a directory (training folds them into the weights at its end; a pretrained
release keeps its factor in SAELens's own table), so they are loaded as is, with a note.
"constant_norm_rescale" and "layer_norm" rescale each token by its own norm or spread, which no saekit
SAE (one constant input scale) can do: refused.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from saekit.autoencoders import Autoencoder
from saekit.errors import UserError
from saekit.interop.common import (dtype_name, make_sae, positive_int, read_config, read_tensors, setting,
                                   tensor)

CONFIG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
SPARSITY = "sparsity.safetensors"
SUPPORTED = ("standard", "topk", "jumprelu", "gated")
KIND = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
NORMALIZATIONS_AS_IS = ("none", "expected_average_only_in", "covariance_whitening")
NORMALIZATIONS_PER_TOKEN = ("constant_norm_rescale", "layer_norm")
# What SAELens keeps in the 6.x metadata block (and, before 6.0, at the top level).
METADATA_KEYS = ("model_name", "hook_name", "model_class_name", "hook_head_index", "model_from_pretrained_kwargs",
                 "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice",
                 "dataset_path", "sae_lens_version", "sae_lens_training_version", "hook_name_out",
                 "hook_head_index_out", "hf_hook_name", "hf_hook_name_out")
PRE_6_RENAMED = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
                 "hook_point_layer": "hook_layer", "activation_fn_str": "activation_fn"}


def is_saelens(directory: Path) -> bool:
    return (directory / CONFIG).is_file() and (directory / WEIGHTS).is_file()


def _major(version: Any) -> int | None:
    m = re.match(r"\s*(\d+)", str(version)) if version else None
    return int(m.group(1)) if m else None


def layout_of(cfg: dict) -> str:
    """"6.x" or "pre-6.0", decided as SAELens does (by sae_lens_version), a metadata block counting as 6.x."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else None
    version = cfg.get("sae_lens_version") or (meta or {}).get("sae_lens_version")
    major = _major(version)
    if major is not None:
        return "6.x" if major >= 6 else "pre-6.0"
    return "6.x" if meta is not None else "pre-6.0"


def _architecture(cfg: dict, layout: str, file: Path) -> tuple[str, int | None]:
    """(SAELens architecture, k for topk), refusing what saekit has no family for."""
    supported = ", ".join(SUPPORTED)
    if layout == "6.x":
        arch = setting(cfg, "architecture", str, file)
        k = None
        if arch == "topk":
            k = positive_int(cfg, "k", file, default=100)  # SAELens's TopKSAEConfig default
    else:
        arch = setting(cfg, "architecture", str, file, default="standard")
        act = setting(cfg, "activation_fn", str, file, default="relu")
        kwargs = setting(cfg, "activation_fn_kwargs", dict, file, default={})
        k = None
        if act == "topk" or arch == "topk":
            k = kwargs.get("k", cfg.get("k"))
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise UserError(f"{file}: a TopK SAE needs a positive integer 'activation_fn_kwargs.k', found {k!r}")
            if arch == "standard":
                arch = "topk"  # early TopK SAEs: the standard architecture with a topk activation
        elif act != "relu" and arch in ("standard", "jumprelu"):
            raise UserError(f"{file}: activation function {act!r} has no saekit equivalent (supported: relu, topk)")
    if arch not in SUPPORTED:
        raise UserError(f"{file}: SAELens architecture {arch!r} has no saekit equivalent (supported: {supported})")
    return arch, k


def _metadata(cfg: dict, layout: str) -> dict[str, Any]:
    if layout == "6.x":
        meta = cfg.get("metadata")
        return dict(meta) if isinstance(meta, dict) else {}
    return {k: v for k, v in cfg.items() if k in METADATA_KEYS or k in ("hook_layer", "dataset_trust_remote_code")}


def load(directory: str | Path) -> tuple[Autoencoder, dict[str, Any]]:
    """The SAELens SAE in ``directory`` as a saekit SAE (float32, CPU) and what its files say about it."""
    directory = Path(directory)
    cfg_file, weights_file = directory / CONFIG, directory / WEIGHTS
    raw = read_config(cfg_file)
    layout = layout_of(raw)
    cfg = raw if layout == "6.x" else {PRE_6_RENAMED.get(k, k): v for k, v in raw.items()}
    notes: list[str] = []

    arch, k = _architecture(cfg, layout, cfg_file)
    d_in = positive_int(cfg, "d_in", cfg_file)
    d_sae = positive_int(cfg, "d_sae", cfg_file)
    apply_b_dec = setting(cfg, "apply_b_dec_to_input", bool, cfg_file, default=True)
    norm = setting(cfg, "normalize_activations", (str, bool), cfg_file, default="none")
    if isinstance(norm, bool):  # before 6.0: true meant the April-update scaling
        norm = "expected_average_only_in" if norm else "none"
    if norm in NORMALIZATIONS_PER_TOKEN:
        raise UserError(f"{cfg_file}: normalize_activations {norm!r} rescales every token by its own statistics, "
                        "which a saekit SAE (one constant input scale) cannot reproduce; supported: "
                        f"{', '.join(NORMALIZATIONS_AS_IS)}")
    if norm not in NORMALIZATIONS_AS_IS:
        raise UserError(f"{cfg_file}: unknown normalize_activations {norm!r} (supported: "
                        f"{', '.join(NORMALIZATIONS_AS_IS)})")
    if norm != "none":
        notes.append(f"normalize_activations is {norm!r}, which SAELens does not apply when loading a directory; "
                     "loaded as is, so the model expects the activations SAELens would be given")
    if k is not None and k > d_sae:
        raise UserError(f"{cfg_file}: k is {k}, more than d_sae ({d_sae})")
    rescale = arch == "topk" and setting(cfg, "rescale_acts_by_decoder_norm", bool, cfg_file, default=False)
    reshape = setting(cfg, "reshape_activations", str, cfg_file, default=None)
    if reshape is None:
        hook = cfg.get("hook_name") if layout == "pre-6.0" else (cfg.get("metadata") or {}).get("hook_name")
        reshape = "hook_z" if isinstance(hook, str) and "hook_z" in hook else "none"
    if reshape not in ("none", "hook_z"):
        raise UserError(f"{cfg_file}: unknown reshape_activations {reshape!r} (supported: none, hook_z)")
    if reshape == "hook_z":
        notes.append("reshape_activations is 'hook_z': pass attention outputs flattened to [..., n_heads * d_head]")

    tensors = read_tensors(weights_file)
    why = f"d_in={d_in}, d_sae={d_sae} in {CONFIG}"
    W_enc = tensor(tensors, "W_enc", (d_in, d_sae), weights_file, why)
    b_enc = tensor(tensors, "b_gate" if arch == "gated" else "b_enc", (d_sae,), weights_file, why)
    magnitude = None
    if arch == "gated":
        magnitude = (tensor(tensors, "r_mag", (d_sae,), weights_file, why),
                     tensor(tensors, "b_mag", (d_sae,), weights_file, why))
    W_dec = tensor(tensors, "W_dec", (d_sae, d_in), weights_file, why)
    b_dec = tensor(tensors, "b_dec", (d_in,), weights_file, why)
    threshold = None
    if arch == "jumprelu":
        if "threshold" in tensors or "log_threshold" not in tensors:
            threshold = tensor(tensors, "threshold", (d_sae,), weights_file, why)
        else:  # a training SAE's state saved without SAELens's conversion
            threshold = tensor(tensors, "log_threshold", (d_sae,), weights_file, why).exp()
        if (threshold <= 0).any():
            notes.append(f"{int((threshold <= 0).sum())} JumpReLU thresholds are <= 0 (plain ReLU there); stored "
                         "as the smallest positive float32")
            threshold = threshold.clamp_min(torch.finfo(torch.float32).tiny)
    if layout == "pre-6.0":
        W_dec = _fold_finetuning_scale(cfg, tensors, W_dec, d_sae, weights_file, notes)

    if rescale:  # the code SAELens returns is the rescaled one: fold the norms into encoder and decoder
        norms = W_dec.norm(dim=-1)
        W_enc, b_enc = W_enc * norms, b_enc * norms
        W_dec = W_dec / norms.clamp_min(1e-300)[:, None]
        notes.append("rescale_acts_by_decoder_norm folded into W_enc, b_enc and W_dec")
    if not apply_b_dec:
        shift = b_dec @ W_enc
        b_enc = b_enc + shift
        if magnitude is not None:
            magnitude = (magnitude[0], magnitude[1] + shift * magnitude[0].exp())
        notes.append("apply_b_dec_to_input is false: b_dec @ W_enc folded into b_enc"
                     + (" (b_gate) and, times exp(r_mag), into b_mag" if magnitude is not None else ""))

    model = make_sae(KIND[arch], W_enc, b_enc, W_dec, b_dec, cfg_file, k=k, threshold=threshold, magnitude=magnitude)
    file_dtype = dtype_name(tensors)
    cfg_dtype = cfg.get("dtype")
    if file_dtype != "float32" or (cfg_dtype not in (None, "float32", "torch.float32")):
        notes.append(f"weights stored as {file_dtype} (cfg.json dtype {cfg_dtype!r}); saekit computes in float32")

    meta = _metadata(cfg, layout)
    info = {
        "format": "saelens", "layout": layout, "path": str(directory), "architecture": arch, "kind": KIND[arch],
        "d_in": d_in, "d_sae": d_sae, "k": k, "dtype": file_dtype,
        "apply_b_dec_to_input": apply_b_dec, "normalize_activations": norm, "reshape_activations": reshape,
        "model_name": meta.get("model_name"), "hook_name": meta.get("hook_name"),
        "hook_layer": meta.get("hook_layer"), "hook_head_index": meta.get("hook_head_index"),
        "context_size": meta.get("context_size"), "prepend_bos": meta.get("prepend_bos"),
        "dataset_path": meta.get("dataset_path"),
        "sae_lens_version": meta.get("sae_lens_version") or cfg.get("sae_lens_version"),
        "metadata": meta, "sparsity_file": str(directory / SPARSITY) if (directory / SPARSITY).is_file() else None,
        "notes": notes,
    }
    return model, info


def _fold_finetuning_scale(cfg: dict, tensors: dict, W_dec, d_sae: int, file: Path, notes: list[str]):
    """Before 6.0, ``scaling_factor`` [d_sae] multiplied the code on its way into the decoder."""
    name = next((n for n in ("scaling_factor", "finetuning_scaling_factor") if n in tensors), None)
    if name is None:
        return W_dec
    scale = tensor(tensors, name, (d_sae,), file)
    if torch.equal(scale, torch.ones_like(scale)):
        return W_dec
    if not cfg.get("finetuning_scaling_factor"):
        raise UserError(f"{file}: holds a '{name}' that is not all ones, but {CONFIG} has "
                        "finetuning_scaling_factor false (SAELens refuses this too)")
    notes.append(f"finetuning '{name}' folded into W_dec")
    return W_dec * scale[:, None]
