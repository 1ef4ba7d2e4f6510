"""dictionary_learning (github.com/saprmarks/dictionary_learning) directories (``config.json`` + ``ae.pt``)
as saekit SAEs.

``trainSAE`` writes one directory per trainer (``SAVE_DIR/trainer_<i>/``): ``config.json`` =
``{"trainer": trainer.config, "buffer": buffer.config}`` (the trainer's ``dict_class``, ``activation_dim``,
``dict_size``, ``k``, ``lm_name``, ``layer``, ``submodule_name`` ...; the buffer's ``ctx_len`` ...) and
``ae.pt`` = ``torch.save({name: tensor for name, tensor in ae.state_dict().items()})``. With
``normalize_activations`` the trainer scales the biases (and thresholds) back before saving, so the
saved dictionary reads raw activations.

``ae.pt`` is a torch pickle, the one exception to this package's never-unpickle rule: it is read ONLY
with ``torch.load(path, weights_only=True)``, torch's restricted unpickler that rebuilds tensors and
plain containers (dict, list, tuple, numbers, strings) and refuses anything else (classes, functions,
code); whatever it refuses is a ``UserError`` naming the file. Nothing else here calls ``torch.load``.

What each dictionary class computes (``x`` raw) and how it becomes saekit's
``pre = (x - b_dec) @ W_enc + b_enc`` (conversions in float64, stored as float32):

    AutoEncoder            code = relu((x - bias) @ encoder.weight.T + encoder.bias)
                           x_hat = code @ decoder.weight.T + bias                        -> relu
    AutoEncoderNew         code = relu(x @ encoder.weight.T + encoder.bias)
                           x_hat = code @ decoder.weight.T + decoder.bias                -> relu, b_dec @ W_enc
                                                                                            folded into b_enc
    AutoEncoderTopK        code = top-k of relu((x - b_dec) @ encoder.weight.T + encoder.bias)
                           (its ``threshold`` buffer is used only by ``encode(use_threshold=True)``, not by
                           forward: kept in the metadata)                                 -> topk, k = buffer k
    BatchTopKSAE           a = relu((x - b_dec) @ encoder.weight.T + encoder.bias); code = a * (a > threshold)
                                                                                          -> batchtopk
    MatryoshkaBatchTopKSAE the same with W_enc/b_enc/W_dec parameters (all groups active at inference)
                                                                                          -> batchtopk
    JumpReluAutoEncoder    pre = x @ W_enc + b_enc (b_dec not subtracted); code = relu(pre * (pre > threshold))
                                                                                          -> jumprelu, b_dec @ W_enc
                                                                                             folded into b_enc
    GatedAutoEncoder       h = (x - decoder_bias) @ encoder.weight.T
                           code = 1[h + gate_bias > 0] * relu(exp(r_mag) * h + mag_bias) -> gated (W_enc =
                                                                                  encoder.weight.T, b_enc =
                                                                                  gate_bias, b_mag = mag_bias)

Thresholds <= 0 are stored as the smallest positive float32 (common.positive_threshold). A BatchTopK
whose threshold was never learned (< 0) makes the library's forward plain ReLU (``a * (a > -1)``): it is
loaded as a saekit relu SAE, with a note. The folded-bias conversion compares the very numbers
the library compares only up to float32 rounding: a pre-activation within ~1e-7 (relative) of its
threshold may fall the other way.

``AutoEncoder.from_pretrained`` normalizes the decoder's columns by default, which rescales the codes
(not x_hat); loaded here is the saved module itself, as SAELens's dictionary_learning loader does (a note
says when the decoder columns are not unit norm).

Refused, naming the supported classes: other dictionary classes (IdentityDict, cross-coders ...), and an
``ae.pt`` that is a training backup (``{"step", "ae", "optimizer", ...}``) instead of the final state
dict. Metadata: ``lm_name`` -> model_name; ``submodule_name`` ``resid_post_layer_L`` / ``mlp_out_layer_L`` /
``attn_out_layer_L`` (or a parent folder so named, as SAEBench's runs are) -> ``blocks.L.hook_resid_post`` /
``hook_mlp_out`` / ``hook_attn_out`` (else no hook name); the buffer's ``ctx_len`` -> context_size.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saekit.autoencoders import Autoencoder
from saekit.errors import UserError
from saekit.interop.common import (first_line, dtype_name, make_sae, positive_int, positive_threshold, read_config,
                                   setting, tensor)

CONFIG = "config.json"
WEIGHTS = "ae.pt"
KIND = {"AutoEncoder": "relu", "AutoEncoderNew": "relu", "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk",
        "MatryoshkaBatchTopKSAE": "batchtopk", "JumpReluAutoEncoder": "jumprelu", "GatedAutoEncoder": "gated"}
SUPPORTED = tuple(KIND)
_SUBMODULE = re.compile(r"(resid_post|mlp_out|attn_out)_layer_(\d+)$")
_HOOK = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out", "attn_out": "hook_attn_out"}


def is_dictionary_learning(directory: Path) -> bool:
    return (directory / WEIGHTS).is_file() and (directory / CONFIG).is_file()


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """``ae.pt`` through ``torch.load(weights_only=True)`` only: a dict of tensors, else a UserError naming
    the file (anything the restricted unpickler refuses, a damaged file, a training backup)."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for refused objects, RuntimeError/EOFError for damage
        raise UserError(f"{path}: not a plain state dict that torch.load(weights_only=True) accepts "
                        f"({first_line(err)}); re-save it as a dict of tensors") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, expected the state dict (a dict of tensors) that "
                        "dictionary_learning saves")
    if "ae" in state and isinstance(state["ae"], dict) and ("optimizer" in state or "step" in state):
        raise UserError(f"{path}: a training backup (step {state.get('step')!r}, with optimizer state), not the "
                        "final dictionary: let the training finish (it overwrites ae.pt with the dictionary)")
    for name, val in state.items():
        if not isinstance(val, Tensor):
            raise UserError(f"{path}: entry {name!r} is a {type(val).__name__}, not a tensor; expected the state "
                            "dict that dictionary_learning saves")
    return state


