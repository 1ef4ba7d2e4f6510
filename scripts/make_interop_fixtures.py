"""Write tests/fixtures/interop/: small SAEs saved by the real SAELens, sparsify and dictionary_learning
(and Gemma Scope layouts read by SAELens's own Gemma Scope loaders), with the libraries' outputs.

    python scripts/make_interop_fixtures.py            # builds /tmp/peers-venv if needed, then runs inside it

SAELens and sparsify pin TransformerLens < 4, so they never go into saekit's own environment: this
script makes a throwaway venv, installs torch 2.13.0 FIRST (the CPU wheel on local disk; a bare torch
requirement would pull a multi-GB CUDA build), then sae-lens and eai-sparsify, then dictionary-learning
with ``--no-deps`` (its requirements drag in nnsight, wandb, umap ...; its dictionary and trainer modules
need only torch and einops, and the two modules its package imports at the top, nnsight and wandb, are
given empty stand-ins here: nothing of them is used), and re-runs itself there with ``--inside``.
Inside, it builds SAEs with random, non-trivial weights, saves each with the library's own save function,
runs the library's own encode/decode on a fixed input batch and saves the input and outputs as
``io.safetensors`` beside it. Nothing is downloaded from any model hub.

Written: SAELens standard / topk / jumprelu / gated SAEs (b_dec subtracted from the input or not, decoder-norm
rescaled TopK, a normalize_activations other than none, JumpReLU thresholds all distinct, one zero and
one negative), three pre-6.0 cfg.json layouts that SAELens 6.x reads back itself, sparsify TopK
SparseCoders (one where a row has fewer than k positive pre-activations, one sized by expansion_factor
with multi_topk, one with a skip connection, which saekit refuses) and a sparsify run with one
directory per hookpoint plus the run's config.json.

Gemma Scope: a ``params.npz`` written by ``numpy.savez`` (Gemma Scope's names W_enc, W_dec, b_enc, b_dec,
threshold) and a Gemma Scope 2 folder (``params.safetensors`` with lowercase names + ``config.json``).
Their outputs are SAELens's: each folder is put into a throwaway Hugging Face cache under a Gemma Scope
repo's name (``models--google--gemma-scope-2b-pt-res/snapshots/<commit>/layer_3/...``), and SAELens's
own ``gemma_2`` / ``gemma_3`` loaders read it from there offline (``HF_HUB_OFFLINE=1``), through
``SAE.from_pretrained_with_cfg_and_sparsity``; the ``gemma_2`` loader is told the fixture's small
d_in/d_sae (it takes them from the repo's model otherwise), and the one network call of the ``gemma_3``
loader (``get_safetensors_tensor_shapes``, an HTTP range request for the file header) is replaced by
reading that header from the cached file. A dense float64 reference written here checks SAELens's outputs.

dictionary_learning: one trainer run (``trainSAE`` with seven trainers: StandardTrainer/AutoEncoder,
TopKTrainer/AutoEncoderTopK, BatchTopKTrainer/BatchTopKSAE with a learned and with a never-learned
threshold, JumpReluTrainer/JumpReluAutoEncoder, GatedSAETrainer/GatedAutoEncoder and
MatryoshkaBatchTopKTrainer/MatryoshkaBatchTopKSAE), writing ``trainer_<i>/config.json`` and ``ae.pt``
itself; each dictionary class gets the fixture's weights through a subclass passed as the trainer's
``dict_class`` (same class name and state dict) and ``trainSAE`` runs 0 training steps, so what it saves
are those weights. A second run uses ``normalize_activations``, so trainSAE scales the biases and
threshold by its norm factor before saving. Outputs come from each class's own ``from_pretrained``. The
activation buffer is a stand-in iterable with ActivationBuffer's ``config`` keys (the real one needs
nnsight and a language model).

``manifest.json`` lists them (format, the saekit kind expected or "refused", L0 per row, and what
SAELens's Gemma Scope loaders said of model and hook); ``versions.json`` the library versions. Output is
deterministic (fixed seeds): rerunning rewrites the same bytes (numpy.savez's zip entries carry no
time of writing).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

VENV = Path(os.environ.get("SAEKIT_PEERS_VENV", "/tmp/peers-venv"))  # the throwaway venv
TORCH = "torch==2.13.0"
SAE_LENS = "sae-lens==6.54.12"
SPARSIFY = "eai-sparsify==1.3.3"
DICTIONARY_LEARNING = "dictionary-learning==0.1.0"
OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "interop"


def venv_python() -> Path:
    return VENV / "bin" / "python"


def setup_venv() -> None:
    py = venv_python()
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet"]
    check = subprocess.run([str(py), "-c", "import torch, sae_lens, sparsify"], capture_output=True)
    if check.returncode != 0:
        subprocess.run(pip + [TORCH], check=True)  # first: the local CPU wheel
        subprocess.run(pip + [TORCH, SAE_LENS, SPARSIFY], check=True)  # torch pinned again: never replaced
    check = subprocess.run([str(py), "-c", "import importlib.util as u, sys; "
                            "sys.exit(u.find_spec('dictionary_learning') is None)"], capture_output=True)
    if check.returncode != 0:  # --no-deps: nnsight, wandb, umap... are not needed for its dictionaries
        subprocess.run(pip + ["--no-deps", DICTIONARY_LEARNING], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inside", action="store_true", help="(internal) run inside the peers venv")
    parser.add_argument("--setup-only", action="store_true", help="only build the venv")
    args = parser.parse_args()
    if not args.inside:
        setup_venv()
        if args.setup_only:
            return
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        subprocess.run([str(venv_python()), __file__, "--inside"], check=True, env=env)
        return
    # A throwaway Hugging Face cache for the Gemma Scope loaders, set before huggingface_hub is imported
    # (it reads HF_HUB_CACHE and HF_HUB_OFFLINE once, at import).
    cache = Path(tempfile.mkdtemp(prefix="interop-hf-cache-"))
    os.environ.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    try:
        write_fixtures(OUT)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# --------------------------------------------------------------------------- inside the venv
D_IN, D_SAE, K, ROWS = 13, 40, 5, 7
METADATA = {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre", "context_size": 128,
            "prepend_bos": True, "dataset_path": "monology/pile-uncopyrighted"}


def random_weights(gen, d_in: int = D_IN, d_sae: int = D_SAE) -> dict:
    """Untied encoder/decoder, decoder rows of uneven norm, nonzero biases (float32)."""
    import torch

    W_dec = torch.randn(d_sae, d_in, generator=gen) * (0.5 + torch.rand(d_sae, 1, generator=gen))
    return {"W_enc": torch.randn(d_in, d_sae, generator=gen) / d_in ** 0.5,
            "b_enc": 0.3 * torch.randn(d_sae, generator=gen),
            "W_dec": W_dec,
            "b_dec": 0.5 * torch.randn(d_in, generator=gen)}


def input_batch(gen, b_dec, d_in: int = D_IN):
    """ROWS raw activations (float32); row 0 is b_dec itself, so the encoder sees only its bias there."""
    import torch

    x = 2.0 * torch.randn(ROWS, d_in, generator=gen) + 0.7
    x[0] = b_dec
    return x.float().contiguous()


def save_io(directory: Path, x, codes, x_hat) -> dict:
    from safetensors.torch import save_file

    save_file({"x": x.contiguous(), "codes": codes.detach().float().contiguous(),
               "x_hat": x_hat.detach().float().contiguous()}, str(directory / "io.safetensors"))
    return {"l0": [int(n) for n in (codes != 0).sum(-1)]}


def saelens_fixtures(out: Path, gen) -> dict:
    """SAELens 6.x SAEs saved with ``save_model``; two pre-6.0 cfg.json layouts read back by SAELens
    6.x's own loader (``SAE.load_from_disk``), whose outputs are the reference."""
    import torch
    from sae_lens import (SAE, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE,
                          TopKSAEConfig)
    from sae_lens.saes.sae import SAEMetadata

    made = {}

    def build(name, sae_cls, cfg, expect, extra=None):
        sae = sae_cls(cfg)
        w = random_weights(gen)
        with torch.no_grad():
            for key, val in w.items():
                getattr(sae, key).copy_(val)
            for key, val in (extra or {}).items():
                getattr(sae, key).copy_(val)
        directory = out / name
        shutil.rmtree(directory, ignore_errors=True)
        sae.save_model(directory)
        loaded = SAE.load_from_disk(directory)  # the library's own reading of its own files
        x = input_batch(gen, w["b_dec"])
        with torch.no_grad():
            codes = loaded.encode(x)
            x_hat = loaded(x)
            assert torch.equal(x_hat, loaded.decode(codes))
        made[name] = {"format": "saelens", "kind": expect, "architecture": cfg.architecture(),
                      **save_io(directory, x, codes, x_hat)}

    def meta(**kw):
        return SAEMetadata(**{**METADATA, **kw})

    build("saelens_standard", StandardSAE,
          StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=True, metadata=meta()), "relu")
    build("saelens_standard_nobdec_norm", StandardSAE,
          StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False,
                            normalize_activations="expected_average_only_in",
                            metadata=meta(hook_name="blocks.5.hook_mlp_out")), "relu")
    build("saelens_topk", TopKSAE,
          TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, apply_b_dec_to_input=True, metadata=meta()), "topk")
    build("saelens_topk_rescale_nobdec", TopKSAE,
          TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, apply_b_dec_to_input=False, rescale_acts_by_decoder_norm=True,
                        metadata=meta()), "topk")
    threshold = 0.05 + 0.6 * torch.rand(D_SAE, generator=gen)
    threshold[3], threshold[7] = 0.0, -0.1  # a zero and a negative threshold: plain ReLU there
    build("saelens_jumprelu", JumpReLUSAE,
          JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=True, metadata=meta()), "jumprelu",
          {"threshold": threshold})
    build("saelens_jumprelu_nobdec", JumpReLUSAE,
          JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False, metadata=meta()), "jumprelu",
          {"threshold": 0.1 + 0.5 * torch.rand(D_SAE, generator=gen)})

    # Pre-6.0 layouts (flat cfg.json, no metadata block, no version, hook_point naming). SAELens 6.x
    # still reads them (handle_pre_6_0_config); the weights file is the one save_model wrote.
    legacy = {
        "saelens_legacy_topk": ("saelens_topk", "topk", {
            "architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
            "apply_b_dec_to_input": True}),
        "saelens_legacy_jumprelu": ("saelens_jumprelu_nobdec", "jumprelu", {
            "architecture": "jumprelu", "activation_fn_str": "relu", "apply_b_dec_to_input": False}),
        "saelens_legacy_standard": ("saelens_standard", "relu", {
            "architecture": "standard", "activation_fn_str": "relu", "apply_b_dec_to_input": True,
            "normalize_activations": False}),
    }
    for name, (source, expect, arch) in legacy.items():
        directory = out / name
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
        shutil.copy(out / source / "sae_weights.safetensors", directory / "sae_weights.safetensors")
        cfg = {**arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
               "model_name": "gelu-2l", "hook_point": "blocks.1.hook_resid_post", "hook_point_layer": 1,
               "hook_point_head_index": None, "context_size": 256, "prepend_bos": False,
               "dataset_path": "NeelNanda/c4-tokenized-2b", "finetuning_scaling_factor": False,
               "normalize_activations": arch.get("normalize_activations", "none")}
        (directory / "cfg.json").write_text(json.dumps(cfg))
        loaded = SAE.load_from_disk(directory)
        x = input_batch(gen, loaded.b_dec.detach())
        with torch.no_grad():
            codes = loaded.encode(x)
            x_hat = loaded(x)
        made[name] = {"format": "saelens", "kind": expect, "architecture": arch["architecture"], "layout": "pre-6.0",
                      **save_io(directory, x, codes, x_hat)}
    return made


