"""Checkpoints as safetensors + JSON only (never pickles), written atomically.

    run_dir/checkpoint/
        model/                  model.save(): model.safetensors + config.json
        optimizer.safetensors   every tensor of the optimizer state, keyed "state.<param>.<name>"
        optimizer.json          the rest: param_groups and non-tensor state entries
                                (a latent-sharded run: optimizer.rankR.safetensors/.json, one per rank)
        trainer.safetensors     dead-latent tracker, per-rank torch RNG states (uint8), loss history,
                                per-rank model step state (step_state.RANK.NAME)
        trainer.json            step, tokens, per-rank data-loader states, world size, wandb id, ...,
                                and "files": the sha256 of every other file (checked on resume)

A checkpoint is written into checkpoint.tmp/ and swapped in with renames, so a kill at any moment
leaves either the old or the new checkpoint whole (checkpoint.old/ is the old one mid-swap). In a
latent-sharded run each rank writes its own optimizer files into checkpoint.tmp/ (``begin`` first, on
the main rank), so no rank ever holds another's Adam state; the run directory is shared by the ranks
anyway, since each reads its own files back on resume.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from saekit.errors import UserError
from saekit.files import sha256_file, write_json, write_tensors

CHECKPOINT, TMP, OLD = "checkpoint", "checkpoint.tmp", "checkpoint.old"


def begin(run_dir: Path) -> Path:
    """A fresh, empty run_dir/checkpoint.tmp to write a checkpoint into."""
    tmp = run_dir / TMP
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(run_dir: Path) -> Path:
    """Swap the written run_dir/checkpoint.tmp in as run_dir/checkpoint."""
    final, tmp, old = run_dir / CHECKPOINT, run_dir / TMP, run_dir / OLD
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)  # directories cannot be replaced in one rename, so: old aside, new in
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


class DamagedCheckpointError(UserError):
    """A checkpoint file is missing or does not match the sha256 its trainer.json lists."""


def verify(directory: Path, meta: dict, prefix: str) -> None:
    """Check the files under ``prefix`` (a file name, or a folder with a trailing "/") against the
    checksums in ``meta`` (trainer.json); a checkpoint from before they were kept has none to check."""
    files = meta.get("files")
    if files is None:
        return
    names = [n for n in files if n == prefix or (prefix.endswith("/") and n.startswith(prefix))]
    if not names:
        raise DamagedCheckpointError(f"{directory / 'trainer.json'} lists no {prefix}; the checkpoint is "
                                     f"damaged: delete {directory} to train from the start")
    for name in names:
        path = directory / name
        if not path.is_file() or sha256_file(path) != files[name]:
            state = "is missing" if not path.is_file() else "does not match its sha256 in trainer.json"
            raise DamagedCheckpointError(f"{path} {state}; the checkpoint is damaged: restore it, or delete "
                                         f"{directory} to train from the start")


def digests(directory: Path, skip: set[str] = frozenset()) -> dict[str, str]:
    """The sha256 of every file under ``directory`` (relative names) but those in ``skip``."""
    out = {}
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if path.is_file() and name not in skip:
            out[name] = sha256_file(path)
    return out


def find(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    for name in (CHECKPOINT, OLD):  # OLD alone means a kill between the two renames of save()
        path = run_dir / name
        if (path / "trainer.json").exists():
            return path
    return None


# --------------------------------------------------------------------------------------- optimizer
def save_optimizer(directory: Path, optimizer: torch.optim.Optimizer | dict,
                   file: str = "optimizer") -> list[str]:
    """``file``.safetensors + ``file``.json from an optimizer or its ``state_dict()`` (a latent-sharded
    run writes one pair per rank: optimizer.rank0, ...). Returns the two files' names."""
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
    return [f"{file}.safetensors", f"{file}.json"]


def load_optimizer(directory: Path, optimizer: torch.optim.Optimizer, file: str = "optimizer",
                   trainer_meta: dict | None = None) -> None:
    """The optimizer state ``save_optimizer`` wrote, its files checked against ``trainer_meta``'s
    checksums first (when given)."""
    if trainer_meta is not None:
        for suffix in (".safetensors", ".json"):
            verify(directory, trainer_meta, file + suffix)
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
def save_trainer(directory: Path, meta: dict, tensors: dict[str, Tensor],
                 written: dict[str, str] | None = None) -> None:
    """trainer.safetensors, then trainer.json with the sha256 of every file in ``directory``: those in
    ``written`` (other ranks' files, hashed where they were written) as given, the rest hashed here."""
    write_tensors(directory / "trainer.safetensors", tensors)
    written = written or {}
    files = {**digests(directory, skip=set(written) | {"trainer.json"}), **written}
    write_json(directory / "trainer.json", {**meta, "files": files})  # last: marks a complete checkpoint


def load_trainer(directory: Path) -> tuple[dict, dict[str, Tensor]]:
    """trainer.json and trainer.safetensors, the latter checked against the former's checksum."""
    try:
        meta = json.loads((directory / "trainer.json").read_text())
    except ValueError as err:
        raise DamagedCheckpointError(f"{directory / 'trainer.json'} is not valid JSON ({err}); the checkpoint "
                                     f"is damaged: delete {directory} to train from the start") from None
    verify(directory, meta, "trainer.safetensors")
    return meta, load_file(str(directory / "trainer.safetensors"))
