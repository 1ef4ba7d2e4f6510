"""Edits an attached run applies at a hook: to SAE features (ablate, clamp, scale) before decoding,
and to the hook's output (add a steering vector). Each is removable and usable as a context manager."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from saekit.errors import UserError


def as_index(x) -> int | None:
    """``x`` as a Python int when it is one integer (int, numpy or 0-d tensor), else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, Tensor):
        return int(x) if x.ndim == 0 and not x.is_floating_point() else None
    try:
        return operator.index(x)
    except TypeError:
        return None


def position_mask(positions, n_tokens: int, device) -> Tensor | None:
    """Bool [T] for ``positions`` (None: every position; negative ints count from the end)."""
    if positions is None:
        return None
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        if positions.shape[-1] != n_tokens:
            raise UserError(f"position mask has {positions.shape[-1]} entries but the sequence has {n_tokens} tokens")
        return positions.to(device)
    if isinstance(positions, slice):
        idx = list(range(n_tokens))[positions]
    elif isinstance(positions, int):
        idx = [positions]
    else:
        idx = [int(p) for p in positions]
    mask = torch.zeros(n_tokens, dtype=torch.bool, device=device)
    for p in idx:
        if not -n_tokens <= p < n_tokens:
            raise UserError(f"position {p} is out of range for a sequence of {n_tokens} tokens")
        mask[p] = True
    return mask


def feature_ids(features, n_latents: int, hook: str) -> list[int]:
    one = as_index(features)
    ids = [one] if one is not None else [int(f) for f in features]
    bad = [f for f in ids if not 0 <= f < n_latents]
    if bad:
        raise UserError(f"feature index {bad[0]} is out of range for the SAE at {hook} "
                        f"({n_latents} features: 0..{n_latents - 1})")
    return ids


@dataclass(eq=False)
class Edit:
    """One edit at one hook. ``remove()`` undoes it; ``with run.ablate(...):`` removes it on exit."""

    hook: str
    positions: object = None
    _owner: list | None = field(default=None, repr=False)

    def remove(self) -> None:
        if self._owner is not None and self in self._owner:
            self._owner.remove(self)

    def __enter__(self) -> "Edit":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass(eq=False)
class FeatureEdit(Edit):
    """code[..., features] <- value (clamp; 0 is ablation) or code * factor (scale)."""

    features: list[int] = field(default_factory=list)
    value: float | None = None
    factor: float | None = None

    def apply(self, code_BTN: Tensor) -> Tensor:
        where = position_mask(self.positions, code_BTN.shape[1], code_BTN.device)
        sel = code_BTN[..., self.features]
        new = sel * self.factor if self.factor is not None else torch.full_like(sel, self.value)
        if where is not None:
            new = torch.where(where[None, :, None], new, sel)
        out = code_BTN.clone()
        out[..., self.features] = new
        return out


@dataclass(eq=False)
class VectorEdit(Edit):
    """output += coef * vector (a feature's decoder direction or any [d_model] vector)."""

    vector: Tensor | None = None
    coef: float = 1.0

    def apply(self, out_BTD: Tensor) -> Tensor:
        add = (self.coef * self.vector).to(out_BTD.device, out_BTD.dtype)
        where = position_mask(self.positions, out_BTD.shape[1], out_BTD.device)
        if where is None:
            return out_BTD + add
        return out_BTD + where[None, :, None].to(out_BTD.dtype) * add
