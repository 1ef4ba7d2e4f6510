"""Replace the activation at one hook while the caller runs ``lm.model`` (downstream evaluation): with
a function of that activation (``splice``: an SAE's reconstruction), or of the activation at an earlier
hook of the same forward pass (``splice_from``: a transcoder's prediction of an MLP's output from the
MLP's input)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from saekit.lm.capture import bridged, check_backend, check_bridge_hooks
from saekit.lm.hooks import attach, bridge_hook_name, hook_site, parse_hooks
from saekit.lm.loading import LoadedLM

Replacement = Callable[[torch.Tensor], torch.Tensor]
# (activation at the spliced hook, activation at the source hook earlier in the same pass) -> replacement
SourcedReplacement = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextmanager
def splice(lm: LoadedLM, hook: str, fn: Replacement, backend: str = "hf") -> Iterator[None]:
    """Inside the block, every forward of ``lm.model`` sees ``fn(act)`` instead of ``act`` at ``hook``.

    ``fn`` maps Tensor[B, T, d_model] to a tensor of the same shape."""
    check_backend(backend)
    (name, layer, kind), = parse_hooks(lm, [hook])
    checked = _checked(fn, name)
    if backend == "hf":
        handle = attach(*hook_site(lm, layer, kind), checked)
        try:
            yield
        finally:
            handle.remove()
        return
    pair = bridged(lm)
    check_bridge_hooks(lm, pair.bridge, [name])
    with pair.bridge.hooks(fwd_hooks=[(bridge_hook_name(lm, name), lambda act, hook: checked(act))]):
        with _redirected(lm.model, pair.twin):
            yield


@contextmanager
def splice_from(lm: LoadedLM, source: str, hook: str, fn: SourcedReplacement,
                backend: str = "hf") -> Iterator[None]:
    """Inside the block, every forward of ``lm.model`` sees ``fn(act, src)`` instead of ``act`` at
    ``hook``, ``src`` being the activation at ``source`` in the same pass (which must fire first, e.g.
    ``blocks.L.mlp.hook_in`` before ``blocks.L.hook_mlp_out``). Both are Tensor[B, T, d]."""
    check_backend(backend)
    (src_name, src_layer, src_kind), = parse_hooks(lm, [source])
    (name, layer, kind), = parse_hooks(lm, [hook])
    seen: list[torch.Tensor] = []

    def record(act: torch.Tensor) -> None:
        seen[:] = [act.clone()]  # a later layer may reuse the buffer in place

    def replace(act: torch.Tensor) -> torch.Tensor:
        if not seen:
            raise RuntimeError(f"splice: {src_name} did not fire before {name}; it must come earlier in the pass")
        src = seen.pop()
        return fn(act, src)

    checked = _checked(replace, name)
    if backend == "hf":
        handles = [attach(*hook_site(lm, src_layer, src_kind), record), attach(*hook_site(lm, layer, kind), checked)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        return
    pair = bridged(lm)
    check_bridge_hooks(lm, pair.bridge, [src_name, name])
    fwd = [(bridge_hook_name(lm, src_name), lambda act, hook: record(act)),
           (bridge_hook_name(lm, name), lambda act, hook: checked(act))]
    with pair.bridge.hooks(fwd_hooks=fwd):
        with _redirected(lm.model, pair.twin):
            yield


def _checked(fn: Replacement, name: str) -> Replacement:
    def run(act: torch.Tensor) -> torch.Tensor:
        out = fn(act)
        if not isinstance(out, torch.Tensor) or out.shape != act.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"splice fn at {name} must return shape {tuple(act.shape)}, got {got}")
        return out

    return run


@contextmanager
def _redirected(model: torch.nn.Module, twin: torch.nn.Module) -> Iterator[None]:
    """Route ``model(...)`` through the bridge-wired twin (same weights) for the duration.

    The bridge's hook points live in the twin's module tree, and the caller's contract is to call
    ``lm.model``; an instance-level ``forward`` shadows the class method and is deleted after."""
    current = vars(model).get("forward")
    if current == twin.forward:  # an outer splice already redirected it
        yield
        return
    if current is not None:
        raise RuntimeError("lm.model.forward is overridden on the instance; cannot redirect it")
    model.forward = twin.forward
    try:
        yield
    finally:
        del model.forward