def load(directory: str | Path) -> tuple[Autoencoder, dict[str, Any]]:
    """The dictionary_learning dictionary in ``directory`` as a saekit SAE (float32, CPU), and its metadata."""
    directory = Path(directory)
    cfg_file, weights_file = directory / CONFIG, directory / WEIGHTS
    cfg = read_config(cfg_file)
    trainer = setting(cfg, "trainer", dict, cfg_file)
    buffer = cfg.get("buffer") if isinstance(cfg.get("buffer"), dict) else {}
    dict_class = setting(trainer, "dict_class", str, cfg_file, where="trainer.")
    if dict_class not in KIND:
        raise UserError(f"{cfg_file}: dictionary class {dict_class!r} has no saekit equivalent (supported: "
                        f"{', '.join(SUPPORTED)})")
    d = positive_int(trainer, "activation_dim", cfg_file, where="trainer.")
    n = positive_int(trainer, "dict_size", cfg_file, where="trainer.")
    state = read_state_dict(weights_file)
    notes: list[str] = []
    why = f"activation_dim={d}, dict_size={n} in {CONFIG}"

    def get(name: str, shape: tuple[int, ...]) -> Tensor:
        return tensor(state, name, shape, weights_file, why)

    k = threshold = magnitude = None
    extra: dict[str, Any] = {}
    kind = KIND[dict_class]
    if dict_class in ("AutoEncoder", "AutoEncoderNew"):
        W_enc, b_enc = get("encoder.weight", (n, d)).T, get("encoder.bias", (n,))
        W_dec = get("decoder.weight", (d, n)).T
        if "bias" in state or "decoder.bias" not in state:
            b_dec = get("bias", (d,))
        else:  # AutoEncoderNew: no bias subtracted before the encoder, the decoder's own bias after it
            b_dec = get("decoder.bias", (d,))
            b_enc = b_enc + b_dec @ W_enc
            notes.append("AutoEncoderNew layout (decoder.bias, nothing subtracted before the encoder): "
                         "decoder.bias @ W_enc folded into b_enc")
        norms = W_dec.norm(dim=-1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-5, rtol=0):
            notes.append("decoder columns are not unit norm: AutoEncoder.from_pretrained would rescale the codes "
                         "(normalize_decoder=True); these are the saved module's codes (x_hat is the same)")
    elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        W_enc, b_enc = get("encoder.weight", (n, d)).T, get("encoder.bias", (n,))
        W_dec, b_dec = get("decoder.weight", (d, n)).T, get("b_dec", (d,))
        k = _k(state, trainer, n, weights_file, cfg_file, notes)
        threshold = get("threshold", ()) if "threshold" in state else None
    elif dict_class == "MatryoshkaBatchTopKSAE":
        W_enc, b_enc, W_dec, b_dec = get("W_enc", (d, n)), get("b_enc", (n,)), get("W_dec", (n, d)), get("b_dec", (d,))
        k = _k(state, trainer, n, weights_file, cfg_file, notes)
        threshold = get("threshold", ())
        groups = state.get("group_sizes")
        if groups is not None:
            sizes = [int(v) for v in groups.flatten().tolist()]
            if sum(sizes) != n or any(s < 1 for s in sizes):
                raise UserError(f"{weights_file}: group_sizes {sizes} do not split the {n} latents")
            extra["group_sizes"] = sizes
            notes.append("Matryoshka groups only shape training; at inference every group is active")
    elif dict_class == "JumpReluAutoEncoder":
        W_enc, b_enc, W_dec, b_dec = get("W_enc", (d, n)), get("b_enc", (n,)), get("W_dec", (n, d)), get("b_dec", (d,))
        threshold = positive_threshold(get("threshold", (n,)), notes)
        b_enc = b_enc + b_dec @ W_enc
        notes.append("b_dec is not subtracted from the input (apply_b_dec_to_input false): b_dec @ W_enc folded "
                     "into b_enc")
    else:  # GatedAutoEncoder: saekit's gated, the same parameters under other names
        W_enc, b_dec = get("encoder.weight", (n, d)).T, get("decoder_bias", (d,))
        W_dec = get("decoder.weight", (d, n)).T
        b_enc, magnitude = get("gate_bias", (n,)), (get("r_mag", (n,)), get("mag_bias", (n,)))
    if kind == "topk" and threshold is not None:
        extra["inference_threshold"] = float(threshold)
        threshold = None
    if kind == "batchtopk":
        t = float(threshold) if threshold is not None else -1.0
        extra["inference_threshold"] = t
        if t < 0:
            kind = "relu"
            notes.append(f"BatchTopK threshold {t} was never learned: dictionary_learning's forward then returns "
                         "relu(pre) (a * (a > threshold)); loaded as a relu SAE")
            threshold = None
    model = make_sae(kind, W_enc, b_enc, W_dec, b_dec, weights_file, k=k, threshold=threshold,
                     magnitude=magnitude)
    dtype = dtype_name({name: t for name, t in state.items() if t.is_floating_point()})
    if dtype != "float32":
        notes.append(f"tensors stored as {dtype}; saekit computes in float32")

    sub = trainer.get("submodule_name") if isinstance(trainer.get("submodule_name"), str) else None
    # the hook: from the submodule's name, else from a run folder named like one (SAEBench's
    # .../resid_post_layer_12/trainer_0)
    m = next((m for m in map(_SUBMODULE.match, (sub or "", directory.parent.name)) if m), None)
    layer = trainer.get("layer") if isinstance(trainer.get("layer"), int) else None
    info = {
        "format": "dictionary_learning", "path": str(directory), "architecture": dict_class, "kind": kind,
        "d_in": d, "d_sae": n, "k": k if kind in ("topk", "batchtopk") else None, "dtype": dtype,
        "trainer_class": trainer.get("trainer_class"), "model_name": trainer.get("lm_name"),
        "hook_name": f"blocks.{m.group(2)}.{_HOOK[m.group(1)]}" if m else None, "hook_layer": layer,
        "submodule_name": sub,
        "context_size": buffer.get("ctx_len") if isinstance(buffer.get("ctx_len"), int) else None,
        "prepend_bos": None, "dataset_path": None, **extra, "config": cfg, "notes": notes,
    }
    return model, info


def _k(state: dict[str, Tensor], trainer: dict, n: int, weights_file: Path, cfg_file: Path, notes: list[str]) -> int:
    """k as the model uses it: the saved ``k`` buffer (it may differ from the trainer's target k when k was
    annealed), else the trainer's."""
    cfg_k = trainer.get("k") if isinstance(trainer.get("k"), int) and not isinstance(trainer.get("k"), bool) else None
    if "k" in state:
        buf = state["k"]
        if buf.numel() != 1 or buf.is_floating_point() or buf.is_complex():
            raise UserError(f"{weights_file}: buffer 'k' is {buf.dtype} of shape {list(buf.shape)}, expected one "
                            "integer")
        k = int(buf.item())
        if cfg_k is not None and cfg_k != k:
            notes.append(f"k buffer is {k}, the trainer's k {cfg_k}: the buffer's (what forward uses) is taken")
    elif cfg_k is not None:
        k = cfg_k
    else:
        raise UserError(f"{weights_file}: no 'k' buffer, and {cfg_file.name} has no 'trainer.k'")
    if not 1 <= k <= n:
        raise UserError(f"{weights_file}: k is {k}, expected 1 <= k <= dict_size ({n})")
    return k
