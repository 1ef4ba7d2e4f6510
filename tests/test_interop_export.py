"""saekit.interop.export: every exportable family, written as SAELens or sparsify, read back by saekit's
own importer (load_foreign, itself checked against the real libraries' outputs in test_interop.py), must
give the original model's codes and reconstructions. scripts/check_interop_exports.py runs the same
exports through the real SAELens and sparsify in their venv; this file needs neither."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saekit.autoencoders import AutoencoderConfig, build
from saekit.errors import UserError
from saekit.interop import detect_format, load_foreign
from saekit.interop.export import export_saelens, export_sparsify

D_IN, N, K, ROWS = 13, 40, 5, 64
TOL = 1e-5
META = {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre", "context_size": 128, "prepend_bos": False}
SAELENS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
           "matryoshka": "jumprelu", "gated": "gated"}
REIMPORTED_KIND = {"relu": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
                   "matryoshka": "jumprelu", "gated": "gated"}
FAMILIES = "relu, topk, jumprelu, batchtopk, matryoshka, gated"


def make(kind: str, scale: float = 0.37, seed: int = 0, **fields):
    """A saekit SAE with random, non-trivial weights: uneven decoder norms, nonzero biases, input scale
    ``scale``, distinct JumpReLU thresholds, a learned (positive) BatchTopK threshold, Gated magnitude
    parameters unlike the gate's."""
    gen = torch.Generator().manual_seed(seed)
    if kind in ("topk", "batchtopk", "matryoshka"):
        fields.setdefault("k", K)
    model = build(AutoencoderConfig.for_kind(kind, n_latents=N, **fields), D_IN)
    W_dec = torch.randn(N, D_IN, generator=gen)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True) * (0.5 + torch.rand(N, 1, generator=gen))
    with torch.no_grad():
        model.W_enc.copy_(torch.randn(D_IN, N, generator=gen) / D_IN ** 0.5)
        model.b_enc.copy_(0.3 * torch.randn(N, generator=gen))
        model.W_dec.copy_(W_dec)
        model.b_dec.copy_(0.5 * torch.randn(D_IN, generator=gen))
        model.input_scale.fill_(scale)
        if kind == "jumprelu":
            model.log_threshold.copy_((0.05 + 0.8 * torch.rand(N, generator=gen)).log())
        if kind in ("batchtopk", "matryoshka"):
            model.threshold.fill_(0.35)
        if kind == "gated":
            model.r_mag.copy_(0.5 * torch.randn(N, generator=gen))
            model.b_mag.copy_(0.3 * torch.randn(N, generator=gen))
    return model.eval()


