"""saekit SAEs written as directories that SAELens 6.x and sparsify load themselves.

    from saekit.interop.export import export_saelens, export_sparsify
    export_saelens(model, "out/sae", metadata={"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre",
                                                "context_size": 128, "prepend_bos": True}, density=density)
    export_sparsify(topk_model, "out/run/layers.3")   # sparsify.SparseCoder.load_from_disk reads it

The written directory, loaded by the real library (``sae_lens.SAE.load_from_disk``,
``sparsify.SparseCoder.load_from_disk``), gives on RAW activations the codes and reconstructions the
saekit model gives (float32 rounding apart: scripts/check_interop_exports.py checks this against the
real libraries, tests/test_interop_export.py re-imports every export with ``load_foreign``).

The conventions, folded exactly (in float64, stored as float32). saekit computes, with s its
``input_scale``::

    pre = (x * s - b_dec) @ W_enc + b_enc        code = f(pre)        x_hat = (code @ W_dec + b_dec) / s

and ``(x * s - b_dec) @ W_enc = (x - b_dec / s) @ (s * W_enc)``, ``(code @ W_dec + b_dec) / s =
code @ (W_dec / s) + b_dec / s``. So the target gets ``W_enc' = s * W_enc``, ``b_enc' = b_enc``,
``W_dec' = W_dec / s``, ``b_dec' = b_dec / s``, with b_dec' subtracted from the input before the encoder
(SAELens ``apply_b_dec_to_input: true``; sparsify always subtracts it) and added after the decoder. The
pre-activations are the very same numbers, so the codes (not only x_hat) match, thresholds and the top-k
included, without rescaling any threshold. The one inexactness is float32 rounding (about 1e-7 relative):
a pre-activation within that of a JumpReLU/BatchTopK threshold, or two tied for the k-th place, may fall
the other way; no convention here makes that impossible, and on real data it is vanishingly rare.

Families:

* SAELens: relu -> ``standard``; topk -> ``topk`` (``k``, ``rescale_acts_by_decoder_norm: false``:
  SAELens, like saekit, takes the top k of the pre-activations, then ReLU); jumprelu -> ``jumprelu``
  with ``threshold = exp(log_threshold)`` (SAELens: ``relu(h) * (h > threshold)``, the same as saekit's
  ``h * (h > threshold)`` for a positive threshold); batchtopk -> ``jumprelu`` with the one learned
  threshold for every latent, which is how SAELens itself saves a BatchTopK SAE for inference (saekit:
  ``relu(h) * (relu(h) > t)``, equal for t >= 0); matryoshka -> ``jumprelu`` the same way (its groups
  shape training only: at inference every latent is active, as SAELens saves its own Matryoshka
  BatchTopK); gated -> ``gated`` (``W_enc`` = the gate's, ``b_gate``, ``b_mag``, ``r_mag``: SAELens's
  GatedSAE computes ``1[s @ W_enc + b_gate > 0] * relu(s @ (W_enc * exp(r_mag)) + b_mag)``, saekit's
  very equations; the input scale folds into W_enc, which both paths share). A BatchTopK or Matryoshka
  whose threshold was never learned (threshold < 0: saekit then falls back to the batch top-k, which no
  per-token rule reproduces) is refused.
* sparsify: topk only (its ``relu`` then top-k gives saekit's top-k then ReLU code).
* Anything else (PCA, the classical autoencoders, RBMs, or a family the target lacks) is a
  ``UserError`` naming the families that export to that format.

Files. SAELens: ``sae_weights.safetensors`` (``W_enc`` [d, n], ``b_enc``, ``W_dec`` [n, d], ``b_dec``,
jumprelu ``threshold`` [n]; gated ``b_gate``, ``b_mag``, ``r_mag`` [n] instead of ``b_enc``) and ``cfg.json`` in the 6.x layout (``architecture``, ``d_in``, ``d_sae``,
``dtype: "float32"``, ``device: "cpu"``, ``apply_b_dec_to_input: true``, ``normalize_activations:
"none"``, ``reshape_activations``, topk ``k``, and a ``metadata`` block with ``sae_lens_version`` (the
6.x layout marker SAELens reads) and the caller's metadata); with ``density`` also
``sparsity.safetensors`` (key ``sparsity``: log10(density + 1e-10), as SAELens's trainer writes it).
sparsify: ``sae.safetensors`` (``encoder.weight`` [n, d], ``encoder.bias``, ``W_dec``, ``b_dec``) and
``cfg.json`` with exactly the fields ``SparseCoder.save_to_disk`` writes (activation, expansion_factor,
normalize_decoder, num_latents, k, multi_topk, skip_connection, transcode, d_in); its loader drops (and
prints) unknown keys, so the caller's metadata goes to ``saekit_metadata.json`` beside them instead.
Every file is written atomically (saekit.files), weights before cfg.json.

``metadata`` keys (all optional, None = unknown; the four first are always written):

    model_name      str   the transformer (a saekit store's meta "model")
    hook_name       str   the hook the activations came from (TransformerLens name for SAELens use);
                          one ending in "hook_z" sets ``reshape_activations: "hook_z"``, as SAELens does
    context_size    int   tokens per window (the store's context_size)
    prepend_bos     bool  whether the harvest kept the BOS/CLS token: the store's keep_special_tokens
    dataset_path, model_class_name, neuronpedia_id: str; hook_head_index: int;
    model_from_pretrained_kwargs: dict; exclude_special_tokens: bool or list of token ids

Imports only saekit.autoencoders, errors and files (no stage, no CLI, and neither SAELens nor sparsify).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import saekit
from saekit.autoencoders import Autoencoder
from saekit.errors import UserError
from saekit.files import write_json, write_tensors

__all__ = ["export_saelens", "export_sparsify", "SAELENS_FAMILIES", "SPARSIFY_FAMILIES", "METADATA_TYPES"]

# saekit kind -> SAELens architecture; sparsify exports TopK only.
SAELENS_FAMILIES = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
                    "matryoshka": "jumprelu", "gated": "gated"}
SPARSIFY_FAMILIES = ("topk",)
SAELENS_CONFIG, SAELENS_WEIGHTS, SAELENS_SPARSITY = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
SPARSIFY_CONFIG, SPARSIFY_WEIGHTS, SPARSIFY_METADATA = "cfg.json", "sae.safetensors", "saekit_metadata.json"
SAEKIT_FILES = ("config.json", "model.safetensors")
# The layout marker SAELens reads (handle_config_defaulting: absent or < 6.0.0 means the pre-6.0 layout).
SAELENS_LAYOUT_VERSION = "6.0.0"
DENSITY_EPS = 1e-10  # SAELens's _log_feature_sparsity
ALWAYS_WRITTEN = ("model_name", "hook_name", "context_size", "prepend_bos")
METADATA_TYPES: dict[str, tuple[type, ...]] = {
    "model_name": (str,), "hook_name": (str,), "context_size": (int,), "prepend_bos": (bool,),
    "dataset_path": (str,), "model_class_name": (str,), "neuronpedia_id": (str,), "hook_head_index": (int,),
    "model_from_pretrained_kwargs": (dict,), "exclude_special_tokens": (bool, list),
}


def export_saelens(model: Autoencoder | str | Path, out_dir: str | Path, metadata: dict | None = None,
                   density: Tensor | None = None) -> dict[str, Any]:
    """Write ``model`` (a saekit relu, topk, jumprelu, batchtopk, matryoshka or gated SAE, or a saved model's directory) to
    ``out_dir`` as a SAELens 6.x SAE. ``metadata``: see the module docstring; ``density`` [n]: each
    latent's firing fraction in [0, 1], written as ``sparsity.safetensors`` (else that file is not
    written, and a stale one there is removed). Returns what was written: format, path, architecture,
    kind, d_in, d_sae, k, files, notes."""
    model = _as_model(model)
    arch = SAELENS_FAMILIES[_target_family(model, "SAELens", tuple(SAELENS_FAMILIES))]
    meta = _check_metadata(metadata)
    n, d = model.n_latents, model.d_in
    log_density = _log_density(density, n) if density is not None else None
    notes: list[str] = []
    W_enc, b_enc, W_dec, b_dec, s = _folded(model)
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if s != 1.0:
        notes.append(f"input_scale {s:.9g} folded in: W_enc * s, W_dec / s, b_dec / s")
    if model.kind == "jumprelu":
        tensors["threshold"] = model.threshold.detach().float().cpu()
    elif model.kind in ("batchtopk", "matryoshka"):
        t = _batchtopk_threshold(model)
        tensors["threshold"] = torch.full((n,), t, dtype=torch.float32)
        what = "BatchTopK" if model.kind == "batchtopk" else "Matryoshka BatchTopK (every group active)"
        notes.append(f"{what} exported as SAELens jumprelu with its learned threshold {t:.9g} for every latent")
    elif model.kind == "gated":  # SAELens's GatedSAE has saekit's parameters; the gate's bias is b_gate
        tensors = {"W_enc": W_enc, "b_gate": b_enc, "b_mag": _finite(model, "b_mag"),
                   "r_mag": _finite(model, "r_mag"), "W_dec": W_dec, "b_dec": b_dec}

    hook = meta.get("hook_name")
    reshape = "hook_z" if isinstance(hook, str) and hook.endswith("hook_z") else "none"
    if reshape == "hook_z":
        notes.append("hook_name is a hook_z: reshape_activations 'hook_z' (SAELens flattens [..., heads, d_head])")
    block = {"sae_lens_version": SAELENS_LAYOUT_VERSION, "sae_lens_training_version": None,
             **{key: meta.get(key) for key in ALWAYS_WRITTEN},
             **{key: val for key, val in meta.items() if key not in ALWAYS_WRITTEN},
             "saekit_version": saekit.__version__, "saekit_kind": model.kind}
    cfg: dict[str, Any] = {"d_in": d, "d_sae": n, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
                           "normalize_activations": "none", "reshape_activations": reshape, "metadata": block}
    if arch == "topk":
        cfg.update(k=model.cfg.k, rescale_acts_by_decoder_norm=False)
    cfg["architecture"] = arch

    out = _out_dir(out_dir, "SAELens", foreign=(SPARSIFY_WEIGHTS,))  # only now: every check has passed
    _save_tensors(out / SAELENS_WEIGHTS, tensors)
    files = [SAELENS_WEIGHTS, SAELENS_CONFIG]
    if log_density is not None:
        _save_tensors(out / SAELENS_SPARSITY, {"sparsity": log_density})
        files.append(SAELENS_SPARSITY)
    elif (out / SAELENS_SPARSITY).is_file():
        (out / SAELENS_SPARSITY).unlink()
        notes.append(f"removed a stale {SAELENS_SPARSITY} (no density given for this model)")
    write_json(out / SAELENS_CONFIG, cfg)
    return _info("saelens", out, arch, model, files, notes)


def export_sparsify(model: Autoencoder | str | Path, out_dir: str | Path, metadata: dict | None = None
                    ) -> dict[str, Any]:
    """Write a saekit TopK SAE (or a saved one's directory) to ``out_dir`` as a sparsify SparseCoder
    (one hookpoint's directory of a sparsify run). ``metadata`` (see the module docstring), if given,
    goes to ``saekit_metadata.json`` beside the two files sparsify reads. Returns what was written."""
    model = _as_model(model)
    _target_family(model, "sparsify", SPARSIFY_FAMILIES)
    meta = _check_metadata(metadata)
    n, d = model.n_latents, model.d_in
    notes: list[str] = []
    W_enc, b_enc, W_dec, b_dec, s = _folded(model)
    if s != 1.0:
        notes.append(f"input_scale {s:.9g} folded in: W_enc * s, W_dec / s, b_dec / s")
    # sparsify's trainer renormalizes the decoder rows while normalize_decoder is true: claim it only when
    # they already are unit norm (fine-tuning would otherwise change the exported model).
    unit = bool(torch.allclose(W_dec.double().norm(dim=-1), torch.ones(n, dtype=torch.float64), atol=1e-5, rtol=0))
    cfg = {"activation": "topk", "expansion_factor": max(1, n // d), "normalize_decoder": unit, "num_latents": n,
           "k": model.cfg.k, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d}
    tensors = {"encoder.weight": W_enc.T.contiguous(), "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    out = _out_dir(out_dir, "sparsify", foreign=(SAELENS_WEIGHTS,))
    _save_tensors(out / SPARSIFY_WEIGHTS, tensors)
    write_json(out / SPARSIFY_CONFIG, cfg)
    files = [SPARSIFY_WEIGHTS, SPARSIFY_CONFIG]
    if metadata is not None:
        write_json(out / SPARSIFY_METADATA, {**{key: meta.get(key) for key in ALWAYS_WRITTEN}, **meta,
                                             "saekit_version": saekit.__version__, "saekit_kind": model.kind})
        files.append(SPARSIFY_METADATA)
    elif (out / SPARSIFY_METADATA).is_file():
        (out / SPARSIFY_METADATA).unlink()
        notes.append(f"removed a stale {SPARSIFY_METADATA} (no metadata given for this model)")
    return _info("sparsify", out, "topk", model, files, notes)


# ----------------------------------------------------------------------------- helpers
def _as_model(model: Autoencoder | str | Path) -> Autoencoder:
    if isinstance(model, (str, Path)):
        return Autoencoder.load(model)
    if not isinstance(model, Autoencoder):
        raise UserError(f"expected a saekit autoencoder or a saved model's directory, got {type(model).__name__}")
    return model


def _target_family(model: Autoencoder, target: str, families: tuple[str, ...]) -> str:
    if model.kind not in families:
        what = {"pca": "PCA", "rbm": "an RBM"}.get(model.kind, f"a {model.kind!r} autoencoder")
        raise UserError(f"{what} ({type(model).__name__}) cannot be exported to {target}, which has no such "
                        f"family; families that export to {target}: {', '.join(families)}")
    return model.kind


def _check_metadata(metadata: dict | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise UserError(f"metadata must be a dict, got {type(metadata).__name__}")
    allowed = ", ".join(METADATA_TYPES)
    for key, val in metadata.items():
        if key not in METADATA_TYPES:
            raise UserError(f"metadata key {key!r} is not one SAELens keeps (allowed: {allowed})")
        if val is None:
            continue
        kinds = METADATA_TYPES[key]
        if not isinstance(val, kinds) or (isinstance(val, bool) and bool not in kinds):
            raise UserError(f"metadata key {key!r} is {val!r}, expected {' or '.join(k.__name__ for k in kinds)}")
        if key == "context_size" and val < 1:
            raise UserError(f"metadata key 'context_size' is {val}, expected a positive integer")
        if key == "exclude_special_tokens" and isinstance(val, list) and not all(
                isinstance(t, int) and not isinstance(t, bool) for t in val):
            raise UserError("metadata key 'exclude_special_tokens' must be a bool or a list of token ids")
    return dict(metadata)


def _log_density(density: Tensor, n: int) -> Tensor:
    density = torch.as_tensor(density).detach().cpu()
    if tuple(density.shape) != (n,):
        raise UserError(f"density has shape {list(density.shape)}, expected [{n}] (one firing fraction per latent)")
    density = density.double()
    if not torch.isfinite(density).all() or (density < 0).any() or (density > 1).any():
        raise UserError("density must hold each latent's firing fraction, finite and in [0, 1]")
    return torch.log10(density + DENSITY_EPS).float().contiguous()


def _batchtopk_threshold(model: Autoencoder) -> float:
    t = float(model.threshold.detach().float().item())
    if not math.isfinite(t) or t < 0:
        raise UserError(f"this BatchTopK SAE's inference threshold was never learned (threshold {t}; it falls "
                        "back to the batch top-k, which no per-token rule reproduces): train it, then export; "
                        f"families that export to SAELens: {', '.join(SAELENS_FAMILIES)}")
    return t


def _finite(model: Autoencoder, name: str) -> Tensor:
    t = getattr(model, name).detach().float().cpu().contiguous()
    if not torch.isfinite(t).all():
        raise UserError(f"this model's {name} holds NaN or infinite values; it cannot be exported")
    return t


def _folded(model: Autoencoder) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """(W_enc, b_enc, W_dec, b_dec, s) in the target's convention (input scale folded in), float32 CPU."""
    s = float(model.input_scale.detach().double().item())
    if not math.isfinite(s) or s <= 0:
        raise UserError(f"this model's input_scale is {s}, expected a positive number")
    p = {name: getattr(model, name).detach().cpu().double() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    for name, t in p.items():
        if not torch.isfinite(t).all():
            raise UserError(f"this model's {name} holds NaN or infinite values; it cannot be exported")
    if model.kind == "jumprelu" and torch.isnan(model.log_threshold.detach()).any():
        raise UserError("this model's log_threshold holds NaN values; it cannot be exported")
    f32 = lambda t: t.float().contiguous()  # noqa: E731
    return f32(p["W_enc"] * s), f32(p["b_enc"]), f32(p["W_dec"] / s), f32(p["b_dec"] / s), s


def _out_dir(out_dir: str | Path, target: str, foreign: tuple[str, ...]) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; pass a directory to export the SAE into")
    for name in foreign:
        if (out / name).is_file():
            raise UserError(f"{out}: already holds {name} (another format's SAE); export to an empty directory")
    if all((out / name).is_file() for name in SAEKIT_FILES):
        raise UserError(f"{out}: already holds a saekit model ({' + '.join(SAEKIT_FILES)}); export the "
                        f"{target} copy to another directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    write_tensors(path, {k: v.float() for k, v in tensors.items()}, metadata={"format": "pt"})


def _info(fmt: str, out: Path, arch: str, model: Autoencoder, files: list[str], notes: list[str]) -> dict[str, Any]:
    return {"format": fmt, "path": str(out), "architecture": arch, "kind": model.kind, "d_in": model.d_in,
            "d_sae": model.n_latents, "k": getattr(model.cfg, "k", None) if model.kind == "topk" else None,
            "files": files, "notes": notes}
