"""SAEs saved by other libraries, read into ordinary saekit models.

    from saekit.interop import load_foreign
    model, info = load_foreign("path/to/sae_dir")    # model: a saekit Autoencoder on raw activations
    info["hook_name"], info["model_name"]             # where it was trained, as the files say
    model, info = load_foreign("hf://google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71")

A source is a local directory holding one SAE, or a folder of a Hugging Face model repo written
``hf://ORG/REPO/PATH[@REVISION]`` (hub.py: only the SAE files are fetched, into the ordinary Hugging
Face cache, which also serves them offline; ``saekit import`` takes the same sources), or a SAELens
release name ``RELEASE/SAE_ID`` (releases.py: SAELens's own table, shipped with saekit, gives the repo and
folder; the release's norm scaling factor and config overrides are applied as SAELens applies them).

The format is told by the files present:

* SAELens (``cfg.json`` + ``sae_weights.safetensors``; 6.x and the pre-6.0 layout): ``standard``,
  ``topk``, ``jumprelu`` and ``gated`` SAEs (saelens.py);
* sparsify (``cfg.json`` + ``sae.safetensors``): TopK SparseCoders (sparsify.py); a trainer run holds
  one such directory per hookpoint, read all at once with ``load_foreign_all``;
* Gemma Scope (``params.npz``) and Gemma Scope 2 (``params.safetensors`` with lowercase tensor names,
  and its ``config.json``): JumpReLU SAEs (gemmascope.py); model and hook are told from the repo and
  folder names, or from config.json's ``hf_hook_point_in``;
* dictionary_learning (``config.json`` + ``ae.pt``): AutoEncoder (and AutoEncoderNew), AutoEncoderTopK,
  BatchTopKSAE, MatryoshkaBatchTopKSAE, JumpReluAutoEncoder and GatedAutoEncoder
  (dictionary_learning.py); a trainer run holds one ``trainer_<i>`` directory per dictionary;
* saekit's own (``config.json`` + ``model.safetensors``), for convenience.

Each source's conventions (whether b_dec is subtracted before the encoder, decoder-norm rescaling,
per-latent scales, a gate folded into a threshold) are folded exactly into saekit's
``pre = (x - b_dec) @ W_enc + b_enc``; the result reproduces the library's own codes and
reconstructions, saves with ``model.save`` and loads with ``Autoencoder.load`` like any saekit model
(``Autoencoder.load`` on such a directory calls ``load_foreign`` itself).
Only JSON, safetensors and numpy ``.npz`` (``allow_pickle=False``) are read, never a pickle, with one
exception: dictionary_learning's ``ae.pt`` is a torch pickle and is read ONLY with
``torch.load(path, weights_only=True)``, torch's restricted unpickler (tensors and plain containers;
classes, functions and code are refused, and that refusal is a ``UserError`` naming the file). What
cannot be reproduced (other architectures, per-token normalizations, skip connections, transcoders) and
damaged or missing files are ``UserError``s naming the file.

Imports only saekit.autoencoders, errors, files and schema: no stage, no CLI.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from saekit.autoencoders import Autoencoder
from saekit.errors import UserError
from saekit.interop import dictionary_learning, gemmascope, hub, releases, saelens, sparsify

__all__ = ["load_foreign", "load_foreign_all", "detect_format", "FORMATS", "SAE_FILES"]

SAEKIT_FILES = ("config.json", "model.safetensors")
FORMATS = {
    "saelens": f"{saelens.CONFIG} + {saelens.WEIGHTS}",
    "sparsify": f"{sparsify.CONFIG} + {sparsify.WEIGHTS}",
    "gemmascope": f"{gemmascope.NPZ}, or {gemmascope.SAFETENSORS} + {gemmascope.CONFIG}",
    "dictionary_learning": f"{dictionary_learning.CONFIG} + {dictionary_learning.WEIGHTS}",
    "saekit": " + ".join(SAEKIT_FILES),
}
# Every file an importer reads: what an hf:// source fetches of its folder.
SAE_FILES = (saelens.CONFIG, saelens.WEIGHTS, saelens.SPARSITY, sparsify.WEIGHTS, gemmascope.NPZ,
             gemmascope.SAFETENSORS, gemmascope.CONFIG, dictionary_learning.WEIGHTS, *SAEKIT_FILES)
_WEIGHTS = (saelens.WEIGHTS, sparsify.WEIGHTS, gemmascope.NPZ, gemmascope.SAFETENSORS, dictionary_learning.WEIGHTS)


def detect_format(path: str | Path) -> str:
    """"saelens", "sparsify", "gemmascope", "dictionary_learning" or "saekit" for a local directory holding
    one SAE; else a UserError that says what is missing (or, for a directory of several SAEs, names them)."""
    directory = Path(path)
    if hub.is_hub_source(path):
        raise UserError(f"{path}: a Hub source; load it with load_foreign (detect_format reads local directories)")
    if not directory.exists():
        raise UserError(f"{directory}: no such directory{_hub_hint(directory)}")
    if not directory.is_dir():
        raise UserError(f"{directory}: expected a directory holding an SAE ({_formats_text()})")
    if saelens.is_saelens(directory):
        return "saelens"
    if sparsify.is_sparsify(directory):
        return "sparsify"
    if gemmascope.is_gemmascope(directory):
        return "gemmascope"
    if dictionary_learning.is_dictionary_learning(directory):
        return "dictionary_learning"
    if all((directory / name).is_file() for name in SAEKIT_FILES):
        return "saekit"
    if (directory / "cfg.json").is_file():
        raise UserError(f"{directory}: has cfg.json but no weights beside it: expected {saelens.WEIGHTS} "
                        f"(SAELens) or {sparsify.WEIGHTS} (sparsify)")
    for weights in (saelens.WEIGHTS, sparsify.WEIGHTS):
        if (directory / weights).is_file():
            raise UserError(f"{directory / 'cfg.json'}: no such file (a directory with {weights} needs its "
                            "cfg.json beside it)")
    if (directory / dictionary_learning.WEIGHTS).is_file():
        raise UserError(f"{directory / dictionary_learning.CONFIG}: no such file (a dictionary_learning "
                        f"{dictionary_learning.WEIGHTS} needs the config.json its trainer wrote beside it)")
    inner = _inner_sae_dirs(directory)
    if inner:
        names = ", ".join(p.name for p in inner)
        raise UserError(f"{directory}: holds several SAEs ({names}); pass one of them, or use "
                        "load_foreign_all to read them all")
    if (directory / "config.json").is_file():
        raise UserError(f"{directory}: has config.json but no weights beside it: expected "
                        f"{dictionary_learning.WEIGHTS} (dictionary_learning), {gemmascope.SAFETENSORS} (Gemma "
                        "Scope 2) or model.safetensors (saekit)")
    raise UserError(f"{directory}: no SAE found here ({_formats_text()})")


def load_foreign(path: str | Path, device: str = "cpu") -> tuple[Autoencoder, dict[str, Any]]:
    """(model, info) for the SAE in directory ``path`` (or ``hf://ORG/REPO/PATH[@REVISION]``): a saekit
    model that computes what the source library computes on raw activations, and a dict with ``format``,
    ``architecture``, ``kind``, ``d_in``, ``d_sae``, ``k``, ``model_name``, ``hook_name``,
    ``context_size``, ``prepend_bos``, ``dataset_path``, the source's full metadata and ``notes`` (each
    conversion made, in words); a Hub source adds ``source``, ``repo_id``, ``path_in_repo``, ``revision``
    and ``commit``; a SAELens release name (``RELEASE/SAE_ID``, releases.py) adds ``release``, ``sae_id``,
    ``neuronpedia_id``, ``conversion`` and the ``sae_lens_version`` of the table it was found in."""
    if releases.is_release_source(path):
        source, release = releases.resolve(path)
        try:
            model, info = load_foreign(source, device)
        except UserError as err:  # name what the user wrote, then where it led
            raise UserError(f"{path} (SAELens release) at {err}") from None
        releases.apply(model, info, release)
        return model, info
    origin = None
    if hub.is_hub_source(path):
        directory, origin = hub.download(path, SAE_FILES)
    else:
        directory = Path(path)
    fmt = detect_format(directory)
    if fmt == "saelens":
        model, info = saelens.load(directory)
    elif fmt == "sparsify":
        model, info = sparsify.load(directory)
    elif fmt == "gemmascope":
        model, info = gemmascope.load(directory, origin)
    elif fmt == "dictionary_learning":
        model, info = dictionary_learning.load(directory)
    else:
        model = Autoencoder.load(directory).eval()  # as every importer's model: inference mode
        info = {"format": "saekit", "path": str(directory), "architecture": model.kind, "kind": model.kind,
                "d_in": model.d_in, "d_sae": model.n_latents, "k": getattr(model.cfg, "k", None),
                "model_name": None, "hook_name": None, "context_size": None, "prepend_bos": None,
                "dataset_path": None, "notes": []}
    if origin is not None:
        info.update(origin)
    return model.to(device), info


def load_foreign_all(path: str | Path, device: str = "cpu") -> dict[str, tuple[Autoencoder, dict[str, Any]]]:
    """Every SAE of a directory: ``{name: (model, info)}``, one entry for a directory holding one SAE
    (named after it; so is an ``hf://`` source), else one for each subdirectory that holds one (a
    sparsify run: one per hookpoint; a dictionary_learning run: one per trainer), in name order."""
    if hub.is_hub_source(path) or releases.is_release_source(path):
        model, info = load_foreign(path, device)
        return {Path(info["path"]).name: (model, info)}
    directory = Path(path)
    if not directory.is_dir():
        detect_format(directory)  # raises the right error
    inner = _inner_sae_dirs(directory)
    if _holds_sae(directory) or not inner:
        return {directory.name: load_foreign(directory, device)}
    return {p.name: load_foreign(p, device) for p in inner}


def _holds_sae(directory: Path) -> bool:
    return ((directory / "cfg.json").is_file() or any((directory / name).is_file() for name in _WEIGHTS)
            or all((directory / name).is_file() for name in SAEKIT_FILES))


def _inner_sae_dirs(directory: Path) -> list[Path]:
    return sorted((p for p in directory.iterdir() if p.is_dir() and _holds_sae(p)), key=lambda p: p.name)


def _hub_hint(directory: Path) -> str:
    """For a relative path that reads like ORG/REPO/... or RELEASE/SAE_ID: how to name a Hub folder."""
    text = str(directory)
    if directory.is_absolute() or text.startswith(".") or "/" not in text:
        return ""
    return (f" (for a folder of a Hugging Face repo write hf://{text}; for a SAELens release, RELEASE/SAE_ID "
            f"with a release of sae-lens {releases.table()['sae_lens_version']}'s table)")


def _formats_text() -> str:
    return "; ".join(f"{name}: {files}" for name, files in FORMATS.items())