def batch(model, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    s = model.input_scale.item()
    x = (torch.randn(ROWS, D_IN, generator=gen) + 0.3) / s
    x[0] = model.b_dec.detach() / s  # the encoder sees only its bias
    return x


def outputs(model, x):
    with torch.no_grad():
        return model.encode(x), model(x).x_hat


def assert_same(model, other, x):
    codes, x_hat = outputs(model, x)
    codes2, x_hat2 = outputs(other, x)
    assert (codes - codes2).abs().max().item() <= TOL
    assert (x_hat - x_hat2).abs().max().item() <= TOL
    assert torch.equal(codes != 0, codes2 != 0)  # the same latents fire


def refused(call, *words) -> str:
    with pytest.raises(UserError) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for word in words:
        assert word in msg, msg
    return msg


def no_temp_files(directory: Path) -> bool:
    return not [p for p in Path(directory).rglob("*") if ".tmp" in p.name]


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("kind", sorted(SAELENS))
@pytest.mark.parametrize("scale", [0.37, 1.0, 2.5])
def test_saelens_round_trip(kind, scale, tmp_path):
    model = make(kind, scale)
    info = export_saelens(model, tmp_path / "sae", metadata=META)
    assert info["format"] == "saelens" and info["architecture"] == SAELENS[kind]
    assert detect_format(tmp_path / "sae") == "saelens"
    back, binfo = load_foreign(tmp_path / "sae")
    assert back.kind == REIMPORTED_KIND[kind] and binfo["architecture"] == SAELENS[kind]
    assert binfo["apply_b_dec_to_input"] is True and binfo["layout"] == "6.x"
    assert back.input_scale.item() == 1.0  # the scale lives in the weights now
    x = batch(model)
    assert_same(model, back, x)
    assert 0 < (outputs(model, x)[0] != 0).sum(-1).float().mean() < N  # the sparsity rule actually acts
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize("scale", [0.37, 1.0, 2.5])
def test_sparsify_round_trip(scale, tmp_path):
    model = make("topk", scale)
    info = export_sparsify(model, tmp_path / "layers.3")
    assert info["format"] == "sparsify" and info["architecture"] == "topk" and info["k"] == K
    assert detect_format(tmp_path / "layers.3") == "sparsify"
    back, binfo = load_foreign(tmp_path / "layers.3")
    assert back.kind == "topk" and back.cfg.k == K and binfo["hook_name"] == "layers.3"
    assert_same(model, back, batch(model))
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_topk_with_fewer_than_k_positive(fmt, tmp_path):
    """Row 0 (x * s = b_dec) has 3 positive pre-activations, k = 5: both must keep the same 3."""
    model = make("topk", 2.5)
    with torch.no_grad():
        model.b_enc.copy_(-0.2 - torch.rand(N, generator=torch.Generator().manual_seed(3)))
        model.b_enc[[4, 11, 30]] = torch.tensor([0.4, 0.9, 0.2])
    (export_saelens if fmt == "saelens" else export_sparsify)(model, tmp_path / "sae")
    back, _ = load_foreign(tmp_path / "sae")
    x = batch(model)
    assert_same(model, back, x)
    assert (outputs(back, x)[0][0] != 0).nonzero().flatten().tolist() == [4, 11, 30]


def test_exports_a_saved_model_directory(tmp_path):
    model = make("jumprelu")
    model.save(tmp_path / "model")
    export_saelens(tmp_path / "model", tmp_path / "sae")
    back, _ = load_foreign(tmp_path / "sae")
    assert_same(model, back, batch(model))


def test_jumprelu_thresholds_are_exactly_saekits(tmp_path):
    model = make("jumprelu", 0.37)
    export_saelens(model, tmp_path / "sae")
    weights = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert torch.equal(weights["threshold"], model.threshold.detach())
    assert weights["threshold"].unique().numel() == N  # distinct


def test_batchtopk_becomes_one_threshold_for_every_latent(tmp_path):
    model = make("batchtopk")
    info = export_saelens(model, tmp_path / "sae")
    weights = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert torch.equal(weights["threshold"], torch.full((N,), model.threshold.item()))
    assert any("BatchTopK" in note for note in info["notes"])


def test_batchtopk_learned_by_training_steps(tmp_path):
    model = make("batchtopk")
    with torch.no_grad():
        model.threshold.fill_(-1.0)
        model.train()
        for seed in range(20):
            model(batch(model, seed))
    model.eval()
    assert model.threshold.item() > 0
    export_saelens(model, tmp_path / "sae")
    back, _ = load_foreign(tmp_path / "sae")
    assert_same(model, back, batch(model, 99))


# ------------------------------------------------------------------ what the files say
def test_saelens_cfg_json(tmp_path):
    meta = {**META, "dataset_path": "monology/pile-uncopyrighted", "hook_head_index": None}
    export_saelens(make("topk"), tmp_path / "sae", metadata=meta)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    block = cfg.pop("metadata")
    assert cfg == {"d_in": D_IN, "d_sae": N, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
                   "normalize_activations": "none", "reshape_activations": "none", "k": K,
                   "rescale_acts_by_decoder_norm": False, "architecture": "topk"}
    assert block["sae_lens_version"].startswith("6.")  # the 6.x layout marker SAELens reads
    assert {k: block[k] for k in meta} == meta
    assert block["saekit_kind"] == "topk"
    weights = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "W_enc": (D_IN, N), "b_enc": (N,), "W_dec": (N, D_IN), "b_dec": (D_IN,)}
    assert all(v.dtype == torch.float32 for v in weights.values())

    for kind in ("relu", "jumprelu", "batchtopk"):
        export_saelens(make(kind), tmp_path / kind)
        cfg = json.loads((tmp_path / kind / "cfg.json").read_text())
        assert cfg["architecture"] == SAELENS[kind] and "k" not in cfg
        assert {k: cfg["metadata"][k] for k in META} == dict.fromkeys(META)  # always written, null = unknown
        assert ("threshold" in load_file(str(tmp_path / kind / "sae_weights.safetensors"))) == (kind != "relu")


