"""SAELens's pretrained SAEs by their names: ``RELEASE/SAE_ID``, as ``SAE.from_pretrained(release, sae_id)``.

    load_foreign("gpt2-small-res-jb/blocks.8.hook_resid_pre")
    load_foreign("saelens:gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical")   # explicit
    saekit import gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical runs/gs20 --store ...

The release names live in SAELens's ``pretrained_saes.yaml``, which ships only inside the sae-lens package
(which cannot be installed beside saekit: it pins TransformerLens < 4). ``saelens_releases.json.gz`` beside
this file is that table as SAELens itself reads it, written by ``scripts/make_saelens_releases.py`` (its
``sae_lens_version`` says from which SAELens): for each release the Hub ``repo_id``, the ``model``,
SAELens's ``conversion`` function and ``config_overrides``, and for each SAE id its ``path`` in the repo,
Neuronpedia id and ``norm_scaling_factor``.

A name resolves exactly as SAELens resolves it (the release is everything before the first "/", the SAE
id everything after, which may hold more slashes) to ``hf://REPO_ID/PATH``, fetched and read by hub.py and
the importers. Then what SAELens's ``from_pretrained`` does on top of the files is done here too:

* ``norm_scaling_factor``: an SAE saved with ``normalize_activations: expected_average_only_in`` expects
  activations multiplied by the release's factor f; SAELens folds it (``W_enc * f``, ``W_dec / f``,
  ``b_dec / f``), which is saekit's ``input_scale = f`` exactly, so the model takes raw activations.
* ``config_overrides``: metadata (dataset_path, model_from_pretrained_kwargs, model_name, hook_name) goes
  into the info; a per-token ``normalize_activations`` override is refused as the importer refuses it.
* the Neuronpedia id, release and SAE id go into the info.

Conversions read: SAELens's own format (``conversion: null``), ``gemma_2`` (Gemma Scope ``params.npz``),
``gemma_3`` (Gemma Scope 2) and ``dictionary_learning_1``; the others (Llama Scope, Qwen Scope,
transcoders, temporal SAEs, ...) are a ``UserError`` naming them. A local directory always wins over a
release name (``RELEASE/SAE_ID`` is only looked up when no such path exists).
"""
from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from saekit.errors import UserError
from saekit.schema import nearest

TABLE = Path(__file__).with_name("saelens_releases.json.gz")
PREFIX = "saelens:"
SYNTAX = "RELEASE/SAE_ID (or saelens:RELEASE/SAE_ID)"
# SAELens conversion function -> the saekit importer that reads those files.
CONVERSIONS = {None: "saelens", "gemma_2": "gemmascope", "gemma_3": "gemmascope",
               "dictionary_learning_1": "dictionary_learning"}
METADATA_OVERRIDES = ("dataset_path", "model_from_pretrained_kwargs", "model_name", "hook_name")
PER_TOKEN_NORMS = ("constant_norm_rescale", "layer_norm")


@lru_cache(maxsize=1)
def table() -> dict[str, Any]:
    """``{"sae_lens_version", "releases": {release: {...}}}`` (see the module docstring)."""
    return json.loads(gzip.decompress(TABLE.read_bytes()))


def releases() -> dict[str, dict[str, Any]]:
    return table()["releases"]


def is_release_source(source: Any) -> bool:
    """Whether ``source`` names a SAELens release: ``saelens:...``, or a relative ``RELEASE/SAE_ID`` that
    is no local path and whose first part is a known release."""
    if not isinstance(source, (str, Path)):
        return False
    text = str(source)
    if text.startswith(PREFIX):
        return True
    if text.startswith(("hf:/", "/", ".")) or "/" not in text or Path(text).exists():
        return False
    return text.split("/", 1)[0] in releases()


