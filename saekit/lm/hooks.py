"""TransformerLens hook names -> HuggingFace modules, one layout per architecture family.

The four hook kinds mean exactly what TransformerLens 4's TransformerBridge means by them (see
``transformer_lens/model_bridge/supported_architectures/<family>.py`` and ``BlockBridge``):

- ``hook_resid_pre``:  the hidden state entering block i (the block's first input).
- ``hook_resid_post``: the hidden state leaving block i (the block's first output).
- ``hook_attn_out``:   the output of the module the bridge calls ``attn``; where the block has a
  post-attention norm (Gemma 2: ``ln1_post``) the bridge re-points it at that norm's output.
- ``hook_mlp_out``:    likewise for the MLP (Gemma 2: ``ln2_post``).
- ``mlp.hook_in``:     the input of the module the bridge calls ``mlp`` (its ``blocks.i.mlp.hook_in``):
  what the MLP reads, after the pre-MLP norm where there is one. With ``hook_mlp_out`` it is the pair a
  transcoder learns to map (``MLP_HOOKS`` below).

BERT is post-LN and the bridge wraps the whole ``BertAttention`` as ``attn``, whose output is
``LayerNorm(x + attention(x))``: so for BERT ``hook_attn_out`` is the normed mid-block residual, not
the attention's additive contribution. BERT has no single MLP module, so the bridge points
``hook_mlp_out`` at ``output.dense`` (before dropout, the residual add and the LayerNorm). We follow
the bridge in both cases so the two backends agree. For the same reason BERT's ``mlp.hook_in`` is the
input of ``intermediate`` (the bridge's ``blocks.i.mlp.in.hook_in``; its containerless ``mlp`` never
runs), i.e. ``hook_attn_out``'s value, which BERT's MLP reads.

The MLP input/output pair of block L, per architecture (the HF modules, relative to the block):

| architecture | ``blocks.L.mlp.hook_in`` (input of) | ``blocks.L.hook_mlp_out`` (output of) |
| --- | --- | --- |
| GPT-2 | ``mlp`` (after ``ln_2``) | ``mlp`` |
| GPT-NeoX (Pythia) | ``mlp`` (after ``post_attention_layernorm``) | ``mlp`` |
| Llama, Qwen2 | ``mlp`` (after ``post_attention_layernorm``) | ``mlp`` |
| Gemma 2 | ``mlp`` (after ``pre_feedforward_layernorm``) | ``post_feedforward_layernorm`` |
| BERT, MiniLM | ``intermediate`` (= the attention block's normed output) | ``output.dense`` |

TransformerLens's own ``hook_mlp_in`` is another tensor (the residual before the pre-MLP norm, where
there is one), so saekit does not use that name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from saekit.errors import UserError
from saekit.schema import nearest

HOOK_KINDS = ("resid_pre", "attn_out", "mlp_in", "mlp_out", "resid_post")  # firing order within a block
# The name of each kind after ``blocks.{i}.`` (all but mlp_in are ``hook_{kind}``).
_SUFFIX = {kind: "mlp.hook_in" if kind == "mlp_in" else f"hook_{kind}" for kind in HOOK_KINDS}
_KIND_OF = {suffix: kind for kind, suffix in _SUFFIX.items()}
_HOOK_RE = re.compile(r"blocks\.(\d+)\.(\S+)")


@dataclass(frozen=True)
class Layout:
    """Where one family keeps its blocks, relative to ``model.base_model``."""

    blocks: str  # dotted path to the ModuleList of blocks
    attn_out: str  # module inside a block whose output TL calls hook_attn_out
    mlp_out: str  # module inside a block whose output TL calls hook_mlp_out
    mlp_in: str = "mlp"  # module inside a block whose input TL calls mlp.hook_in
    is_causal: bool = True


# Keyed by HF ``config.model_type``.
LAYOUTS: dict[str, Layout] = {
    "gpt2": Layout("h", "attn", "mlp"),
    "gpt_neox": Layout("layers", "attention", "mlp"),  # parallel or sequential residual alike
    "llama": Layout("layers", "self_attn", "mlp"),
    "qwen2": Layout("layers", "self_attn", "mlp"),
    # Gemma 2 norms each sublayer's output before the residual add; TL's attn/mlp_out are the normed ones.
    "gemma2": Layout("layers", "post_attention_layernorm", "post_feedforward_layernorm"),
    "bert": Layout("encoder.layer", "attention", "output.dense", mlp_in="intermediate", is_causal=False),
}


def mlp_hooks(layer: int) -> tuple[str, str]:
    """(MLP input, MLP output) hook names of block ``layer``: a transcoder's ``data.hook`` and
    ``data.target_hook``. The same names for every architecture; the table above says what they are."""
    return hook_name(layer, "mlp_in"), hook_name(layer, "mlp_out")


class UnsupportedArchitectureError(UserError, ValueError):
    """A model whose family has no hook layout here."""


class UnknownHookError(UserError, ValueError):
    """A hook name this model does not have; the message names the nearest and lists the valid ones."""

    def __init__(self, hook: str, valid: list[str], model: str = "", reason: str = ""):
        self.hook, self.valid = hook, valid
        where = f" for {model}" if model else ""
        why = f" ({reason})" if reason else ""
        near = nearest(hook, valid)
        hint = f"; did you mean {near!r}?" if near else ""
        super().__init__(f"unknown hook {hook!r}{where}{why}{hint} (valid hooks: {', '.join(valid)})")


def layout_for(architecture: str) -> Layout:
    try:
        return LAYOUTS[architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(LAYOUTS)}"
        ) from None


def hook_name(layer: int, kind: str) -> str:
    return f"blocks.{layer}.{_SUFFIX[kind]}"


def bridge_hook_name(lm, name: str) -> str:
    """The TransformerBridge's name for saekit hook ``name`` (they differ only for BERT's mlp.hook_in)."""
    m = _HOOK_RE.fullmatch(name)
    if m and m.group(2) == _SUFFIX["mlp_in"] and lm.architecture == "bert":
        return f"blocks.{m.group(1)}.mlp.in.hook_in"
    return name


def valid_hook_names(lm) -> list[str]:
    """Every hook this model serves, block by block, in the order they fire."""
    return [hook_name(i, kind) for i in range(lm.n_layers) for kind in HOOK_KINDS]


def parse_hooks(lm, hooks: list[str] | str) -> list[tuple[str, int, str]]:
    """Validate hook names; return (name, layer, kind) per distinct name, in the order given."""
    if isinstance(hooks, str):
        hooks = [hooks]
    if not hooks:
        raise UserError("no hooks requested; name at least one, e.g. blocks.3.hook_resid_post")
    parsed = []
    for name in dict.fromkeys(hooks):
        m = _HOOK_RE.fullmatch(name)
        if m is None or m.group(2) not in _KIND_OF:
            raise UnknownHookError(name, valid_hook_names(lm), lm.model_id)
        layer = int(m.group(1))
        if layer >= lm.n_layers:
            reason = f"the model has {lm.n_layers} layers"
            raise UnknownHookError(name, valid_hook_names(lm), lm.model_id, reason)
        parsed.append((name, layer, _KIND_OF[m.group(2)]))
    return parsed


def blocks_of(lm) -> nn.ModuleList:
    return lm.model.base_model.get_submodule(layout_for(lm.architecture).blocks)


def hook_site(lm, layer: int, kind: str) -> tuple[nn.Module, str]:
    """The HF module carrying a hook, and whether the activation is its 'input' or 'output'."""
    layout = layout_for(lm.architecture)
    block = blocks_of(lm)[layer]
    if kind == "resid_pre":
        return block, "input"
    if kind == "resid_post":
        return block, "output"
    if kind == "mlp_in":
        return block.get_submodule(layout.mlp_in), "input"
    return block.get_submodule(layout.attn_out if kind == "attn_out" else layout.mlp_out), "output"


Tap = Callable[[torch.Tensor], "torch.Tensor | None"]


def attach(module: nn.Module, side: str, tap: Tap):
    """Call ``tap`` on the hidden state entering or leaving ``module``; a tensor it returns
    replaces that hidden state. Returns the removable handle."""
    if side == "input":

        def pre_hook(mod, args, kwargs):
            # HF blocks take hidden_states positionally, but accept it by name too.
            new = tap(args[0] if args else kwargs["hidden_states"])
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def post_hook(mod, args, out):
        # Blocks and attention modules may return tuples (hidden, attn weights, ...).
        new = tap(out[0] if isinstance(out, tuple) else out)
        if new is None:
            return None
        return (new, *out[1:]) if isinstance(out, tuple) else new

    return module.register_forward_hook(post_hook)
