"""Write tests/fixtures/interop/: small SAEs saved by the real SAELens and sparsify, with their outputs.

    python scripts/make_interop_fixtures.py            # builds /tmp/peers-venv if needed, then runs inside it

SAELens and sparsify pin TransformerLens < 4, so they never go into saekit's own environment: this
script makes a throwaway venv, installs torch 2.13.0 FIRST (the CPU wheel on local disk; a bare torch
requirement would pull a multi-GB CUDA build), then sae-lens and eai-sparsify, and re-runs itself
there with ``--inside``. Inside, it builds SAEs with random, non-trivial weights, saves each with the
library's own save function, runs the library's own encode/decode on a fixed input batch and saves the
input and outputs as ``io.safetensors`` beside it. Nothing is downloaded from any model hub.

Written: SAELens standard / topk / jumprelu SAEs (b_dec subtracted from the input or not, decoder-norm
rescaled TopK, a normalize_activations other than none, JumpReLU thresholds all distinct, one zero and
one negative), three pre-6.0 cfg.json layouts that SAELens 6.x reads back itself, sparsify TopK
SparseCoders (one where a row has fewer than k positive pre-activations, one sized by expansion_factor
with multi_topk, one with a skip connection, which saekit refuses) and a sparsify run with one
directory per hookpoint plus the run's config.json. ``manifest.json`` lists them (format, the saekit
kind expected or "refused", L0 per row); ``versions.json`` the library versions. Output is
deterministic (fixed seeds): rerunning rewrites the same bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

VENV = Path("/tmp/peers-venv")
TORCH = "torch==2.13.0"
SAE_LENS = "sae-lens==6.54.12"
SPARSIFY = "eai-sparsify==1.3.3"
OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "interop"


def venv_python() -> Path:
    return VENV / "bin" / "python"


def setup_venv() -> None:
    py = venv_python()
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet"]
    check = subprocess.run([str(py), "-c", "import torch, sae_lens, sparsify"], capture_output=True)
    if check.returncode == 0:
        return
    subprocess.run(pip + [TORCH], check=True)  # first: the local CPU wheel
    subprocess.run(pip + [TORCH, SAE_LENS, SPARSIFY], check=True)  # torch pinned again: never replaced


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
    write_fixtures(OUT)


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


def write_fixtures(out: Path) -> None:
    from importlib.metadata import version

    import torch

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1234)
    torch.manual_seed(0)
    fixtures = {**saelens_fixtures(out, gen), **sparsify_fixtures(out, gen)}
    versions = {pkg: version(pkg) for pkg in ("sae-lens", "eai-sparsify", "torch", "transformer-lens",
                                              "safetensors")}
    versions["python"] = sys.version.split()[0]
    (out / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    (out / "manifest.json").write_text(json.dumps(fixtures, indent=2, sort_keys=True) + "\n")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {len(fixtures)} fixtures to {out} ({total / 1024:.0f} KiB); versions: {versions}")


if __name__ == "__main__":
    main()
