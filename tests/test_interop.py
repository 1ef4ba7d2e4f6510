"""saekit.interop against the real libraries: every fixture in tests/fixtures/interop/ was saved by SAELens
or sparsify themselves (scripts/make_interop_fixtures.py, run in a throwaway venv), beside the library's
own codes and reconstructions on a fixed batch (io.safetensors). Here saekit loads each directory and
must reproduce those outputs; the libraries are not needed to run these tests."""
import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saekit.autoencoders import Autoencoder, AutoencoderConfig, build
from saekit.errors import UserError
from saekit.interop import detect_format, load_foreign, load_foreign_all

FIXTURES = Path(__file__).parent / "fixtures" / "interop"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
LOADABLE = sorted(n for n, m in MANIFEST.items() if m["kind"] != "refused")
CLASS_OF_KIND = {"relu": "ReLUSAE", "topk": "TopKSAE", "batchtopk": "BatchTopKSAE", "jumprelu": "JumpReLUSAE",
                 "gated": "GatedSAE"}
TOL = 1e-5


def io(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / name / "io.safetensors"))


def outputs(model, x):
    with torch.no_grad():
        return model.encode(x), model(x).x_hat


def copy_fixture(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / Path(name).name))


def refused(path, *words) -> str:
    """The UserError that loading ``path`` raises: one line, naming every one of ``words``."""
    with pytest.raises(UserError) as info:
        load_foreign(path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for word in words:
        assert word in msg, msg
    return msg


# ------------------------------------------------------------------ the libraries' own outputs
def test_fixtures_cover_what_they_should():
    versions = json.loads((FIXTURES / "versions.json").read_text())
    assert versions["sae-lens"].startswith("6.") and versions["eai-sparsify"]
    kinds = {(m["format"], m["kind"]) for m in MANIFEST.values()}
    assert {("saelens", "relu"), ("saelens", "topk"), ("saelens", "jumprelu"), ("saelens", "gated"),
            ("sparsify", "topk"), ("dictionary_learning", "gated")} <= kinds
    cfgs = [json.loads((FIXTURES / n / "cfg.json").read_text()) for n in MANIFEST if n.startswith("saelens")]
    assert {c["apply_b_dec_to_input"] for c in cfgs} == {True, False}
    assert any(c.get("normalize_activations") not in ("none", False, None) for c in cfgs)
    assert any("metadata" not in c for c in cfgs)  # a pre-6.0 layout
    assert sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file()) < 1_000_000


@pytest.mark.parametrize("name", LOADABLE)
def test_reproduces_the_library_outputs(name):
    ref = io(name)
    model, info = load_foreign(FIXTURES / name)
    assert type(model).__name__ == CLASS_OF_KIND[MANIFEST[name]["kind"]]
    assert info["format"] == MANIFEST[name]["format"] and info["kind"] == model.kind
    assert model.d_in == 13 and model.d_in % 8 != 0
    codes, x_hat = outputs(model, ref["x"])
    assert codes.dtype == torch.float32 and codes.shape == ref["codes"].shape
    assert (codes - ref["codes"]).abs().max().item() <= TOL
    assert (x_hat - ref["x_hat"]).abs().max().item() <= TOL
    assert torch.equal(codes != 0, ref["codes"] != 0)  # the same latents fire
    assert (codes != 0).sum(-1).tolist() == MANIFEST[name]["l0"]


def test_sparsify_topk_with_fewer_than_k_positive():
    """Row 0 of this fixture has only 3 positive pre-activations (k = 5): sparsify's ReLU-then-top-k and
    saekit's top-k-then-ReLU must give the same 3 nonzeros."""
    model, info = load_foreign(FIXTURES / "sparsify_topk")
    assert info["k"] == 5
    codes, _ = outputs(model, io("sparsify_topk")["x"])
    assert (codes[0] != 0).sum() == 3 and (codes[1:] != 0).sum(-1).eq(5).all()


