"""Checkpoints as safetensors + JSON only (never pickles), written atomically.

    run_dir/checkpoint/
        model/                  model.save(): model.safetensors + config.json
        optimizer.safetensors   every tensor of the optimizer state, keyed "state.<param>.<name>"
        optimizer.json          the rest: param_groups and non-tensor state entries
                                (a latent-sharded run: optimizer.rankR.safetensors/.json, one per rank)
        trainer.safetensors     dead-latent tracker, per-rank torch RNG states (uint8), loss history,
                                per-rank model step state (step_state.RANK.NAME)
        trainer.json            step, tokens, per-rank data-loader states, world size, wandb id, ...

A checkpoint is written into checkpoint.tmp/ and swapped in with renames, so a kill at any moment
leaves either the old or the new checkpoint whole (checkpoint.old/ is the old one mid-swap).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file
from torch import Tensor

from saekit.files import write_json, write_tensors

CHECKPOINT, TMP, OLD = "checkpoint", "checkpoint.tmp", "checkpoint.old"


def save(run_dir: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` to fill a fresh directory, then swap it in as run_dir/checkpoint."""
    final, tmp, old = run_dir / CHECKPOINT, run_dir / TMP, run_dir / OLD
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)  # directories cannot be replaced in one rename, so: old aside, new in
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    for name in (CHECKPOINT, OLD):  # OLD alone means a kill between the two renames of save()
        path = run_dir / name
        if (path / "trainer.json").exists():
            return path
    return None


# --------------------------------------------------------------------------------------- optimizer
def save_optimizer(directory: Path, optimizer: torch.optim.Optimizer | dict, file: str = "optimizer") -> None:
    """``file``.safetensors + ``file``.json from an optimizer or its ``state_dict()`` (a latent-sharded
    run writes one pair per rank: optimizer.rank0, ...)."""
    state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"state.{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    write_tensors(directory / f"{file}.safetensors", tensors)
    write_json(directory / f"{file}.json", {"param_groups": state["param_groups"], "state": scalars})


def load_optimizer(directory: Path, optimizer: torch.optim.Optimizer, file: str = "optimizer") -> None:
    meta = json.loads((directory / f"{file}.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in load_file(str(directory / f"{file}.safetensors")).items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = tensor
    for pid, entries in meta["state"].items():
        state.setdefault(int(pid), {}).update(entries)
    groups = meta["param_groups"]
    for group in groups:  # JSON turned tuples into lists
        for key, value in group.items():
            if isinstance(value, list) and key != "params":
                group[key] = tuple(value)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    _match_param_layouts(optimizer)


def _match_param_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each loaded state tensor its parameter's strides. Files hold contiguous tensors, but a
    parameter may be a transposed view (an SAE's W_enc): fused Adam walks a parameter, its gradient
    and its moments in memory order, so moments of another layout would be paired with the wrong
    elements (torch 2.13) and a resumed run would diverge from an uninterrupted one."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if isinstance(value, Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    optimizer.state[param][name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


# ------------------------------------------------------------------------------------ trainer state
def save_trainer(directory: Path, meta: dict, tensors: dict[str, Tensor]) -> None:
    write_tensors(directory / "trainer.safetensors", tensors)
    write_json(directory / "trainer.json", meta)  # last: its presence marks a complete checkpoint


def load_trainer(directory: Path) -> tuple[dict, dict[str, Tensor]]:
    meta = json.loads((directory / "trainer.json").read_text())
    return meta, load_file(str(directory / "trainer.safetensors"))
