"""sparsify (EleutherAI) directories (``cfg.json`` + ``sae.safetensors``) as saekit TopK SAEs.

``SparseCoder.save_to_disk`` writes its config (activation, k, num_latents or expansion_factor,
multi_topk, skip_connection, transcode, d_in) and the module's state: ``encoder.weight`` [n, d],
``encoder.bias`` [n], ``W_dec`` [n, d], ``b_dec`` [d] and, with a skip connection, ``W_skip`` [d, d].
A trainer run saves one such directory per hookpoint (``RUN/<hookpoint>/``), with the run's
``config.json`` (model, dataset, ctx_len, ...) beside them.

sparsify computes ``pre = relu((x - b_dec) @ encoder.weight.T + encoder.bias)``, keeps the top k and
decodes ``x_hat = code @ W_dec + b_dec``. saekit's TopK takes the top k of the pre-activations and then
applies ReLU: the same code (where fewer than k are positive, both fill up with zeros). ``multi_topk``
only adds a training loss (its 4k-latent reconstruction is not the model's output) and is ignored.
Refused: the ``groupmax`` activation, transcoders (``transcode``: they predict another module's
output) and a nonzero skip connection (``x_hat += x @ W_skip.T``), which saekit's SAEs do not have.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from saekit.autoencoders import Autoencoder
from saekit.errors import UserError
from saekit.files import read_json
from saekit.interop.common import dtype_name, make_sae, positive_int, read_config, read_tensors, setting, tensor

CONFIG = "cfg.json"
WEIGHTS = "sae.safetensors"
RUN_CONFIG = "config.json"  # the trainer's, one level up


def is_sparsify(directory: Path) -> bool:
    return (directory / CONFIG).is_file() and (directory / WEIGHTS).is_file()


def load(directory: str | Path) -> tuple[Autoencoder, dict[str, Any]]:
    """The sparsify SparseCoder in ``directory`` as a saekit TopK SAE (float32, CPU), and its metadata."""
    directory = Path(directory)
    cfg_file, weights_file = directory / CONFIG, directory / WEIGHTS
    cfg = read_config(cfg_file)
    notes: list[str] = []

    activation = setting(cfg, "activation", str, cfg_file, default="topk")
    if activation != "topk":
        raise UserError(f"{cfg_file}: sparsify activation {activation!r} has no saekit equivalent (supported: topk)")
    if setting(cfg, "transcode", bool, cfg_file, default=False):
        raise UserError(f"{cfg_file}: this is a transcoder (transcode: true), which predicts another module's "
                        "output; saekit loads autoencoders only (supported: topk SparseCoders)")
    d_in = positive_int(cfg, "d_in", cfg_file)
    k = positive_int(cfg, "k", cfg_file)
    num_latents = setting(cfg, "num_latents", int, cfg_file, default=0)
    if num_latents < 0:
        raise UserError(f"{cfg_file}: key 'num_latents' is {num_latents}, expected a positive integer (or 0)")
    if num_latents == 0:
        num_latents = d_in * positive_int(cfg, "expansion_factor", cfg_file, default=32)
    if k > num_latents:
        raise UserError(f"{cfg_file}: k is {k}, more than the {num_latents} latents")
    if setting(cfg, "multi_topk", bool, cfg_file, default=False):
        notes.append("multi_topk only shapes a training loss; ignored")
    skip = setting(cfg, "skip_connection", bool, cfg_file, default=False)

    tensors = read_tensors(weights_file)
    why = f"d_in={d_in}, {num_latents} latents in {CONFIG}"
    if "W_dec" not in tensors and "encoder.weight" in tensors:
        raise UserError(f"{weights_file}: holds no decoder (W_dec); an encoder-only SparseCoder cannot reconstruct")
    W_enc_T = tensor(tensors, "encoder.weight", (num_latents, d_in), weights_file, why)
    b_enc = tensor(tensors, "encoder.bias", (num_latents,), weights_file, why)
    W_dec = tensor(tensors, "W_dec", (num_latents, d_in), weights_file, why)
    b_dec = tensor(tensors, "b_dec", (d_in,), weights_file, why)
    if skip or "W_skip" in tensors:
        W_skip = tensor(tensors, "W_skip", (d_in, d_in), weights_file, why)
        if W_skip.count_nonzero():
            raise UserError(f"{weights_file}: this SparseCoder has a skip connection (W_skip: x_hat += x @ "
                            "W_skip.T), which saekit's SAEs do not have; loading it would change its "
                            "reconstructions (supported: SparseCoders without skip_connection)")
        notes.append("skip connection W_skip is all zeros; dropped")

    model = make_sae("topk", W_enc_T.T, b_enc, W_dec, b_dec, cfg_file, k=k)
    run = _run_config(directory.parent / RUN_CONFIG, notes)
    info = {
        "format": "sparsify", "path": str(directory), "architecture": "topk", "kind": "topk",
        "d_in": d_in, "d_sae": num_latents, "k": k, "dtype": dtype_name(tensors),
        "hookpoint": directory.name, "hook_name": directory.name,
        "model_name": run.get("model"), "dataset_path": run.get("dataset"), "context_size": run.get("ctx_len"),
        "prepend_bos": None, "config": cfg, "run_config": run or None, "notes": notes,
    }
    return model, info


def _run_config(path: Path, notes: list[str]) -> dict[str, Any]:
    """The trainer's config.json beside a run's hookpoint directories, if there is a readable one (it only
    adds metadata, so a damaged one is noted, not fatal)."""
    if not path.is_file():
        return {}
    try:
        run = read_json(path)
    except UserError as err:
        notes.append(f"run config ignored: {err}")
        return {}
    if not isinstance(run, dict) or not isinstance(run.get("sae"), dict):
        return {}  # not a sparsify run's config
    return run