def saelens_gated_fixtures(out: Path) -> dict:
    """SAELens 6.x Gated SAEs (b_dec subtracted from the input or not), saved with ``save_model``; their own
    generator, so adding them left every earlier fixture's bytes as they were."""
    import torch
    from sae_lens import SAE
    from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    gen = torch.Generator().manual_seed(4321)
    made = {}
    for name, apply_b_dec in (("saelens_gated", True), ("saelens_gated_nobdec", False)):
        cfg = GatedSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=apply_b_dec,
                             metadata=SAEMetadata(**METADATA))
        sae = GatedSAE(cfg)
        w = random_weights(gen)
        w["b_gate"] = w.pop("b_enc")
        w["b_mag"] = 0.3 * torch.randn(D_SAE, generator=gen)
        w["r_mag"] = 0.5 * torch.randn(D_SAE, generator=gen)
        with torch.no_grad():
            for key, val in w.items():
                getattr(sae, key).copy_(val)
        directory = out / name
        shutil.rmtree(directory, ignore_errors=True)
        sae.save_model(directory)
        loaded = SAE.load_from_disk(directory)
        assert type(loaded).__name__ == "GatedSAE"
        x = input_batch(gen, w["b_dec"])
        with torch.no_grad():
            codes, x_hat = loaded.encode(x), loaded(x)
            assert torch.equal(x_hat, loaded.decode(codes))
        made[name] = {"format": "saelens", "kind": "gated", "architecture": "gated", **save_io(directory, x, codes, x_hat)}
    return made


