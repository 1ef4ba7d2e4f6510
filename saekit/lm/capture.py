"""Capture activations at TransformerLens-named hooks, with two interchangeable backends.

``hf``: plain forward hooks on the HF modules; the forward pass is abandoned as soon as every
requested hook has fired, so cost grows with the deepest hook, not the model.
``transformer_lens``: TransformerLens 4's TransformerBridge and ``run_with_cache``; slower to start,
but the reference the ``hf`` hook definitions are tested against.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import weakref

import torch
from torch import nn

from saekit.schema import check_choice
from saekit.lm.hooks import UnknownHookError, attach, bridge_hook_name, hook_site, parse_hooks, valid_hook_names
from saekit.errors import ConfigError
from saekit.lm.loading import LoadedLM, load_lm

BACKENDS = ("hf", "transformer_lens")


def check_backend(backend: str) -> None:
    check_choice(backend, BACKENDS, "capture backend")


def make_capture(lm: LoadedLM, hooks: list[str], backend: str = "hf"):
    """A callable ``(input_ids, attention_mask) -> {hook: Tensor[B, T, d_model]}``; close() it."""
    check_backend(backend)
    return HFCapture(lm, hooks) if backend == "hf" else TLCapture(lm, hooks)


def open_capture(cfg, hooks: list[str] | None = None, where: str = "") -> tuple[LoadedLM, "_Capture"]:
    """The model a HarvestConfig names (model, revision, model_dtype, device, backend) and a capture of
    ``hooks`` (default ``cfg.hooks``) on it, once ``cfg.context_size`` is known to fit the model;
    ``where`` prefixes the config keys named in errors (e.g. "data.harvest.")."""
    lm = load_lm(cfg.model, revision=cfg.revision, dtype=cfg.model_dtype, device=cfg.device)
    if cfg.context_size > lm.n_ctx:
        raise ConfigError(f"config key '{where}context_size' ({cfg.context_size}) exceeds the model's "
                          f"{lm.n_ctx} positions")
    return lm, make_capture(lm, cfg.hooks if hooks is None else hooks, backend=cfg.backend)


def position_ids_for(mask: torch.Tensor) -> torch.Tensor | None:
    """Positions counted over real tokens, for rows where padding precedes a real token.

    HF's default is arange, which shifts every real token of a left-padded row; the bridge derives
    positions from the mask for such rows (and only those), so we do the same."""
    arange = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    derived = (mask.long().cumsum(1) - 1).clamp(min=0)
    needs = ((derived != arange) & (mask != 0)).any(1, keepdim=True)
    return torch.where(needs, derived, arange) if bool(needs.any()) else None


class _Capture:
    """Shared plumbing: validated hooks, input checks, context-manager protocol."""

    def __init__(self, lm: LoadedLM, hooks: list[str]):
        self.lm = lm
        self.sites = parse_hooks(lm, hooks)
        self.hooks = [name for name, _, _ in self.sites]

    def _inputs(self, input_ids, attention_mask):
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        input_ids = input_ids.to(self.lm.device)
        if attention_mask is None:
            return input_ids, torch.ones_like(input_ids)
        return input_ids, attention_mask.to(self.lm.device)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Stop(Exception):
    """Raised from the last hook to fire: the rest of the forward pass is not needed."""


class HFCapture(_Capture):
    def __init__(self, lm: LoadedLM, hooks: list[str]):
        super().__init__(lm, hooks)
        self._acts: dict[str, torch.Tensor] = {}
        self._running = False  # taps act only inside our own call: a leaked capture stays inert
        self._handles = [
            attach(*hook_site(lm, layer, kind), self._tap(name)) for name, layer, kind in self.sites
        ]
        params = inspect.signature(lm.model.forward).parameters
        self._takes_positions = "position_ids" in params
        self._takes_use_cache = "use_cache" in params

    def _tap(self, name: str):
        def tap(x: torch.Tensor) -> None:
            if not self._running:
                return
            self._acts[name] = x.clone()  # later layers may update the same buffer in place
            if len(self._acts) == len(self.hooks):
                raise _Stop

        return tap

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        if not self._handles:
            raise RuntimeError("this capture is closed")
        input_ids, mask = self._inputs(input_ids, attention_mask)
        kwargs = {"input_ids": input_ids, "attention_mask": mask}
        positions = position_ids_for(mask)
        if positions is not None and self._takes_positions:
            kwargs["position_ids"] = positions
        if self._takes_use_cache:
            kwargs["use_cache"] = False  # no KV cache to build for a single pass
        self._acts, self._running = {}, True
        try:
            with torch.inference_mode():
                self.lm.model(**kwargs)
        except _Stop:
            pass
        finally:
            self._running = False
        acts, self._acts = self._acts, {}
        missing = [h for h in self.hooks if h not in acts]
        if missing:
            raise RuntimeError(f"hooks never fired during the forward pass: {missing}")
        return {h: acts[h] for h in self.hooks}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class TLCapture(_Capture):
    def __init__(self, lm: LoadedLM, hooks: list[str]):
        super().__init__(lm, hooks)
        self.bridge = bridge_for(lm)
        check_bridge_hooks(lm, self.bridge, self.hooks)
        # run_with_cache stops on entering block k, so k = one past the deepest requested block.
        stop = max(layer for _, layer, _ in self.sites) + 1
        self._stop_at = stop if stop < lm.n_layers else None

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        input_ids, mask = self._inputs(input_ids, attention_mask)
        names = {h: bridge_hook_name(self.lm, h) for h in self.hooks}
        with torch.inference_mode():
            _, cache = self.bridge.run_with_cache(
                input_ids, attention_mask=mask, names_filter=list(names.values()), stop_at_layer=self._stop_at
            )
        return {h: cache[names[h]] for h in self.hooks}


# ------------------------------------------------------------------------------------ the bridge
# One bridge per HF model, built on first use. Keyed weakly so a dropped model frees its bridge;
# the bridge never references the original module, only the twin below.
_BRIDGES: "weakref.WeakKeyDictionary[nn.Module, _Bridged]" = weakref.WeakKeyDictionary()


class _Bridged:
    def __init__(self, bridge, twin: nn.Module):
        self.bridge, self.twin = bridge, twin


def bridged(lm: LoadedLM) -> _Bridged:
    """The TransformerBridge for ``lm`` and the twin module tree it is wired into."""
    if lm.model not in _BRIDGES:
        _BRIDGES[lm.model] = _boot(lm)
    return _BRIDGES[lm.model]


def bridge_for(lm: LoadedLM):
    return bridged(lm).bridge


def _twin(model: nn.Module) -> nn.Module:
    """A second module tree over the SAME parameter and buffer storage.

    Booting a bridge rewires the tree it is given (wrappers replace blocks, attention is
    re-implemented and switched to eager), after which hooks on the original modules no longer
    fire. A twin keeps ``lm.model`` a plain HF model for the hf backend at no cost in weights."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    twin = copy.deepcopy(model, memo)
    for module in twin.modules():
        # Drop copies of hooks someone (e.g. an open hf capture) had on the original.
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    return twin