def test_jumprelu_thresholds_are_the_same_numbers_to_the_last_bit_or_next():
    """saekit keeps log-thresholds; where some float32 has exactly the stored threshold as its float32
    exp, that one is chosen, else the nearest (a float32 log cannot reach every float32 threshold)."""
    model, _ = load_foreign(FIXTURES / "saelens_jumprelu_nobdec")
    stored = load_file(str(FIXTURES / "saelens_jumprelu_nobdec" / "sae_weights.safetensors"))["threshold"]
    ours = model.threshold.detach()
    ulp = torch.nextafter(stored, torch.full_like(stored, 2.0)) - stored
    assert ((ours - stored).abs() <= ulp).all()
    assert (ours == stored).float().mean() > 0.7


@pytest.mark.parametrize("name", LOADABLE)
def test_round_trip_through_saekit_files(name, tmp_path):
    model, _ = load_foreign(FIXTURES / name)
    model.save(tmp_path / "m")
    again = Autoencoder.load(tmp_path / "m").eval()  # load gives a training-mode model (BatchTopK: batch top-k)
    x = io(name)["x"]
    for a, b in zip(outputs(model, x), outputs(again, x)):
        assert torch.equal(a, b)
    assert detect_format(tmp_path / "m") == "saekit"
    back, info = load_foreign(tmp_path / "m")
    assert info["format"] == "saekit" and torch.equal(outputs(back, x)[1], outputs(model, x)[1])


# ------------------------------------------------------------------ metadata
def test_saelens_metadata():
    _, info = load_foreign(FIXTURES / "saelens_standard")
    assert (info["layout"], info["model_name"], info["hook_name"]) == ("6.x", "gpt2", "blocks.3.hook_resid_pre")
    assert (info["context_size"], info["prepend_bos"], info["sae_lens_version"]) == (128, True, "6.54.12")
    _, info = load_foreign(FIXTURES / "saelens_standard_nobdec_norm")
    assert info["normalize_activations"] == "expected_average_only_in"
    assert any("b_dec @ W_enc" in n for n in info["notes"])


def test_saelens_pre_6_layout_metadata():
    _, info = load_foreign(FIXTURES / "saelens_legacy_topk")
    assert info["layout"] == "pre-6.0" and info["architecture"] == "topk" and info["k"] == 5
    assert (info["model_name"], info["hook_name"], info["hook_layer"]) == ("gelu-2l", "blocks.1.hook_resid_post", 1)
    assert (info["context_size"], info["prepend_bos"]) == (256, False)


def test_sparsify_run_with_one_directory_per_hookpoint():
    run = FIXTURES / "sparsify_multi"
    refused(run, "several SAEs", "layers.0", "layers.1.mlp", "load_foreign_all")
    saes = load_foreign_all(run)
    assert list(saes) == ["layers.0", "layers.1.mlp"]
    for hook, (model, info) in saes.items():
        assert info["hookpoint"] == info["hook_name"] == hook
        assert (info["model_name"], info["context_size"]) == ("EleutherAI/pythia-70m", 64)
        ref = io(f"sparsify_multi/{hook}")
        assert (outputs(model, ref["x"])[1] - ref["x_hat"]).abs().max() <= TOL
    assert list(load_foreign_all(FIXTURES / "saelens_topk")) == ["saelens_topk"]


# ------------------------------------------------------------------ conversions checked by hand
def test_saelens_pre_6_finetuning_scaling_factor_is_folded(tmp_path):
    d = copy_fixture("saelens_legacy_standard", tmp_path)
    w = load_file(str(d / "sae_weights.safetensors"))
    scale = torch.linspace(0.5, 2.0, w["b_enc"].numel())
    save_file({**w, "scaling_factor": scale}, str(d / "sae_weights.safetensors"))
    refused(d, "sae_weights.safetensors", "finetuning_scaling_factor")  # SAELens refuses this too
    cfg = json.loads((d / "cfg.json").read_text())
    (d / "cfg.json").write_text(json.dumps({**cfg, "finetuning_scaling_factor": True}))
    model, info = load_foreign(d)
    ref = io("saelens_legacy_standard")
    codes, x_hat = outputs(model, ref["x"])
    assert (codes - ref["codes"]).abs().max() <= TOL
    expected = (ref["codes"].double() * scale.double()) @ w["W_dec"].double() + w["b_dec"].double()
    assert (x_hat.double() - expected).abs().max() <= TOL
    assert any("scaling_factor" in n for n in info["notes"])