def test_metadata_reaches_the_importer(tmp_path):
    export_saelens(make("relu"), tmp_path / "sae", metadata=META)
    _, info = load_foreign(tmp_path / "sae")
    assert {k: info[k] for k in META} == META


def test_hook_z_sets_reshape_activations(tmp_path):
    export_saelens(make("topk"), tmp_path / "sae", metadata={"hook_name": "blocks.0.attn.hook_z"})
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["reshape_activations"] == "hook_z"


def test_sparsify_cfg_json(tmp_path):
    export_sparsify(make("topk"), tmp_path / "a", metadata=META)
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    assert cfg == {"activation": "topk", "expansion_factor": N // D_IN, "normalize_decoder": False,
                   "num_latents": N, "k": K, "multi_topk": False, "skip_connection": False, "transcode": False,
                   "d_in": D_IN}
    weights = load_file(str(tmp_path / "a" / "sae.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "encoder.weight": (N, D_IN), "encoder.bias": (N,), "W_dec": (N, D_IN), "b_dec": (D_IN,)}
    side = json.loads((tmp_path / "a" / "saekit_metadata.json").read_text())
    assert {k: side[k] for k in META} == META
    # unit-norm decoder rows and no input scale: sparsify may keep renormalizing them
    unit = make("topk", 1.0)
    with torch.no_grad():
        unit.W_dec /= unit.W_dec.norm(dim=-1, keepdim=True)
    export_sparsify(unit, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "cfg.json").read_text())["normalize_decoder"] is True
    assert not (tmp_path / "b" / "saekit_metadata.json").exists()


def test_density_file(tmp_path):
    density = torch.rand(N, generator=torch.Generator().manual_seed(5)) * 0.1
    density[0] = 0.0
    info = export_saelens(make("topk"), tmp_path / "sae", density=density)
    assert "sparsity.safetensors" in info["files"]
    sparsity = load_file(str(tmp_path / "sae" / "sparsity.safetensors"))
    assert set(sparsity) == {"sparsity"}
    assert torch.allclose(sparsity["sparsity"], torch.log10(density.double() + 1e-10).float(), atol=1e-6, rtol=0)
    assert sparsity["sparsity"][0].item() == pytest.approx(-10.0)
    # a later export of another model without a density leaves no stale file behind
    info = export_saelens(make("relu"), tmp_path / "sae")
    assert not (tmp_path / "sae" / "sparsity.safetensors").exists()
    assert "sparsity.safetensors" not in info["files"]
    refused(lambda: export_saelens(make("topk"), tmp_path / "x", density=torch.ones(N + 1)), "density", str(N))
    refused(lambda: export_saelens(make("topk"), tmp_path / "x", density=torch.full((N,), 2.0)), "[0, 1]")


# ------------------------------------------------------------------ refusals
def test_refuses_what_saelens_has_no_family_for(tmp_path):
    for kind in ("pca", "rbm", "linear"):
        model = build(AutoencoderConfig.for_kind(kind, n_latents=4), D_IN)
        refused(lambda: export_saelens(model, tmp_path / kind), "SAELens", FAMILIES)
        refused(lambda: export_sparsify(model, tmp_path / kind), "sparsify", "families that export to sparsify: topk")
        assert not (tmp_path / kind).exists()  # nothing written


@pytest.mark.parametrize("kind", ["relu", "jumprelu", "batchtopk", "gated"])
def test_sparsify_exports_topk_only(kind, tmp_path):
    refused(lambda: export_sparsify(make(kind), tmp_path / "sae"), kind, "families that export to sparsify: topk")
    assert not (tmp_path / "sae").exists()


def test_refuses_an_unlearned_batchtopk_threshold(tmp_path):
    model = make("batchtopk")
    with torch.no_grad():
        model.threshold.fill_(-1.0)
    refused(lambda: export_saelens(model, tmp_path / "sae"), "never learned", FAMILIES)
    assert not (tmp_path / "sae").exists()


def test_gated_keeps_saelens_names_and_both_paths(tmp_path):
    """SAELens's GatedSAE reads b_gate/b_mag/r_mag (no b_enc); the input scale lives in the shared W_enc."""
    model = make("gated", 0.37)
    export_saelens(model, tmp_path / "sae")
    weights = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert set(weights) == {"W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"}
    assert torch.equal(weights["r_mag"], model.r_mag.detach()) and torch.equal(weights["b_mag"], model.b_mag.detach())
    torch.testing.assert_close(weights["W_enc"], model.W_enc.detach() * 0.37)
    x = batch(model)
    codes = outputs(model, x)[0]
    with torch.no_grad():  # the gate and the magnitude path each decide some zeros
        proj = (x * 0.37 - model.b_dec) @ model.W_enc
        gate_shut = (proj + model.b_enc <= 0) & (proj * model.r_mag.exp() + model.b_mag > 0)
        mag_zero = (proj + model.b_enc > 0) & (proj * model.r_mag.exp() + model.b_mag <= 0)
    assert gate_shut.any() and mag_zero.any() and (codes[gate_shut | mag_zero] == 0).all()


def test_refuses_bad_metadata(tmp_path):
    model = make("relu")
    refused(lambda: export_saelens(model, tmp_path / "a", metadata={"hook_point": "x"}), "hook_point", "hook_name")
    refused(lambda: export_saelens(model, tmp_path / "a", metadata={"context_size": "128"}), "context_size", "int")
    refused(lambda: export_saelens(model, tmp_path / "a", metadata={"prepend_bos": 1}), "prepend_bos", "bool")
    refused(lambda: export_sparsify(make("topk"), tmp_path / "a", metadata={"context_size": 0}), "context_size")
    assert not (tmp_path / "a").exists()


def test_refuses_non_finite_weights(tmp_path):
    model = make("topk")
    with torch.no_grad():
        model.W_dec[3, 2] = float("nan")
    refused(lambda: export_sparsify(model, tmp_path / "sae"), "W_dec", "NaN")


def test_refuses_a_directory_holding_another_format(tmp_path):
    export_saelens(make("topk"), tmp_path / "sae")
    refused(lambda: export_sparsify(make("topk"), tmp_path / "sae"), "sae_weights.safetensors")
    export_sparsify(make("topk"), tmp_path / "sp")
    refused(lambda: export_saelens(make("topk"), tmp_path / "sp"), "sae.safetensors")
    make("topk").save(tmp_path / "own")
    refused(lambda: export_saelens(make("topk"), tmp_path / "own"), "saekit model")
    (tmp_path / "file").write_text("x")
    refused(lambda: export_saelens(make("topk"), tmp_path / "file"), "not a directory")


# ------------------------------------------------------------------ atomic writes
def test_files_are_written_atomically(tmp_path, monkeypatch):
    import safetensors.torch

    first = make("topk", seed=0)
    export_saelens(first, tmp_path / "sae", density=torch.full((N,), 0.01))
    before = {p.name: p.read_bytes() for p in (tmp_path / "sae").iterdir()}
    assert set(before) == {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors"}

    real = safetensors.torch.save_file

    def dies_half_way(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("killed")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_half_way)
    with pytest.raises(OSError):
        export_saelens(make("topk", seed=1), tmp_path / "sae")
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    after = {p.name: p.read_bytes() for p in (tmp_path / "sae").iterdir()}
    assert after == before  # the old export, whole; no temporary file left
    back, _ = load_foreign(tmp_path / "sae")
    assert_same(first, back, batch(first))