def resolve(source: str | Path) -> tuple[str, dict[str, Any]]:
    """(``hf://REPO_ID/PATH`` of the SAE, what the table says of it: release, sae_id, repo_id, path, model,
    conversion, importer, neuronpedia_id, norm_scaling_factor, config_overrides, sae_lens_version)."""
    text = str(source)
    text = text[len(PREFIX):] if text.startswith(PREFIX) else text
    release, _, sae_id = text.partition("/")
    known = releases()
    if release not in known:
        hint = nearest(release, known)
        raise UserError(f"{source}: {release!r} is not a SAELens release (as of sae-lens "
                        f"{table()['sae_lens_version']}){f'; did you mean {hint!r}?' if hint else ''} Write "
                        f"{SYNTAX}, or hf://ORG/REPO/PATH for any Hub folder")
    entry = known[release]
    if not sae_id or sae_id not in entry["saes"]:
        ids = list(entry["saes"])
        hint = nearest(sae_id, ids) if sae_id else None
        shown = ", ".join(ids[:5]) + (f", ... ({len(ids)} in all)" if len(ids) > 5 else "")
        raise UserError(f"{source}: release {release!r} has no SAE id {sae_id!r}"
                        f"{f'; did you mean {hint!r}?' if hint else ''} (its ids: {shown})")
    conversion = entry.get("conversion")
    if conversion not in CONVERSIONS:
        readable = ", ".join("SAELens's own format" if c is None else c for c in CONVERSIONS)
        raise UserError(f"{source}: release {release!r} is stored in a layout SAELens converts with "
                        f"{conversion!r}, which saekit does not read (it reads: {readable})")
    overrides = dict(entry.get("config_overrides") or {})
    norm = overrides.get("normalize_activations")
    if norm in PER_TOKEN_NORMS:
        raise UserError(f"{source}: release {release!r} normalizes activations with {norm!r} (every token by its "
                        "own statistics), which a saekit SAE (one constant input scale) cannot reproduce")
    sae = entry["saes"][sae_id]
    path = sae.get("path", sae_id)
    return f"hf://{entry['repo_id']}/{path}", {
        "release": release, "sae_id": sae_id, "repo_id": entry["repo_id"], "path_in_repo": path,
        "release_model": entry.get("model"), "conversion": conversion, "importer": CONVERSIONS[conversion],
        "neuronpedia_id": sae.get("neuronpedia"), "norm_scaling_factor": sae.get("norm_scaling_factor"),
        "config_overrides": overrides, "sae_lens_version": table()["sae_lens_version"]}


def apply(model, info: dict[str, Any], release: dict[str, Any]) -> None:
    """What SAELens's ``from_pretrained`` adds to the files: the norm scaling factor as the input scale,
    the config overrides' metadata, the release's names. ``model``/``info``: the importer's, changed here."""
    if info.get("format") != CONVERSIONS[release["conversion"]]:
        raise UserError(f"{release['release']}/{release['sae_id']}: the files at hf://{release['repo_id']}/"
                        f"{release['path_in_repo']} are in {info.get('format')!r} format, but SAELens reads this "
                        f"release as {release['importer']!r}; the Hub folder has changed since sae-lens "
                        f"{release['sae_lens_version']}")
    notes = info.setdefault("notes", [])
    factor = release["norm_scaling_factor"]
    if info.get("normalize_activations") == "expected_average_only_in":
        if factor is None:
            notes.append("normalize_activations is 'expected_average_only_in' but the release lists no "
                         "norm_scaling_factor (SAELens then skips the folding too): loaded as is")
        else:
            model.input_scale.fill_(float(factor))
            info["normalize_activations"] = "none"
            notes.append(f"the release's norm_scaling_factor {factor:.9g} is the input scale (SAELens folds it "
                         "into the weights): the model takes raw activations")
    overrides = release["config_overrides"]
    meta = info.setdefault("metadata", {})
    for key in METADATA_OVERRIDES:
        if key in overrides:
            meta[key] = overrides[key]
            if key in info:
                info[key] = overrides[key]
    if release["neuronpedia_id"]:
        meta["neuronpedia_id"] = release["neuronpedia_id"]
    info["model_name"] = info.get("model_name") or release["release_model"]
    info.update({k: release[k] for k in ("release", "sae_id", "neuronpedia_id", "conversion", "sae_lens_version")})
