"""SAE folders of Hugging Face Hub repos as local directories: ``hf://ORG/REPO/PATH[@REVISION]``.

    hf://google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71
    hf://EleutherAI/sae-pythia-70m-32k/layers.3@main
    hf://ORG/REPO@v1.0/PATH                      (huggingface_hub's own order, revision after the repo)

``download`` fetches only the SAE files directly in PATH (every name the importers read: cfg.json,
sae_weights.safetensors, sae.safetensors, params.npz, params.safetensors, config.json, ae.pt, ...; not
the rest of the folder, which for Gemma Scope 2 holds example files of hundreds of MB) with
``huggingface_hub.snapshot_download(repo_id, revision=..., allow_patterns=[...])`` into the ordinary
Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``), and returns ``CACHE/models--ORG--REPO/snapshots/
<commit>/PATH``. Offline (``HF_HUB_OFFLINE=1``, or no network) it is served from that cache when a
snapshot of the revision is there. A repo that does not exist or cannot be reached and is not cached,
a revision that does not exist, a folder with no SAE files: ``UserError`` naming the source.

SAELens's release names (``RELEASE/SAE_ID``, e.g. ``gemma-scope-2b-pt-res-canonical/layer_20/...``) are
resolved to such a source by releases.py.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

from saekit.errors import UserError
from saekit.interop.common import first_line

SCHEME = "hf://"
SYNTAX = "hf://ORG/REPO/PATH[@REVISION]"
_SPECIAL_REVISION = re.compile(r"^refs/(?:convert/[\w.-]+|pr/\d+)")


def is_hub_source(source: Any) -> bool:
    """Whether ``source`` names a Hub folder (a ``Path`` made from "hf://..." has lost a slash: still one)."""
    return isinstance(source, (str, Path)) and str(source).startswith("hf:/")


def parse(source: str | Path) -> tuple[str, str, str | None]:
    """(repo_id, path in the repo ("" for the root), revision or None) of an ``hf://`` source."""
    text = str(source)
    rest = text[len("hf:/"):].lstrip("/")  # "hf://" or a Path's "hf:/"
    shown = SCHEME + rest
    if rest.startswith("models/"):
        rest = rest[len("models/"):]
    for kind in ("datasets/", "spaces/", "buckets/", "kernels/"):
        if rest.startswith(kind):
            raise UserError(f"{shown}: SAEs are read from model repos only, not {kind[:-1]}; write {SYNTAX}")
    segments = rest.split("/")
    if len(segments) < 2 or not segments[0] or not segments[1] or segments[1].startswith("@"):
        raise UserError(f"{shown}: expected {SYNTAX}")
    org, repo = segments[0], segments[1]
    revision = None
    if "@" in repo:  # huggingface_hub's order: ORG/REPO@REVISION/PATH
        repo, after = repo.split("@", 1)
        tail = "/".join([after, *segments[2:]])
        special = _SPECIAL_REVISION.match(tail)
        revision = special.group(0) if special else tail.split("/", 1)[0]
        path = tail[len(revision):].lstrip("/")
    else:
        path = "/".join(segments[2:])
        if "@" in path:
            path, revision = path.rsplit("@", 1)
    path = path.strip("/")
    if revision is not None and not revision.strip():
        raise UserError(f"{shown}: empty revision after '@'; write {SYNTAX}")
    if path and any(part in ("", ".", "..") for part in path.split("/")):
        raise UserError(f"{shown}: path {path!r} has an empty, '.' or '..' segment")
    return f"{org}/{repo}", path, revision


def download(source: str | Path, files: Iterable[str]) -> tuple[Path, dict[str, Any]]:
    """The local directory holding the SAE files ``files`` of ``source``'s folder, and where it came
    from: ``{"source", "repo_id", "path_in_repo", "revision", "commit"}``."""
    repo_id, path, revision = parse(source)
    shown = f"{SCHEME}{repo_id}" + (f"/{path}" if path else "") + (f"@{revision}" if revision else "")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover - transformers brings it
        raise UserError(f"{shown}: reading from the Hub needs huggingface_hub (pip install huggingface_hub)") from None
    names = sorted(set(files))
    patterns = [f"{path}/{name}" if path else name for name in names]
    where = f"{repo_id}" + (f" at revision {revision!r}" if revision else "")
    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except hf_errors.RevisionNotFoundError:
        raise UserError(f"{shown}: {repo_id} has no revision {revision!r}; name a branch, tag or commit of "
                        "it") from None
    except hf_errors.RepositoryNotFoundError:  # GatedRepoError too
        raise UserError(f"{shown}: no model repo {repo_id} on the Hub, or no access to it (private or gated: log in "
                        "with `hf auth login`)") from None
    except hf_errors.HFValidationError as err:
        raise UserError(f"{shown}: {repo_id!r} is not a valid repo id ({first_line(err)}); write {SYNTAX}") from None
    except (OSError, ValueError) as err:  # offline and not cached, network down, incomplete cached snapshot
        from huggingface_hub import constants

        fix = ("unset HF_HUB_OFFLINE to download it" if getattr(constants, "HF_HUB_OFFLINE", False) else
               "check the repo name and the network")
        raise UserError(f"{shown}: {where} is not in the local Hugging Face cache (HF_HUB_CACHE) and cannot be "
                        f"downloaded ({type(err).__name__}: {first_line(err, 120)}); {fix}") from None
    snapshot = Path(local)
    directory = snapshot / path if path else snapshot
    if not directory.is_dir() or not any((directory / name).is_file() for name in names):
        raise UserError(f"{shown}: {where} has no SAE files in {path or 'its root'!r} (looked for "
                        f"{', '.join(names)}); name the folder that holds them")
    return directory, {"source": shown, "repo_id": repo_id, "path_in_repo": path, "revision": revision,
                       "commit": snapshot.name}