def sparsify_fixtures(out: Path, gen) -> dict:
    """sparsify SparseCoders saved with ``save_to_disk``, outputs from the library's own forward."""
    import torch
    from sparsify import SparseCoder, SparseCoderConfig

    made = {}

    def build(directory: Path, cfg, expect: str, few_positive: bool = False):
        sae = SparseCoder(D_IN, cfg)
        n = sae.num_latents
        w = random_weights(gen, d_sae=n)
        if few_positive:  # on row 0 (x = b_dec) only 3 pre-activations are positive: fewer than k
            w["b_enc"] = -0.2 - torch.rand(n, generator=gen)
            w["b_enc"][[4, 11, 30]] = torch.tensor([0.4, 0.9, 0.2])
        with torch.no_grad():
            sae.encoder.weight.copy_(w["W_enc"].T)
            sae.encoder.bias.copy_(w["b_enc"])
            sae.W_dec.copy_(w["W_dec"])
            sae.b_dec.copy_(w["b_dec"])
            if sae.W_skip is not None:
                sae.W_skip.copy_(0.1 * torch.randn(D_IN, D_IN, generator=gen))
        shutil.rmtree(directory, ignore_errors=True)
        sae.save_to_disk(directory)
        loaded = SparseCoder.load_from_disk(directory)
        x = input_batch(gen, w["b_dec"])
        with torch.no_grad():
            # encode/decode, not forward: with multi_topk, forward returns the 4k-latent reconstruction
            # of that training loss instead of the k-latent one
            acts, indices, _ = loaded.encode(x)
            codes = torch.zeros(ROWS, n).scatter_(1, indices, acts)
            x_hat = loaded.decode(acts, indices)
            if loaded.W_skip is not None:
                x_hat = x_hat + x @ loaded.W_skip.mT
            if not cfg.multi_topk:
                assert torch.allclose(loaded(x).sae_out, x_hat, atol=1e-6, rtol=0)
        return {"format": "sparsify", "kind": expect, **save_io(directory, x, codes, x_hat)}

    made["sparsify_topk"] = build(out / "sparsify_topk", SparseCoderConfig(num_latents=D_SAE, k=K), "topk",
                                  few_positive=True)
    made["sparsify_expansion"] = build(out / "sparsify_expansion",
                                       SparseCoderConfig(expansion_factor=3, k=K, multi_topk=True), "topk")
    made["sparsify_skip"] = build(out / "sparsify_skip",
                                  SparseCoderConfig(num_latents=D_SAE, k=K, skip_connection=True), "refused")
    multi = out / "sparsify_multi"
    shutil.rmtree(multi, ignore_errors=True)
    hooks = ["layers.0", "layers.1.mlp"]
    for hook in hooks:
        made[f"sparsify_multi/{hook}"] = build(multi / hook, SparseCoderConfig(num_latents=D_SAE, k=K), "topk")
    # The run's config.json, as the trainer writes it beside the hookpoint directories (its other files,
    # optimizer and scheduler state, are torch pickles and have no place here).
    from sparsify.__main__ import RunConfig

    RunConfig(sae=SparseCoderConfig(num_latents=D_SAE, k=K), model="EleutherAI/pythia-70m",
              dataset="NeelNanda/pile-10k", ctx_len=64, hookpoints=hooks,
              run_name="sparsify_multi").save_json(str(multi / "config.json"))
    return made


