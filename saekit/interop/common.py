"""What the importers share: reading a foreign directory's files (JSON, safetensors and numpy ``.npz``
with ``allow_pickle=False``; never a pickle: dictionary_learning's ``ae.pt``, the one exception, is read
in dictionary_learning.py alone, with ``torch.load(weights_only=True)``), checking what they hold, and
building the saekit model from float64 weights.

Every problem with the files is a ``UserError`` that names the file and says what is wrong: a missing
file, a cfg.json that is not a JSON object, a missing or mistyped key, a missing tensor or one of the
wrong shape.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saekit.autoencoders import Autoencoder, AutoencoderConfig, build
from saekit.errors import UserError
from saekit.files import read_json

_MISSING = object()


def read_config(path: Path) -> dict[str, Any]:
    """A cfg.json as a dict; missing, undecodable or not an object: UserError naming it."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    data = read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object of settings, found a JSON {type(data).__name__}")
    return data


def read_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file, on the CPU; missing or unreadable: UserError naming it."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as err:  # the reader raises its own SafetensorError, or OSError/ValueError
        raise UserError(f"{path}: not a readable safetensors file ({err}); restore or re-save it") from None
    return tensors


def read_npz(path: Path) -> dict[str, Tensor]:
    """Every array of a numpy ``.npz`` file as a CPU tensor, read with ``allow_pickle=False`` (an object
    array is refused, never unpickled); missing or unreadable: UserError naming it."""
    import numpy as np

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except ValueError as err:  # an object array (it would need unpickling), or a damaged member
        raise UserError(f"{path}: cannot be read without unpickling or is damaged ({first_line(err)}); "
                        "re-save it with numpy.savez from plain numeric arrays") from None
    except Exception as err:  # not a zip archive, truncated (zipfile.BadZipFile, EOFError, OSError)
        raise UserError(f"{path}: not a readable .npz file ({first_line(err)}); restore or re-save it") from None
    out = {}
    for name, arr in arrays.items():
        if arr.dtype.kind not in "fiub":
            raise UserError(f"{path}: array '{name}' has dtype {arr.dtype}, expected numbers")
        out[name] = torch.from_numpy(np.ascontiguousarray(arr))
    return out


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most ``limit`` characters (for one-line errors)."""
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def setting(cfg: dict, key: str, kind: type | tuple[type, ...], file: Path, default: Any = _MISSING,
            where: str = "") -> Any:
    """``cfg[key]`` checked to be of ``kind`` (bool is never taken for an int); absent: ``default`` or a
    UserError naming the file and key (``where``: the enclosing keys, e.g. ``"trainer."``)."""
    if key not in cfg or (cfg[key] is None and default is not _MISSING):
        if default is _MISSING:
            raise UserError(f"{file}: key '{where}{key}' is missing")
        return default
    val = cfg[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(val, kinds) and not (isinstance(val, bool) and bool not in kinds)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise UserError(f"{file}: key '{where}{key}' is {val!r}, expected {names}")
    return val


def positive_int(cfg: dict, key: str, file: Path, default: Any = _MISSING, where: str = "") -> int:
    val = setting(cfg, key, int, file, default, where)
    if val is not None and val < 1:
        raise UserError(f"{file}: key '{where}{key}' is {val}, expected a positive integer")
    return val


def tensor(tensors: dict[str, Tensor], name: str, shape: tuple[int, ...], file: Path,
           why: str = "") -> Tensor:
    """``tensors[name]`` as float64, checked to be floating point and of ``shape``."""
    if name not in tensors:
        found = ", ".join(sorted(tensors)) or "none"
        raise UserError(f"{file}: no tensor '{name}' (found: {found})")
    t = tensors[name]
    if not t.is_floating_point():
        raise UserError(f"{file}: tensor '{name}' has dtype {t.dtype}, expected floating point")
    if tuple(t.shape) != tuple(shape):
        raise UserError(f"{file}: tensor '{name}' has shape {list(t.shape)}, expected {list(shape)}"
                        + (f" ({why})" if why else ""))
    return t.double()


def dtype_name(tensors: dict[str, Tensor]) -> str:
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    return dtypes[0] if len(dtypes) == 1 else "/".join(dtypes)


def exact_log(threshold: Tensor) -> Tensor:
    """float32 log-thresholds whose float32 exp is the given threshold wherever such a value exists
    (else the nearest), so that saekit's ``exp(log_threshold)`` compares pre-activations against the
    very same number the source library does, not one an ulp away."""
    t = threshold.float()
    lt = t.double().log().float()
    best, err = lt, (lt.exp() - t).abs()
    for toward in (float("inf"), float("-inf")):
        cand = lt
        for _ in range(4):
            cand = torch.nextafter(cand, torch.full_like(cand, toward))
            e = (cand.exp() - t).abs()
            better = e < err
            best, err = torch.where(better, cand, best), torch.where(better, e, err)
    return best


def positive_threshold(threshold: Tensor, notes: list[str], what: str = "JumpReLU thresholds") -> Tensor:
    """Thresholds <= 0 (the source then computes plain ReLU there) as the smallest positive float32,
    which differs only for pre-activations in (0, 1.2e-38]; noted."""
    if (threshold <= 0).any():
        notes.append(f"{int((threshold <= 0).sum())} {what} are <= 0 (plain ReLU there); stored as the smallest "
                     "positive float32")
        threshold = threshold.clamp_min(torch.finfo(torch.float32).tiny)
    return threshold


def make_sae(kind: str, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, file: Path, *,
             k: int | None = None, threshold: Tensor | None = None,
             magnitude: tuple[Tensor, Tensor] | None = None) -> Autoencoder:
    """A saekit SAE of ``kind`` (relu, topk, batchtopk, jumprelu, gated) holding the given weights, already
    in saekit's convention (pre = (x - b_dec) @ W_enc + b_enc, x_hat = code @ W_dec + b_dec; input_scale 1).
    jumprelu: ``threshold`` [n] (positive); batchtopk: ``k`` and the one inference ``threshold`` (>= 0);
    gated: W_enc/b_enc are the gate's, ``magnitude`` = (r_mag [n], b_mag [n]) the magnitude path's."""
    d_in, n = W_enc.shape
    fields: dict[str, Any] = {"n_latents": n}
    if kind in ("topk", "batchtopk"):
        if k is None or not 1 <= k <= n:
            raise UserError(f"{file}: k is {k}, expected 1 <= k <= d_sae ({n})")
        fields["k"] = k
    try:
        cfg = AutoencoderConfig.for_kind(kind, **fields)
    except UserError as err:
        raise UserError(f"{file}: {err}") from None
    model = build(cfg, d_in)
    with torch.no_grad():
        model.W_enc.copy_(W_enc.float())
        model.b_enc.copy_(b_enc.float())
        model.W_dec.copy_(W_dec.float())
        model.b_dec.copy_(b_dec.float())
        model.input_scale.fill_(1.0)
        if kind == "jumprelu":
            model.log_threshold.copy_(exact_log(threshold))
        elif kind == "batchtopk":
            model.threshold.copy_(threshold.float().reshape(()))
        elif kind == "gated":
            model.r_mag.copy_(magnitude[0].float())
            model.b_mag.copy_(magnitude[1].float())
    return model.eval()
