"""SAEs saved by other libraries, read into ordinary saekit models.

    from saekit.interop import load_foreign
    model, info = load_foreign("path/to/sae_dir")    # model: a saekit Autoencoder on raw activations
    info["hook_name"], info["model_name"]             # where it was trained, as the files say

The format is told by the files present:

* SAELens (``cfg.json`` + ``sae_weights.safetensors``; 6.x and the pre-6.0 layout): ``standard``,
  ``topk`` and ``jumprelu`` SAEs (saelens.py);
* sparsify (``cfg.json`` + ``sae.safetensors``): TopK SparseCoders (sparsify.py); a trainer run holds
  one such directory per hookpoint, read all at once with ``load_foreign_all``;
* saekit's own (``config.json`` + ``model.safetensors``), for convenience.

Each source's conventions (whether b_dec is subtracted before the encoder, decoder-norm rescaling,
per-latent scales) are folded exactly into saekit's ``pre = (x - b_dec) @ W_enc + b_enc``; the result
reproduces the library's own codes and reconstructions, saves with ``model.save`` and loads with
``Autoencoder.load`` like any saekit model. Only JSON and safetensors are read, never a pickle. What
cannot be reproduced (other architectures, per-token normalizations, skip connections, transcoders) and
damaged or missing files are ``UserError``s naming the file.

Imports only saekit.autoencoders, errors, files and schema: no stage, no CLI.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from saekit.autoencoders import Autoencoder
from saekit.errors import UserError
from saekit.interop import saelens, sparsify

__all__ = ["load_foreign", "load_foreign_all", "detect_format", "FORMATS"]

FORMATS = {
    "saelens": f"{saelens.CONFIG} + {saelens.WEIGHTS}",
    "sparsify": f"{sparsify.CONFIG} + {sparsify.WEIGHTS}",
    "saekit": "config.json + model.safetensors",
}


def detect_format(path: str | Path) -> str:
    """"saelens", "sparsify" or "saekit" for a directory holding one SAE; else a UserError that says
    what is missing (or, for a directory of several SAEs, names them)."""
    directory = Path(path)
    if not directory.exists():
        raise UserError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise UserError(f"{directory}: expected a directory holding an SAE ({_formats_text()})")
    if saelens.is_saelens(directory):
        return "saelens"
    if sparsify.is_sparsify(directory):
        return "sparsify"
    if (directory / "config.json").is_file() and (directory / "model.safetensors").is_file():
        return "saekit"
    if (directory / "cfg.json").is_file():
        raise UserError(f"{directory}: has cfg.json but no weights beside it: expected {saelens.WEIGHTS} "
                        f"(SAELens) or {sparsify.WEIGHTS} (sparsify)")
    for weights in (saelens.WEIGHTS, sparsify.WEIGHTS):
        if (directory / weights).is_file():
            raise UserError(f"{directory / 'cfg.json'}: no such file (a directory with {weights} needs its "
                            "cfg.json beside it)")
    inner = _inner_sae_dirs(directory)
    if inner:
        names = ", ".join(p.name for p in inner)
        raise UserError(f"{directory}: holds several SAEs ({names}); pass one of them, or use "
                        "load_foreign_all to read them all")
    raise UserError(f"{directory}: no SAE found here ({_formats_text()})")


def load_foreign(path: str | Path, device: str = "cpu") -> tuple[Autoencoder, dict[str, Any]]:
    """(model, info) for the SAE in directory ``path``: a saekit model that computes what the source
    library computes on raw activations, and a dict with ``format``, ``architecture``, ``kind``, ``d_in``,
    ``d_sae``, ``k``, ``model_name``, ``hook_name``, ``context_size``, ``prepend_bos``, ``dataset_path``,
    the source's full metadata and ``notes`` (each conversion made, in words)."""
    directory = Path(path)
    fmt = detect_format(directory)
    if fmt == "saelens":
        model, info = saelens.load(directory)
    elif fmt == "sparsify":
        model, info = sparsify.load(directory)
    else:
        model = Autoencoder.load(directory)
        info = {"format": "saekit", "path": str(directory), "architecture": model.kind, "kind": model.kind,
                "d_in": model.d_in, "d_sae": model.n_latents, "k": getattr(model.cfg, "k", None),
                "model_name": None, "hook_name": None, "context_size": None, "prepend_bos": None,
                "dataset_path": None, "notes": []}
    return model.to(device), info


def load_foreign_all(path: str | Path, device: str = "cpu") -> dict[str, tuple[Autoencoder, dict[str, Any]]]:
    """Every SAE of a directory: ``{name: (model, info)}``, one entry for a directory holding one SAE
    (named after it), else one for each subdirectory that holds one (a sparsify run: one per
    hookpoint), in name order."""
    directory = Path(path)
    if not directory.is_dir():
        detect_format(directory)  # raises the right error
    inner = _inner_sae_dirs(directory)
    if _holds_sae(directory) or not inner:
        return {directory.name: load_foreign(directory, device)}
    return {p.name: load_foreign(p, device) for p in inner}


def _holds_sae(directory: Path) -> bool:
    return ((directory / "cfg.json").is_file() or (directory / saelens.WEIGHTS).is_file()
            or (directory / sparsify.WEIGHTS).is_file()
            or ((directory / "config.json").is_file() and (directory / "model.safetensors").is_file()))


def _inner_sae_dirs(directory: Path) -> list[Path]:
    return sorted((p for p in directory.iterdir() if p.is_dir() and _holds_sae(p)), key=lambda p: p.name)


def _formats_text() -> str:
    return "; ".join(f"{name}: {files}" for name, files in FORMATS.items())