# --------------------------------------------------------------------------- Gemma Scope
GEMMA_COMMIT = "5a3c0f7e9d1b2c4a6e8f0a1b3c5d7e9f1a2b4c6d"  # any 40-hex name: the throwaway cache's snapshot
GEMMA_SCOPE = {  # fixture -> (repo, folder in the repo), names SAELens's loaders read meaning from
    "gemmascope_npz": ("google/gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_50"),
    "gemmascope2_resid_post": ("google/gemma-scope-2-1b-pt", "resid_post/layer_7_width_16k_l0_small"),
}


def put_in_hf_cache(repo_id: str, folder: str, files: dict) -> Path:
    """Lay ``files`` ({name: path}) out as huggingface_hub's cache does: blobs named by their sha256,
    ``snapshots/<commit>/<folder>/<name>`` links to them, ``refs/main`` holding the commit."""
    import hashlib

    root = Path(os.environ["HF_HUB_CACHE"]) / ("models--" + repo_id.replace("/", "--"))
    snapshot = root / "snapshots" / GEMMA_COMMIT / folder
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "blobs").mkdir(exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(GEMMA_COMMIT)
    for name, source in files.items():
        data = Path(source).read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def gemma_reference(w: dict, x):
    """Gemma Scope's JumpReLU, dense in float64: pre = x @ W_enc + b_enc (b_dec not subtracted),
    code = pre * (pre > threshold), x_hat = code @ W_dec + b_dec."""
    d = {k: v.double() for k, v in w.items()}
    pre = x.double() @ d["W_enc"] + d["b_enc"]
    code = pre * (pre > d["threshold"])
    return code, code @ d["W_dec"] + d["b_dec"]


def gemmascope_fixtures(out: Path, gen) -> dict:
    import warnings

    import numpy as np
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from sae_lens import SAE
    from sae_lens.loading import pretrained_sae_loaders as loaders

    made = {}

    def weights():
        w = random_weights(gen)
        w["threshold"] = 0.05 + 0.6 * torch.rand(D_SAE, generator=gen)  # Gemma Scope's are all positive
        return w

    def with_saelens(name, converter, w):
        repo_id, folder = GEMMA_SCOPE[name]
        x = input_batch(gen, w["b_dec"])
        with warnings.catch_warnings():  # "this repo is registered under a release name": it is, on purpose
            warnings.simplefilter("ignore")
            sae, cfg, _ = SAE.from_pretrained_with_cfg_and_sparsity(repo_id, folder, converter=converter)
        with torch.no_grad():
            codes, x_hat = sae.encode(x), sae(x)
            assert torch.equal(x_hat, sae.decode(codes))
        ref_codes, ref_x_hat = gemma_reference(w, x)
        assert (codes.double() - ref_codes).abs().max() < 1e-5 and (x_hat.double() - ref_x_hat).abs().max() < 1e-5
        meta = cfg.get("metadata") or cfg
        return {"format": "gemmascope", "kind": "jumprelu", "architecture": "jumprelu", "repo_id": repo_id,
                "path_in_repo": folder, "saelens_model_name": meta.get("model_name"),
                "saelens_hook_name": meta.get("hook_name"), **save_io(out / name, x, codes, x_hat)}

    # Gemma Scope (Gemma 2): params.npz alone, written by numpy itself.
    name = "gemmascope_npz"
    directory = out / name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    w = weights()
    np.savez(directory / "params.npz", **{k: v.numpy() for k, v in w.items()})
    put_in_hf_cache(*GEMMA_SCOPE[name], {"params.npz": directory / "params.npz"})

    def gemma_2(**kw):  # SAELens's loader takes d_in/d_sae from the repo's model; this SAE is small
        kw["cfg_overrides"] = {**(kw.get("cfg_overrides") or {}), "d_in": D_IN, "d_sae": D_SAE}
        return loaders.gemma_2_sae_huggingface_loader(**kw)

    made[name] = with_saelens(name, gemma_2, w)

    # Gemma Scope 2 (Gemma 3): params.safetensors with lowercase names, and config.json.
    name = "gemmascope2_resid_post"
    directory = out / name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    w = weights()
    save_file({"w_enc": w["W_enc"], "w_dec": w["W_dec"], "b_enc": w["b_enc"], "b_dec": w["b_dec"],
               "threshold": w["threshold"]}, str(directory / "params.safetensors"))
    (directory / "config.json").write_text(json.dumps(
        {"architecture": "jump_relu", "hf_hook_point_in": "model.layers.7.output", "l0": 20,
         "model_name": "google/gemma-3-1b-pt", "width": D_SAE}, indent=2) + "\n")
    snapshot = put_in_hf_cache(*GEMMA_SCOPE[name], {n: directory / n for n in ("params.safetensors", "config.json")})

    def local_shapes(repo_id, filename):  # the loader's HTTP range request for the header, read locally
        root = snapshot.parents[len(Path(GEMMA_SCOPE[name][1]).parts) - 1]
        with safe_open(str(root / filename), framework="pt") as f:
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}

    original = loaders.get_safetensors_tensor_shapes
    loaders.get_safetensors_tensor_shapes = local_shapes
    try:
        made[name] = with_saelens(name, loaders.gemma_3_sae_huggingface_loader, w)
    finally:
        loaders.get_safetensors_tensor_shapes = original
    return made