def test_saelens_log_threshold_tensor(tmp_path):
    d = copy_fixture("saelens_jumprelu_nobdec", tmp_path)
    w = load_file(str(d / "sae_weights.safetensors"))
    w["log_threshold"] = w.pop("threshold").double().log().float()
    save_file(w, str(d / "sae_weights.safetensors"))
    ref = io("saelens_jumprelu_nobdec")
    codes, x_hat = outputs(load_foreign(d)[0], ref["x"])
    assert (codes - ref["codes"]).abs().max() <= TOL and (x_hat - ref["x_hat"]).abs().max() <= TOL


def test_sparsify_zero_skip_connection_is_dropped(tmp_path):
    d = copy_fixture("sparsify_skip", tmp_path)
    w = load_file(str(d / "sae.safetensors"))
    ref = io("sparsify_skip")
    without_skip = ref["x_hat"].double() - ref["x"].double() @ w["W_skip"].double().T
    save_file({**w, "W_skip": torch.zeros_like(w["W_skip"])}, str(d / "sae.safetensors"))
    model, info = load_foreign(d)
    codes, x_hat = outputs(model, ref["x"])
    assert (codes - ref["codes"]).abs().max() <= TOL
    assert (x_hat.double() - without_skip).abs().max() <= TOL
    assert any("W_skip" in n for n in info["notes"])


# ------------------------------------------------------------------ what is refused, and damage
def test_sparsify_skip_connection_is_refused():
    refused(FIXTURES / "sparsify_skip", "sae.safetensors", "skip connection", "W_skip")


def edit_cfg(d: Path, **changes) -> Path:
    cfg = json.loads((d / "cfg.json").read_text())
    cfg.update(changes)
    (d / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not ...}))
    return d


@pytest.mark.parametrize("arch", ["abstopk", "jumprelu_transcoder", "matching_pursuit", "temporal"])
def test_saelens_unsupported_architecture(arch, tmp_path):
    d = edit_cfg(copy_fixture("saelens_standard", tmp_path), architecture=arch)
    refused(d, "cfg.json", repr(arch), "supported: standard, topk, jumprelu, gated")


@pytest.mark.parametrize("norm", ["layer_norm", "constant_norm_rescale", "bogus"])
def test_saelens_per_token_normalization_is_refused(norm, tmp_path):
    d = edit_cfg(copy_fixture("saelens_standard", tmp_path), normalize_activations=norm)
    refused(d, "cfg.json", norm)


def test_saelens_pre_6_unknown_activation(tmp_path):
    d = edit_cfg(copy_fixture("saelens_legacy_standard", tmp_path), activation_fn_str="tanh-relu")
    refused(d, "cfg.json", "tanh-relu")


def test_saelens_topk_without_k_in_kwargs(tmp_path):
    d = edit_cfg(copy_fixture("saelens_legacy_topk", tmp_path), activation_fn_kwargs={})
    refused(d, "cfg.json", "activation_fn_kwargs.k")


@pytest.mark.parametrize("changes, words", [
    ({"activation": "groupmax"}, ["groupmax", "supported: topk"]),
    ({"transcode": True}, ["transcoder"]),
    ({"k": 41}, ["k is 41"]),
    ({"d_in": "13"}, ["'d_in'"]),
    ({"d_in": ...}, ["'d_in' is missing"]),
])
def test_sparsify_bad_config(changes, words, tmp_path):
    d = edit_cfg(copy_fixture("sparsify_topk", tmp_path), **changes)
    refused(d, "cfg.json", *words)


