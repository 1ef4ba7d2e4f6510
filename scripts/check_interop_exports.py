"""Check saekit.interop.export against the real SAELens and sparsify: each export, loaded by the library
itself, must give saekit's codes and reconstructions.

    python scripts/check_interop_exports.py            # needs the peers venv (make_interop_fixtures.py --setup-only)
    python scripts/check_interop_exports.py --out DIR  # keep the exports in DIR (default: a temp dir, removed)

In saekit's environment it builds small SAEs of every exportable family with random, non-trivial weights
(d_in 13, 40 latents, input_scale != 1, nonzero biases, distinct JumpReLU thresholds, a BatchTopK and a
Matryoshka whose threshold was learned by a few training steps, a Gated SAE, TopKs where a row has fewer
than k positive pre-activations), exports each with export_saelens / export_sparsify and saves, beside each export, a
fixed input batch with saekit's own codes and reconstructions (``saekit_io.safetensors``). Then it re-runs
itself inside the peers venv (``--inside``, HF_HUB_OFFLINE=1; SAELens and sparsify never enter saekit's
environment, and saekit is not imported there): ``SAE.load_from_disk`` / ``SparseCoder.load_from_disk``
read each directory, run on the same batch, and the max abs differences are printed, one line per
export, then ``ok N/N`` (exit 0) or the failures (exit 1).
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

VENV_PYTHON = Path(os.environ.get("SAEKIT_PEERS_VENV", "/tmp/peers-venv")) / "bin" / "python"
TOL = 1e-5
D_IN, N_LATENTS, K, ROWS = 13, 40, 5, 64
METADATA = {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre", "context_size": 128,
            "prepend_bos": True, "dataset_path": "monology/pile-uncopyrighted"}
IO_FILE = "saekit_io.safetensors"
MANIFEST = "manifest.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the exports here and keep them")
    parser.add_argument("--inside", type=Path, help="(internal) check the exports in this directory, in the venv")
    args = parser.parse_args()
    if args.inside is not None:
        return check_inside(args.inside)
    if not VENV_PYTHON.exists():
        print(f"{VENV_PYTHON} is missing: build it with python scripts/make_interop_fixtures.py --setup-only")
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="saekit-exports-"))
    try:
        make_exports(out)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.pop("PYTHONPATH", None)  # nothing of saekit's environment inside the venv
        return subprocess.run([str(VENV_PYTHON), __file__, "--inside", str(out)], env=env).returncode
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)


# --------------------------------------------------------------------------- saekit's side
def make_exports(out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch
    from safetensors.torch import save_file

    from saekit.autoencoders import AutoencoderConfig, build
    from saekit.interop.export import export_saelens, export_sparsify

    gen = torch.Generator().manual_seed(2024)

    def sae(kind: str, scale: float, few_positive: bool = False, **fields):
        model = build(AutoencoderConfig.for_kind(kind, n_latents=N_LATENTS, **fields), D_IN)
        W_dec = torch.randn(N_LATENTS, D_IN, generator=gen)
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True) * (0.5 + torch.rand(N_LATENTS, 1, generator=gen))
        b_enc = 0.3 * torch.randn(N_LATENTS, generator=gen)
        if few_positive:  # where x * s = b_dec only latents 4, 11, 30 have a positive pre-activation (< k)
            b_enc = -0.2 - torch.rand(N_LATENTS, generator=gen)
            b_enc[[4, 11, 30]] = torch.tensor([0.4, 0.9, 0.2])
        with torch.no_grad():
            model.W_enc.copy_(torch.randn(D_IN, N_LATENTS, generator=gen) / D_IN ** 0.5)
            model.b_enc.copy_(b_enc)
            model.W_dec.copy_(W_dec)
            model.b_dec.copy_(0.5 * torch.randn(D_IN, generator=gen))
            model.input_scale.fill_(scale)
            if kind == "jumprelu":  # all distinct, spread over the pre-activations' range
                model.log_threshold.copy_((0.05 + 0.8 * torch.rand(N_LATENTS, generator=gen)).log())
            if kind == "gated":  # a magnitude path unlike the gate: each zeroes latents the other keeps
                model.r_mag.copy_(0.5 * torch.randn(N_LATENTS, generator=gen))
                model.b_mag.copy_(0.3 * torch.randn(N_LATENTS, generator=gen))
        return model

    def batch(model):
        """ROWS raw activations, of the size the scale implies (x * s ~ unit entries); row 0 is b_dec / s,
        where the encoder sees only its bias."""
        s = model.input_scale.item()
        x = (torch.randn(ROWS, D_IN, generator=gen) + 0.3) / s
        x[0] = model.b_dec.detach() / s
        return x.float().contiguous()

    models = {
        "saelens_relu": ("saelens", sae("relu", 0.37)),
        "saelens_topk": ("saelens", sae("topk", 0.37, k=K)),
        "saelens_topk_few_positive": ("saelens", sae("topk", 2.5, few_positive=True, k=K)),
        "saelens_jumprelu": ("saelens", sae("jumprelu", 0.37)),
        "saelens_batchtopk": ("saelens", sae("batchtopk", 1.6, k=K)),
        "saelens_matryoshka": ("saelens", sae("matryoshka", 0.8, k=K, group_fractions=[0.25, 0.25, 0.5])),
        "saelens_gated": ("saelens", sae("gated", 0.37)),
        "sparsify_topk": ("sparsify", sae("topk", 0.37, k=K)),
        "sparsify_topk_few_positive": ("sparsify", sae("topk", 2.5, few_positive=True, k=K)),
    }
    for name in ("saelens_batchtopk", "saelens_matryoshka"):
        btk = models[name][1]
        btk.train()
        with torch.no_grad():  # learn the inference threshold as training does: EMA of each batch's smallest kept
            for _ in range(50):
                btk(batch(btk))
        assert btk.threshold.item() > 0, f"the {name} threshold was not learned"

    manifest = {}
    for name, (fmt, model) in models.items():
        model.eval()
        directory = out / name
        density = None
        if fmt == "saelens":
            density = torch.rand(N_LATENTS, generator=gen) * 0.2
            density[:3] = torch.tensor([0.0, 1.0, 1e-6])
            info = export_saelens(model, directory, metadata=METADATA, density=density)
        else:
            info = export_sparsify(model, directory, metadata=METADATA)
        x = batch(model)
        with torch.no_grad():
            codes, x_hat = model.encode(x), model(x).x_hat
        tensors = {"x": x, "codes": codes.float().contiguous(), "x_hat": x_hat.float().contiguous()}
        if density is not None:
            tensors["density"] = density.float()
        save_file(tensors, str(directory / IO_FILE))
        manifest[name] = {"format": fmt, "kind": model.kind, "architecture": info["architecture"],
                          "input_scale": model.input_scale.item(), "metadata": METADATA}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


# --------------------------------------------------------------------------- inside the venv
def check_inside(out: Path) -> int:
    import torch
    from safetensors.torch import load_file

    manifest = json.loads((out / MANIFEST).read_text())
    failures = []
    for name, entry in manifest.items():
        directory = out / name
        ref = load_file(str(directory / IO_FILE))
        x = ref["x"]
        problems = []
        with torch.no_grad():
            if entry["format"] == "saelens":
                from sae_lens import SAE

                lib = SAE.load_from_disk(directory)
                cls = type(lib).__name__
                codes = lib.encode(x)
                x_hat = lib(x)
                if not torch.equal(lib.decode(codes), x_hat):
                    problems.append("decode(encode(x)) != forward(x)")
                if lib.cfg.architecture() != entry["architecture"]:
                    problems.append(f"architecture {lib.cfg.architecture()}")
                meta = lib.cfg.metadata
                for key, val in entry["metadata"].items():
                    if meta.get(key) != val:
                        problems.append(f"metadata {key} = {meta.get(key)!r}")
                sparsity = load_file(str(directory / "sparsity.safetensors"))["sparsity"]
                want = torch.log10(ref["density"].double() + 1e-10).float()
                if not torch.allclose(sparsity, want, atol=1e-6, rtol=0):
                    problems.append("sparsity.safetensors is not log10(density + 1e-10)")
            else:
                from sparsify import SparseCoder

                lib = SparseCoder.load_from_disk(directory)
                cls = type(lib).__name__
                acts, indices, _ = lib.encode(x)
                codes = torch.zeros(x.shape[0], lib.num_latents).scatter_(1, indices, acts)
                x_hat = lib.decode(acts, indices)
                if not torch.allclose(lib(x).sae_out, x_hat, atol=1e-6, rtol=0):
                    problems.append("forward(x).sae_out != decode(encode(x))")
        d_codes = (codes.float() - ref["codes"]).abs().max().item()
        d_xhat = (x_hat.float() - ref["x_hat"]).abs().max().item()
        same_support = torch.equal(codes != 0, ref["codes"] != 0)
        if d_codes > TOL or d_xhat > TOL:
            problems.append(f"max abs diff above {TOL:g}")
        if not same_support:
            problems.append("different latents fire")
        l0 = (ref["codes"] != 0).sum(-1).float()
        status = "ok" if not problems else "FAIL: " + "; ".join(problems)
        print(f"{name:28s} {entry['kind']:10s} -> {cls:12s} codes {d_codes:.2e}  x_hat {d_xhat:.2e}  "
              f"L0 {l0.mean().item():5.2f} (min {int(l0.min())})  s {entry['input_scale']:.4g}  {status}")
        if problems:
            failures.append(name)
    n = len(manifest)
    if failures:
        print(f"FAILED {len(failures)}/{n}: {', '.join(failures)}")
        return 1
    print(f"ok {n}/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