# --------------------------------------------------------------------------- dictionary_learning
class StandInBuffer:
    """What trainSAE reads of an ActivationBuffer: batches of activations, and ``config``."""

    def __init__(self, batches, ctx_len: int = 128):
        self.batches, self.ctx_len = batches, ctx_len

    def __iter__(self):
        return iter(self.batches)

    @property
    def config(self):
        return {"d_submodule": D_IN, "io": "out", "n_ctxs": 3000, "ctx_len": self.ctx_len, "refresh_batch_size": 512,
                "out_batch_size": 8192, "device": "cpu"}


def import_dictionary_learning():
    """dictionary_learning's package imports nnsight (buffer.py) and its training module wandb; neither is
    used here (the buffer is a stand-in, use_wandb is off), so empty stand-ins take their places."""
    import types

    for missing, attrs in (("nnsight", {"LanguageModel": object}), ("wandb", {})):
        try:
            __import__(missing)
        except ImportError:
            module = types.ModuleType(missing)
            module.__dict__.update(attrs)
            sys.modules[missing] = module
    import dictionary_learning

    return dictionary_learning


def with_weights(cls, weights: dict):
    """``cls`` whose instances start from ``weights`` (parameter and buffer names of its state dict):
    same class name, same state dict, so the trainer and trainSAE treat it as ``cls`` itself."""
    import torch

    class Seeded(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            state = dict(self.named_parameters()) | dict(self.named_buffers())
            with torch.no_grad():
                for key, val in weights.items():
                    state[key].copy_(val)

    Seeded.__name__ = Seeded.__qualname__ = cls.__name__
    return Seeded


def dictionary_learning_fixtures(out: Path, gen) -> dict:
    import torch

    import_dictionary_learning()
    from dictionary_learning.dictionary import AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE, BatchTopKTrainer
    from dictionary_learning.trainers.gdm import GatedSAETrainer
    from dictionary_learning.trainers.jumprelu import JumpReluTrainer
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE, MatryoshkaBatchTopKTrainer
    from dictionary_learning.trainers.standard import StandardTrainer
    from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer
    from dictionary_learning.training import trainSAE

    common = {"activation_dim": D_IN, "dict_size": D_SAE, "layer": 3, "lm_name": "EleutherAI/pythia-70m-deduped",
              "submodule_name": "resid_post_layer_3", "steps": 10_000, "device": "cpu", "seed": 0}

    def linear(w):  # nn.Linear layout: encoder.weight [n, d], decoder.weight [d, n]
        return {"encoder.weight": w["W_enc"].T, "encoder.bias": w["b_enc"], "decoder.weight": w["W_dec"].T}

    def topk_like(threshold):
        w = random_weights(gen)
        return {**linear(w), "b_dec": w["b_dec"], "threshold": torch.tensor(threshold)}

    def jumprelu():
        w = random_weights(gen)
        threshold = 0.05 + 0.6 * torch.rand(D_SAE, generator=gen)
        threshold[5], threshold[9] = 0.0, -0.2  # plain ReLU there
        return {**w, "threshold": threshold}

    def gated():
        w = random_weights(gen)
        return {"encoder.weight": w["W_enc"].T, "decoder.weight": w["W_dec"].T, "decoder_bias": w["b_dec"],
                "r_mag": 0.5 * torch.randn(D_SAE, generator=gen), "gate_bias": 0.3 * torch.randn(D_SAE, generator=gen),
                "mag_bias": 0.3 * torch.randn(D_SAE, generator=gen)}

    def standard():
        w = random_weights(gen)
        return {**linear(w), "bias": w["b_dec"]}

    def matryoshka():
        w = random_weights(gen)
        return {**w, "threshold": torch.tensor(0.3)}

    # (dictionary class, its trainer, weights, trainer kwargs, saekit kind expected, library loader)
    run = [
        (AutoEncoder, StandardTrainer, standard(), {}, "relu",
         lambda p: AutoEncoder.from_pretrained(p, normalize_decoder=False)),
        (AutoEncoderTopK, TopKTrainer, topk_like(0.4), {"k": K}, "topk", AutoEncoderTopK.from_pretrained),
        (BatchTopKSAE, BatchTopKTrainer, topk_like(0.35), {"k": K}, "batchtopk", BatchTopKSAE.from_pretrained),
        (BatchTopKSAE, BatchTopKTrainer, topk_like(-1.0), {"k": K}, "relu", BatchTopKSAE.from_pretrained),
        (JumpReluAutoEncoder, JumpReluTrainer, jumprelu(), {}, "jumprelu", JumpReluAutoEncoder.from_pretrained),
        (GatedAutoEncoder, GatedSAETrainer, gated(), {}, "gated", GatedAutoEncoder.from_pretrained),
        (MatryoshkaBatchTopKSAE, MatryoshkaBatchTopKTrainer, matryoshka(),
         {"k": K, "group_fractions": [0.25, 0.25, 0.5]}, "batchtopk", MatryoshkaBatchTopKSAE.from_pretrained),
    ]
    normalized = [
        (BatchTopKSAE, BatchTopKTrainer, topk_like(0.3), {"k": K}, "batchtopk", BatchTopKSAE.from_pretrained),
        (AutoEncoderTopK, TopKTrainer, topk_like(0.2), {"k": K}, "topk", AutoEncoderTopK.from_pretrained),
    ]
    made = {}
    for run_name, trainers, normalize in (("dictionary_learning_run", run, False),
                                          ("dictionary_learning_normalized", normalized, True)):
        save_dir = out / run_name
        shutil.rmtree(save_dir, ignore_errors=True)
        configs = [{"trainer": trainer, "dict_class": with_weights(cls, w), **common, **kwargs}
                   for cls, trainer, w, kwargs, _, _ in trainers]
        # activations of mean squared norm ~4: a norm factor of ~2, raw-scale biases of a usual size
        acts = [0.5 * torch.randn(64, D_IN, generator=gen) + 0.2 for _ in range(4)]
        trainSAE(StandInBuffer(acts), configs, steps=0, save_dir=str(save_dir), normalize_activations=normalize,
                 device="cpu")
        for i, (cls, _, w, _, expect, load) in enumerate(trainers):
            directory = save_dir / f"trainer_{i}"
            saved = torch.load(directory / "ae.pt", weights_only=True)
            if not normalize:  # what trainSAE saved is the fixture's weights, bit for bit
                assert all(torch.equal(saved[key], val.to(saved[key].dtype)) for key, val in w.items()), cls
            ae = load(str(directory / "ae.pt"))
            assert type(ae).__name__ == cls.__name__
            x = input_batch(gen, saved.get("b_dec", saved.get("bias", saved.get("decoder_bias"))))
            with torch.no_grad():
                codes, x_hat = ae.encode(x), ae(x)
            made[f"{run_name}/trainer_{i}"] = {"format": "dictionary_learning", "kind": expect,
                                               "architecture": cls.__name__, **save_io(directory, x, codes, x_hat)}
    return made


def write_fixtures(out: Path) -> None:
    from importlib.metadata import version

    import torch

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1234)
    torch.manual_seed(0)
    fixtures = {**saelens_fixtures(out, gen), **sparsify_fixtures(out, gen)}
    fixtures.update(gemmascope_fixtures(out, gen))
    fixtures.update(dictionary_learning_fixtures(out, gen))
    fixtures.update(saelens_gated_fixtures(out))
    versions = {pkg: version(pkg) for pkg in ("sae-lens", "eai-sparsify", "dictionary-learning", "torch",
                                              "transformer-lens", "safetensors", "numpy", "huggingface-hub")}
    versions["python"] = sys.version.split()[0]
    (out / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    (out / "manifest.json").write_text(json.dumps(fixtures, indent=2, sort_keys=True) + "\n")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {len(fixtures)} fixtures to {out} ({total / 1024:.0f} KiB); versions: {versions}")


if __name__ == "__main__":
    main()