@pytest.mark.parametrize("name", ["saelens_topk", "sparsify_topk"])
def test_truncated_or_garbled_cfg_json(name, tmp_path):
    d = copy_fixture(name, tmp_path)
    text = (d / "cfg.json").read_text()
    (d / "cfg.json").write_text(text[: len(text) // 2])
    refused(d, "cfg.json", "not valid JSON")
    (d / "cfg.json").write_text("[1, 2, 3]")
    refused(d, "cfg.json", "JSON object")


@pytest.mark.parametrize("name, weights, key", [("saelens_jumprelu", "sae_weights.safetensors", "W_enc"),
                                                ("sparsify_topk", "sae.safetensors", "encoder.weight")])
def test_weights_of_the_wrong_shape_or_missing(name, weights, key, tmp_path):
    d = copy_fixture(name, tmp_path)
    w = load_file(str(d / weights))
    good = w[key]
    save_file({**w, key: good[:-1].contiguous()}, str(d / weights))
    refused(d, weights, key, "shape", str(list(good.shape)))
    save_file({k: v for k, v in w.items() if k != "b_dec"}, str(d / weights))
    refused(d, weights, "no tensor 'b_dec'")
    save_file({**w, "b_dec": torch.zeros(13, dtype=torch.int64)}, str(d / weights))
    refused(d, weights, "b_dec", "floating point")


@pytest.mark.parametrize("name, weights", [("saelens_standard", "sae_weights.safetensors"),
                                           ("sparsify_topk", "sae.safetensors")])
def test_garbled_and_missing_files(name, weights, tmp_path):
    d = copy_fixture(name, tmp_path)
    data = (d / weights).read_bytes()
    (d / weights).write_bytes(data[: len(data) // 3])
    refused(d, weights, "not a readable safetensors file")
    (d / weights).unlink()
    refused(d, "cfg.json", weights)  # cfg.json alone: says which weights file it expected
    shutil.copy(FIXTURES / name / weights, d / weights)
    (d / "cfg.json").unlink()
    refused(d, "cfg.json", "no such file")


def test_paths_that_hold_no_sae(tmp_path):
    refused(tmp_path / "absent", "no such directory")
    (tmp_path / "file.txt").write_text("x")
    refused(tmp_path / "file.txt", "expected a directory")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "no SAE found", "sae_weights.safetensors", "sae.safetensors")


# ------------------------------------------------------------------ house rules
def test_interop_imports_only_building_blocks_and_never_unpickles():
    readers = {"autoencoders", "errors", "files", "schema", "interop"}
    for path in (Path(__file__).parents[1] / "saekit" / "interop").glob("*.py"):
        # The format readers need only models and files; runs.py also writes a run's config for a store.
        allowed = readers | ({"config", "data"} if path.name == "runs.py" else set())
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                if name.startswith("saekit."):
                    assert name.split(".")[1] in allowed, f"{path.name} imports {name}"
                assert name.split(".")[0] != "pickle", f"{path.name} imports pickle"
        # The one pickle read: dictionary_learning's ae.pt, through torch's restricted loader only; every
        # numpy read refuses object arrays.
        torch_loads = 0
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                owner = ast.unparse(node.func.value)
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert owner not in ("pickle", "dill", "cloudpickle", "joblib"), f"{path.name} unpickles"
                if owner == "torch":
                    torch_loads += 1
                    assert kw.get("weights_only") == "True", f"{path.name}: torch.load without weights_only=True"
                if owner in ("np", "numpy"):
                    assert kw.get("allow_pickle") == "False", f"{path.name}: np.load without allow_pickle=False"
        assert torch_loads == (1 if path.name == "dictionary_learning.py" else 0), path.name


@pytest.mark.parametrize("name", ["saelens_gated", "sparsify_topk", "gemmascope_npz", "dictionary_learning_run/trainer_5"])
def test_autoencoder_load_reads_a_foreign_directory(name):
    """Autoencoder.load on another library's directory is load_foreign's model (and gives its outputs)."""
    model = Autoencoder.load(FIXTURES / name)
    ref = io(name)
    codes, x_hat = outputs(model, ref["x"])
    assert (codes - ref["codes"]).abs().max() <= TOL and (x_hat - ref["x_hat"]).abs().max() <= TOL
    assert model.kind == MANIFEST[name]["kind"]


def test_autoencoder_load_says_what_is_missing_or_there_instead(tmp_path):
    with pytest.raises(UserError, match="holds several SAEs .layers.0, layers.1.mlp.; pass one of them"):
        Autoencoder.load(FIXTURES / "sparsify_multi")
    with pytest.raises(UserError, match="no such directory"):
        Autoencoder.load(tmp_path / "nothing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="has config.json but no weights beside it"):
        Autoencoder.load(tmp_path)
    run = tmp_path / "run"
    build(AutoencoderConfig.for_kind("topk", n_latents=8, k=2), 4).save(run / "model")
    with pytest.raises(UserError, match="a run directory; its model is .*run/model"):
        Autoencoder.load(run)
