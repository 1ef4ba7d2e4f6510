"""Gemma Scope SAEs (Google DeepMind's JumpReLU SAEs for Gemma 2 and Gemma 3) as saekit JumpReLU SAEs.

Two layouts, one SAE per folder of a Hugging Face repo:

* Gemma Scope (Gemma 2; repos ``google/gemma-scope-{2b,9b,27b}-{pt,it}-{res,mlp,att}``, folders like
  ``layer_20/width_16k/average_l0_71``): ``params.npz`` alone, holding ``W_enc`` [d, n], ``W_dec`` [n, d],
  ``b_enc`` [n], ``b_dec`` [d] and ``threshold`` [n]. Read with ``numpy.load(allow_pickle=False)``.
* Gemma Scope 2 (Gemma 3; repos ``google/gemma-scope-2-{size}-{pt,it}``, folders like
  ``resid_post/layer_7_width_16k_l0_small``): ``params.safetensors`` with the same tensors under
  lowercase names (``w_enc``, ``w_dec``, ``b_enc``, ``b_dec``, ``threshold``) and a ``config.json``
  (``architecture: "jump_relu"``, ``model_name``, ``hf_hook_point_in`` — the Hugging Face module whose
  output or input the SAE reads, e.g. ``model.layers.7.output`` — ``width``, ``l0``; transcoders add
  ``hf_hook_point_out`` and ``affine_connection``). A folder without config.json is read from its
  tensors alone, as SAELens does.

Either name spelling is accepted in either file (SAELens maps ``w_`` to ``W_`` the same way). What the
SAE computes, on the raw activations (b_dec is not subtracted from the input)::

    pre = x @ W_enc + b_enc        code = pre * (pre > threshold)        x_hat = code @ W_dec + b_dec

(DeepMind's reference writes ``relu(pre) * (pre > threshold)``: the same for threshold >= 0). saekit
computes ``pre = (x - b_dec) @ W_enc + b_enc``, so b_enc becomes ``b_enc + b_dec @ W_enc`` (in float64,
then stored as float32) and the thresholds go in as exact float32 log-thresholds (common.exact_log). A
threshold of zero or less (plain ReLU there) is stored as the smallest positive float32.

Metadata. A params.npz says nothing about where it was trained; when the repo is known (an ``hf://``
source, a directory inside a Hugging Face cache ``models--google--gemma-scope-...`` or under a folder of
the repo's name) the model and hook are told from the repo and folder names the way SAELens's
``gemma_2`` loader does (``res`` -> ``blocks.L.hook_resid_post``, ``mlp`` -> ``blocks.L.hook_mlp_out``,
``att`` -> ``blocks.L.attn.hook_z``, flattened heads). For Gemma Scope 2 the hook comes from
``hf_hook_point_in`` (``model.layers.L.output`` -> resid_post, ``...post_feedforward_layernorm.output`` ->
mlp_out, ``...self_attn.o_proj.input`` -> attn.hook_z). Both were trained on 1024-token sequences that
start with BOS. Embedding SAEs (``embedding/...``) are loaded as published (on Gemma's scaled
embeddings); SAELens rescales them for TransformerLens's unscaled ``hook_embed``, and no hook is named.

Refused: transcoders and cross-layer transcoders (they predict another module's output: an
``hf_hook_point_out`` other than the input hook, ``affine_connection``, an ``affine_skip_connection``
tensor, or a 3-D decoder) and any architecture but ``jump_relu``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from saekit.autoencoders import Autoencoder
from saekit.errors import UserError
from saekit.interop.common import (dtype_name, make_sae, positive_threshold, read_config, read_npz, read_tensors,
                                   setting, tensor)

NPZ = "params.npz"
SAFETENSORS = "params.safetensors"
CONFIG = "config.json"
NAMES = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
CONTEXT_SIZE = 1024  # Gemma Scope's training sequences (BOS first)
_REPO_1 = re.compile(r"gemma-scope-(2b|9b|27b)-(pt|it)-(res|mlp|att)$")
_REPO_2 = re.compile(r"gemma-scope-2-([0-9.]+[mb])-(pt|it)$")
_CACHE_DIR = re.compile(r"models--([^/]+?)--(.+)$")
_HF_HOOKS = ((re.compile(r"model\.layers\.(\d+)\.output$"), "blocks.{}.hook_resid_post"),
             (re.compile(r"model\.layers\.(\d+)\.post_feedforward_layernorm\.output$"), "blocks.{}.hook_mlp_out"),
             (re.compile(r"model\.layers\.(\d+)\.self_attn\.o_proj\.input$"), "blocks.{}.attn.hook_z"))


def is_gemmascope(directory: Path) -> bool:
    return (directory / NPZ).is_file() or (directory / SAFETENSORS).is_file()


def load(directory: str | Path, origin: dict[str, Any] | None = None) -> tuple[Autoencoder, dict[str, Any]]:
    """The Gemma Scope SAE in ``directory`` as a saekit JumpReLU SAE (float32, CPU) and what is known of
    it. ``origin`` (``repo_id`` and ``path_in_repo``, from an ``hf://`` source) names the repo and folder;
    without it they are looked for in the directory's own path."""
    directory = Path(directory)
    notes: list[str] = []
    repo_id, folder = _origin(directory, origin)
    if (directory / NPZ).is_file():
        layout, weights_file = "gemma-scope", directory / NPZ
        raw = read_npz(weights_file)
        cfg, cfg_file = {}, None
    else:
        layout, weights_file = "gemma-scope-2", directory / SAFETENSORS
        cfg_file = directory / CONFIG
        cfg = read_config(cfg_file) if cfg_file.is_file() else {}
        if not cfg_file.is_file():
            notes.append(f"no {CONFIG} beside {SAFETENSORS}: read from the tensors alone")
        _check_config(cfg, cfg_file)
        raw = read_tensors(weights_file)
    if "affine_skip_connection" in raw or "W_skip" in raw:
        raise UserError(f"{weights_file}: holds an affine skip connection: this is a Gemma Scope transcoder, which "
                        "predicts another module's output; saekit loads autoencoders only (supported: Gemma Scope "
                        "JumpReLU SAEs)")
    tensors = {("W_" + name[2:] if name.startswith("w_") else name): t for name, t in raw.items()}
    if "W_enc" not in tensors or tensors["W_enc"].dim() != 2:
        found = ", ".join(sorted(raw)) or "none"
        shape = f"has shape {list(tensors['W_enc'].shape)}" if "W_enc" in tensors else f"is missing (found: {found})"
        raise UserError(f"{weights_file}: tensor 'W_enc' (or 'w_enc') {shape}, expected a [d_in, d_sae] matrix")
    d_in, d_sae = tensors["W_enc"].shape
    why = f"W_enc is [{d_in}, {d_sae}]"
    W_enc_raw = tensor(tensors, "W_enc", (d_in, d_sae), weights_file)
    if "W_dec" in tensors and tensors["W_dec"].dim() == 3:
        raise UserError(f"{weights_file}: tensor 'W_dec' is 3-D {list(tensors['W_dec'].shape)}: a cross-layer "
                        "transcoder, which saekit does not load (supported: Gemma Scope JumpReLU SAEs)")
    W_dec = tensor(tensors, "W_dec", (d_sae, d_in), weights_file, why)
    b_enc = tensor(tensors, "b_enc", (d_sae,), weights_file, why)
    b_dec = tensor(tensors, "b_dec", (d_in,), weights_file, why)
    threshold = positive_threshold(tensor(tensors, "threshold", (d_sae,), weights_file, why), notes)
    width = cfg.get("width")
    if isinstance(width, int) and not isinstance(width, bool) and width != d_sae:
        raise UserError(f"{cfg_file}: key 'width' is {width}, but {weights_file.name} holds {d_sae} latents; "
                        "restore the matching pair of files")
    for name in sorted(set(tensors) - set(NAMES) - {"scaling_factor"}):
        notes.append(f"tensor '{name}' ignored")
    if "scaling_factor" in tensors:  # SAELens's gemma loaders drop an all-ones one and refuse any other
        scale = tensor(tensors, "scaling_factor", (d_sae,), weights_file, why)
        if not bool((scale == 1).all()):
            raise UserError(f"{weights_file}: holds a 'scaling_factor' that is not all ones, which Gemma Scope "
                            "does not define (SAELens refuses it too)")

    b_enc = b_enc + b_dec @ W_enc_raw  # Gemma Scope does not subtract b_dec from the input
    notes.append("b_dec is not subtracted from the input: b_dec @ W_enc folded into b_enc")
    model = make_sae("jumprelu", W_enc_raw, b_enc, W_dec, b_dec, weights_file, threshold=threshold)
    if dtype_name(raw) != "float32":
        notes.append(f"weights stored as {dtype_name(raw)}; saekit computes in float32")

    names = _names(layout, repo_id, folder, cfg, notes)
    info = {
        "format": "gemmascope", "layout": layout, "path": str(directory), "architecture": "jumprelu",
        "kind": "jumprelu", "d_in": d_in, "d_sae": d_sae, "k": None, "dtype": dtype_name(raw),
        "apply_b_dec_to_input": False, "repo_id": repo_id, "path_in_repo": folder, **names,
        "l0": cfg.get("l0", _folder_l0(folder)), "config": cfg or None, "notes": notes,
    }
    return model, info


def _folder_l0(folder: str | None) -> int | None:
    m = re.search(r"average_l0_(\d+)", folder or "")
    return int(m.group(1)) if m else None


def _check_config(cfg: dict, file: Path) -> None:
    if not cfg:
        return
    arch = setting(cfg, "architecture", str, file, default="jump_relu")
    if arch not in ("jump_relu", "jumprelu"):
        raise UserError(f"{file}: architecture {arch!r} has no saekit equivalent here (supported: jump_relu)")
    hook_in = setting(cfg, "hf_hook_point_in", str, file, default=None)
    hook_out = setting(cfg, "hf_hook_point_out", str, file, default=None)
    kind = setting(cfg, "type", str, file, default="")
    if (hook_out is not None and hook_out != hook_in) or setting(cfg, "affine_connection", bool, file, default=False) \
            or "transcoder" in kind or "clt" in kind:
        raise UserError(f"{file}: a transcoder (it reads {hook_in} and predicts {hook_out}); saekit loads "
                        "autoencoders only (supported: Gemma Scope JumpReLU SAEs)")


def _origin(directory: Path, origin: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """(repo id, folder in the repo): given, else read off a Hugging Face cache path
    (``models--ORG--REPO/snapshots/<commit>/FOLDER``) or a path through a folder named like a Gemma Scope repo."""
    if origin and origin.get("repo_id"):
        return origin["repo_id"], origin.get("path_in_repo") or None
    parts = directory.resolve().parts if directory.exists() else directory.parts
    for i, part in enumerate(parts):
        m = _CACHE_DIR.match(part)
        if m and i + 2 < len(parts) and parts[i + 1] == "snapshots":
            return f"{m.group(1)}/{m.group(2)}", "/".join(parts[i + 3:]) or None
    for i in range(len(parts) - 1, -1, -1):
        if _REPO_1.search(parts[i]) or _REPO_2.search(parts[i]):
            return f"google/{parts[i]}", "/".join(parts[i + 1:]) or None
    return None, None


def _names(layout: str, repo_id: str | None, folder: str | None, cfg: dict, notes: list[str]) -> dict[str, Any]:
    """model_name, hook_name, hook_layer, hf_hook_name, context_size, prepend_bos (None where unknown)."""
    out: dict[str, Any] = {"model_name": None, "hook_name": None, "hook_layer": None, "hf_hook_name": None,
                           "context_size": None, "prepend_bos": None, "dataset_path": None}
    repo = (repo_id or "").split("/")[-1]
    layer_m = re.search(r"layer_(\d+)", folder or "")
    layer = int(layer_m.group(1)) if layer_m else None
    m1, m2 = _REPO_1.search(repo), _REPO_2.search(repo)
    if layout == "gemma-scope" and m1:
        size, variant, site = m1.groups()
        out["model_name"] = f"gemma-2-{size}" + ("-it" if variant == "it" else "")
        if "embedding" in (folder or ""):
            notes.append("an embedding SAE, loaded as published (on Gemma's scaled embeddings; SAELens rescales it "
                         "for TransformerLens's hook_embed): no hook named")
        elif layer is not None:
            out["hook_name"] = {"res": "blocks.{}.hook_resid_post", "mlp": "blocks.{}.hook_mlp_out",
                                "att": "blocks.{}.attn.hook_z"}[site].format(layer)
    elif layout == "gemma-scope-2":
        out["model_name"] = cfg.get("model_name") if isinstance(cfg.get("model_name"), str) else (
            f"google/gemma-3-{m2.group(1)}-{m2.group(2)}" if m2 else None)
        hf_hook = cfg.get("hf_hook_point_in") if isinstance(cfg.get("hf_hook_point_in"), str) else None
        out["hf_hook_name"] = hf_hook
        for pattern, name in _HF_HOOKS:
            hm = pattern.match(hf_hook or "")
            if hm:
                layer = int(hm.group(1))
                out["hook_name"] = name.format(layer)
                break
        else:
            if hf_hook is None and layer is not None and folder:  # no config.json: from the folder, as SAELens does
                site = next((s for s in ("resid_post", "mlp_out", "attn_out") if s in folder), None)
                if site:
                    out["hook_name"] = {"resid_post": "blocks.{}.hook_resid_post", "mlp_out": "blocks.{}.hook_mlp_out",
                                        "attn_out": "blocks.{}.attn.hook_z"}[site].format(layer)
    if out["hook_name"] and out["hook_name"].endswith("hook_z"):
        notes.append("an attention SAE (hook_z): pass the attention's per-head outputs flattened to "
                     "[..., n_heads * d_head]")
    out["hook_layer"] = layer if out["hook_name"] else None
    if m1 or m2:
        out["context_size"], out["prepend_bos"] = CONTEXT_SIZE, True
    return out