def _bert_host(twin: nn.Module, lm: LoadedLM) -> nn.Module:
    """The bridge only knows BertForMaskedLM; give the encoder an MLM-shaped host.

    The head's transform is freshly initialized (AutoModel dropped it), so bridge logits are
    meaningless, but no hook we serve reads them."""
    from transformers import BertForMaskedLM
    from transformers.models.bert.modeling_bert import BertOnlyMLMHead

    with torch.device("meta"):  # skip allocating a second encoder we are about to replace
        host = BertForMaskedLM(twin.config)
    host.bert = twin
    with torch.device(lm.device):
        host.cls = BertOnlyMLMHead(twin.config).to(lm.dtype)
    host.cls.predictions.decoder.weight = twin.embeddings.word_embeddings.weight
    return host.eval()


def _boot(lm: LoadedLM) -> _Bridged:
    from transformer_lens.model_bridge import TransformerBridge

    twin = _twin(lm.model)
    host = _bert_host(twin, lm) if lm.architecture == "bert" else twin
    bridge = TransformerBridge.boot_transformers(
        lm.source_path or lm.model_id,
        hf_model=host,
        tokenizer=copy.deepcopy(lm.tokenizer),  # the bridge sets pad/bos tokens on what it gets
        device=lm.device,
        dtype=lm.dtype,
    )
    bridge.eval()
    return _Bridged(bridge, twin)


def check_bridge_hooks(lm: LoadedLM, bridge, hooks: list[str]) -> None:
    for name in hooks:
        if bridge_hook_name(lm, name) not in bridge.hook_dict:
            reason = "TransformerBridge does not expose it for this architecture; use backend='hf'"
            raise UnknownHookError(name, valid_hook_names(lm), lm.model_id, reason)
