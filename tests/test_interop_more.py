"""saekit.interop's remaining import formats against the real libraries: Gemma Scope (params.npz written by
numpy.savez; Gemma Scope 2's params.safetensors + config.json), whose reference outputs are SAELens's own
Gemma Scope loaders', and dictionary_learning (config.json + ae.pt written by its own trainSAE), whose
outputs are its own classes' (scripts/make_interop_fixtures.py). Then ``hf://`` sources, served offline
from a Hugging Face cache laid out here the way huggingface_hub lays it out (blobs, snapshot links, refs),
through the real snapshot_download in a subprocess that points HF_HUB_CACHE at it."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from saekit.errors import UserError
from saekit.interop import detect_format, load_foreign, load_foreign_all
from saekit.interop.hub import parse
from test_interop import copy_fixture, io, outputs, refused  # noqa: F401  (the shared fixture helpers)

FIXTURES = Path(__file__).parent / "fixtures" / "interop"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
GEMMA = sorted(n for n, m in MANIFEST.items() if m["format"] == "gemmascope")
DL = sorted(n for n, m in MANIFEST.items() if m["format"] == "dictionary_learning")
RUN = FIXTURES / "dictionary_learning_run"


def trainer(cls: str, run: str = "dictionary_learning_run") -> str:
    """The fixture name of the first trainer directory of ``run`` holding dictionary class ``cls``."""
    return next(n for n in DL if n.startswith(run + "/") and MANIFEST[n]["architecture"] == cls)


# ------------------------------------------------------------------ coverage and the libraries' outputs
def test_fixtures_cover_the_new_formats():
    versions = json.loads((FIXTURES / "versions.json").read_text())
    assert versions["dictionary-learning"] and versions["numpy"] and versions["huggingface-hub"]
    assert (FIXTURES / "gemmascope_npz" / "params.npz").is_file()
    assert (FIXTURES / "gemmascope2_resid_post" / "params.safetensors").is_file()
    classes = {MANIFEST[n]["architecture"] for n in DL}
    assert classes == {"AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder", "GatedAutoEncoder",
                       "MatryoshkaBatchTopKSAE"}
    cfg = json.loads((RUN / "trainer_0" / "config.json").read_text())
    assert set(cfg) == {"trainer", "buffer"} and cfg["trainer"]["trainer_class"] == "StandardTrainer"
    assert sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file()) < 1_000_000


@pytest.mark.parametrize("name", GEMMA + DL)
def test_reproduces_the_library_outputs(name):
    ref = io(name)
    model, info = load_foreign(FIXTURES / name)
    assert info["format"] == MANIFEST[name]["format"] and info["kind"] == model.kind == MANIFEST[name]["kind"]
    assert not model.training and model.d_in == 13
    codes, x_hat = outputs(model, ref["x"])
    assert (codes - ref["codes"]).abs().max().item() <= TOL
    assert (x_hat - ref["x_hat"]).abs().max().item() <= TOL
    assert torch.equal(codes != 0, ref["codes"] != 0)
    assert (codes != 0).sum(-1).tolist() == MANIFEST[name]["l0"]


@pytest.mark.parametrize("name", GEMMA + DL)
def test_round_trip_through_saekit_files(name, tmp_path):
    model, _ = load_foreign(FIXTURES / name)
    model.save(tmp_path / "m")
    back, info = load_foreign(tmp_path / "m")
    x = io(name)["x"]
    assert info["format"] == "saekit"
    for a, b in zip(outputs(model, x), outputs(back, x)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ Gemma Scope
def test_gemmascope_thresholds_are_the_published_numbers():
    model, info = load_foreign(FIXTURES / "gemmascope_npz")
    with np.load(FIXTURES / "gemmascope_npz" / "params.npz", allow_pickle=False) as data:
        stored = torch.from_numpy(data["threshold"])
    up = torch.nextafter(stored, torch.full_like(stored, 2.0)) - stored
    ulp = torch.maximum(up, stored - torch.nextafter(stored, torch.zeros_like(stored)))
    # the same number where a float32 log-threshold reaches it, else the nearest reachable (float32 exp of
    # neighbouring float32 logs can step over a threshold by two ulps)
    assert ((model.threshold.detach() - stored).abs() <= 2 * ulp).all()
    assert (model.threshold.detach() == stored).float().mean() > 0.7
    assert info["layout"] == "gemma-scope" and info["apply_b_dec_to_input"] is False
    assert any("b_dec @ W_enc folded into b_enc" in n for n in info["notes"])
    assert info["model_name"] is None and info["hook_name"] is None  # a bare params.npz says nothing


def cached_copy(tmp_path: Path, name: str) -> Path:
    """The fixture laid out under its repo's name as in a Hugging Face cache (no hub involved)."""
    repo, folder = MANIFEST[name]["repo_id"], MANIFEST[name]["path_in_repo"]
    target = tmp_path / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / ("a" * 40) / folder
    shutil.copytree(FIXTURES / name, target)
    return target


@pytest.mark.parametrize("name", GEMMA)
def test_gemmascope_names_are_told_as_saelens_tells_them(name, tmp_path):
    model, info = load_foreign(cached_copy(tmp_path, name))
    meta = MANIFEST[name]
    assert (info["model_name"], info["hook_name"]) == (meta["saelens_model_name"], meta["saelens_hook_name"])
    assert info["repo_id"] == meta["repo_id"] and info["path_in_repo"] == meta["path_in_repo"]
    assert (info["context_size"], info["prepend_bos"]) == (1024, True)
    ref = io(name)
    assert (outputs(model, ref["x"])[1] - ref["x_hat"]).abs().max() <= TOL


def test_gemmascope_folder_names_without_a_cache(tmp_path):
    d = tmp_path / "gemma-scope-9b-it-mlp" / "layer_12" / "width_131k" / "average_l0_40"
    shutil.copytree(FIXTURES / "gemmascope_npz", d)
    _, info = load_foreign(d)
    assert (info["model_name"], info["hook_name"], info["hook_layer"], info["l0"]) == (
        "gemma-2-9b-it", "blocks.12.hook_mlp_out", 12, 40)
    d = tmp_path / "gemma-scope-2b-pt-att" / "layer_4" / "width_16k" / "average_l0_9"
    shutil.copytree(FIXTURES / "gemmascope_npz", d)
    _, info = load_foreign(d)
    assert info["hook_name"] == "blocks.4.attn.hook_z" and any("hook_z" in n for n in info["notes"])
    d = tmp_path / "gemma-scope-2b-pt-res" / "embedding" / "width_4k" / "average_l0_6"
    shutil.copytree(FIXTURES / "gemmascope_npz", d)
    _, info = load_foreign(d)
    assert info["hook_name"] is None and any("embedding" in n for n in info["notes"])


def test_gemmascope2_metadata_and_a_folder_without_config(tmp_path):
    _, info = load_foreign(FIXTURES / "gemmascope2_resid_post")
    assert (info["layout"], info["model_name"], info["hook_name"]) == (
        "gemma-scope-2", "google/gemma-3-1b-pt", "blocks.7.hook_resid_post")
    assert info["hf_hook_name"] == "model.layers.7.output" and info["l0"] == 20
    d = cached_copy(tmp_path, "gemmascope2_resid_post")
    (d / "config.json").unlink()
    model, info = load_foreign(d)  # as SAELens: from the tensors, names from repo and folder
    ref = io("gemmascope2_resid_post")
    codes, x_hat = outputs(model, ref["x"])
    assert (codes - ref["codes"]).abs().max() <= TOL and (x_hat - ref["x_hat"]).abs().max() <= TOL
    assert info["hook_name"] == "blocks.7.hook_resid_post" and info["model_name"] == "google/gemma-3-1b-pt"
    assert any("no config.json" in n for n in info["notes"])


def test_gemmascope_either_spelling_in_either_file(tmp_path):
    d = tmp_path / "g"
    d.mkdir()
    w = load_file(str(FIXTURES / "gemmascope2_resid_post" / "params.safetensors"))
    np.savez(d / "params.npz", **{k: v.numpy() for k, v in w.items()})  # lowercase names in an npz
    ref = io("gemmascope2_resid_post")
    assert (outputs(load_foreign(d)[0], ref["x"])[1] - ref["x_hat"]).abs().max() <= TOL


def edit_json(path: Path, **changes) -> None:
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps({k: v for k, v in cfg.items() if v is not ...}))


@pytest.mark.parametrize("changes, words", [
    ({"hf_hook_point_out": "model.layers.7.post_feedforward_layernorm.output"}, ["transcoder"]),
    ({"affine_connection": True}, ["transcoder"]),
    ({"architecture": "topk"}, ["'topk'", "supported: jump_relu"]),
    ({"width": 41}, ["'width' is 41", "40 latents"]),
    ({"hf_hook_point_in": 7}, ["'hf_hook_point_in'"]),
])
def test_gemmascope2_bad_config(changes, words, tmp_path):
    d = copy_fixture("gemmascope2_resid_post", tmp_path)
    edit_json(d / "config.json", **changes)
    refused(d, "config.json", *words)


def test_gemmascope2_transcoder_tensors_are_refused(tmp_path):
    d = copy_fixture("gemmascope2_resid_post", tmp_path)
    w = load_file(str(d / "params.safetensors"))
    save_file({**w, "affine_skip_connection": torch.zeros(13, 13)}, str(d / "params.safetensors"))
    refused(d, "params.safetensors", "transcoder")
    save_file({**w, "w_dec": torch.zeros(40, 2, 13)}, str(d / "params.safetensors"))
    refused(d, "params.safetensors", "cross-layer transcoder")


def test_gemmascope_damaged_files(tmp_path):
    d = copy_fixture("gemmascope_npz", tmp_path)
    with np.load(d / "params.npz", allow_pickle=False) as data:
        w = {k: data[k] for k in data.files}
    np.savez(d / "params.npz", **{**w, "W_dec": w["W_dec"][:-1]})
    refused(d, "params.npz", "'W_dec'", "shape", "[40, 13]")
    np.savez(d / "params.npz", **{k: v for k, v in w.items() if k != "threshold"})
    refused(d, "params.npz", "no tensor 'threshold'")
    np.savez(d / "params.npz", **{**w, "threshold": w["threshold"].astype(np.int32)})
    refused(d, "params.npz", "threshold", "floating point")
    np.savez(d / "params.npz", **{k: v for k, v in w.items() if k != "W_enc"})
    refused(d, "params.npz", "W_enc", "missing")
    # an object array would need unpickling: refused, never unpickled
    np.savez(d / "params.npz", **w, extra=np.array([{"a": 1}], dtype=object))
    refused(d, "params.npz", "unpickling")
    data = (FIXTURES / "gemmascope_npz" / "params.npz").read_bytes()
    (d / "params.npz").write_bytes(data[: len(data) // 2])
    refused(d, "params.npz", "not a readable .npz file")
    (d / "params.npz").write_bytes(b"not a zip at all")
    refused(d, "params.npz")
    d = copy_fixture("gemmascope2_resid_post", tmp_path)
    (d / "config.json").write_text('{"architecture": "jump_')
    refused(d, "config.json", "not valid JSON")
    (d / "config.json").write_text("[1]")
    refused(d, "config.json", "JSON object")
    shutil.copy(FIXTURES / "gemmascope2_resid_post" / "config.json", d / "config.json")
    data = (d / "params.safetensors").read_bytes()
    (d / "params.safetensors").write_bytes(data[:100])
    refused(d, "params.safetensors", "not a readable safetensors file")
    (d / "params.safetensors").unlink()
    refused(d, "config.json", "no weights", "params.safetensors")


# ------------------------------------------------------------------ dictionary_learning
def test_dictionary_learning_metadata_and_run_layout():
    refused(RUN, "several SAEs", "trainer_0", "trainer_6", "load_foreign_all")
    saes = load_foreign_all(RUN)
    assert list(saes) == [f"trainer_{i}" for i in range(7)]
    for _, (model, info) in saes.items():
        assert info["format"] == "dictionary_learning" and info["model_name"] == "EleutherAI/pythia-70m-deduped"
        assert (info["hook_name"], info["hook_layer"], info["context_size"]) == ("blocks.3.hook_resid_post", 3, 128)
        assert info["submodule_name"] == "resid_post_layer_3"
    assert detect_format(RUN / "trainer_0") == "dictionary_learning"


def test_dictionary_learning_topk_ignores_its_threshold_and_batchtopk_uses_it():
    model, info = load_foreign(FIXTURES / trainer("AutoEncoderTopK"))
    assert model.kind == "topk" and info["k"] == 5 and info["inference_threshold"] == pytest.approx(0.4)
    name = trainer("BatchTopKSAE")
    model, info = load_foreign(FIXTURES / name)
    assert model.kind == "batchtopk" and model.cfg.k == 5 and model.threshold.item() == pytest.approx(0.35)
    unlearned = next(n for n in DL if MANIFEST[n]["architecture"] == "BatchTopKSAE" and MANIFEST[n]["kind"] == "relu")
    model, info = load_foreign(FIXTURES / unlearned)
    assert model.kind == "relu" and info["inference_threshold"] == -1.0
    assert any("never learned" in n for n in info["notes"])
    # normalize_activations: trainSAE scaled biases and threshold by its norm factor before saving
    model, info = load_foreign(FIXTURES / trainer("BatchTopKSAE", "dictionary_learning_normalized"))
    assert model.threshold.item() == pytest.approx(0.3 * 1.98255717, rel=1e-5)


def test_dictionary_learning_conversion_notes():
    model, info = load_foreign(FIXTURES / trainer("GatedAutoEncoder"))
    assert info["kind"] == "gated" and type(model).__name__ == "GatedSAE"
    state = torch.load(FIXTURES / trainer("GatedAutoEncoder") / "ae.pt", weights_only=True)
    assert torch.equal(model.r_mag, state["r_mag"]) and torch.equal(model.b_mag, state["mag_bias"])
    assert torch.equal(model.b_enc, state["gate_bias"]) and torch.equal(model.W_enc, state["encoder.weight"].T)
    _, info = load_foreign(FIXTURES / trainer("JumpReluAutoEncoder"))
    assert any("2 JumpReLU thresholds are <= 0" in n for n in info["notes"])
    assert any("b_dec @ W_enc folded" in n for n in info["notes"])
    _, info = load_foreign(FIXTURES / trainer("AutoEncoder"))
    assert any("normalize_decoder" in n for n in info["notes"])
    _, info = load_foreign(FIXTURES / trainer("MatryoshkaBatchTopKSAE"))
    assert info["group_sizes"] == [10, 10, 20]


def test_dictionary_learning_autoencoder_new_layout(tmp_path):
    """AutoEncoderNew: nothing subtracted before the encoder, a decoder bias after it."""
    d = copy_fixture(trainer("AutoEncoder"), tmp_path)
    sd = torch.load(d / "ae.pt", weights_only=True)
    bias = sd.pop("bias")
    torch.save({**sd, "decoder.bias": bias}, d / "ae.pt")
    model, info = load_foreign(d)
    x = io(trainer("AutoEncoder"))["x"].double()
    code = torch.relu(x @ sd["encoder.weight"].double().T + sd["encoder.bias"].double())
    x_hat = code @ sd["decoder.weight"].double().T + bias.double()
    codes, ours = outputs(model, x.float())
    assert (codes.double() - code).abs().max() <= TOL and (ours.double() - x_hat).abs().max() <= TOL
    assert any("AutoEncoderNew" in n for n in info["notes"])


class Marker:
    """Unpickling this would touch a file: torch.load(weights_only=True) must refuse it, not run it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_ae_pt_that_weights_only_refuses(tmp_path):
    d = copy_fixture(trainer("AutoEncoderTopK"), tmp_path)
    sd = torch.load(d / "ae.pt", weights_only=True)
    marker = tmp_path / "unpickled"
    torch.save({**sd, "evil": Marker(marker)}, d / "ae.pt")
    refused(d, "ae.pt", "torch.load(weights_only=True)", "re-save it as a dict of tensors")
    assert not marker.exists()
    torch.save({**sd, "note": 3}, d / "ae.pt")  # allowed by weights_only, but no tensor
    refused(d, "ae.pt", "entry 'note' is a int")
    torch.save(list(sd.values()), d / "ae.pt")
    refused(d, "ae.pt", "holds a list")
    torch.save({"step": 100, "ae": sd, "optimizer": {"state": {}}, "config": {}, "norm_factor": 1.0}, d / "ae.pt")
    refused(d, "ae.pt", "training backup", "step 100")
    data = (FIXTURES / trainer("AutoEncoderTopK") / "ae.pt").read_bytes()
    (d / "ae.pt").write_bytes(data[: len(data) // 2])
    refused(d, "ae.pt", "torch.load(weights_only=True)")


def test_dictionary_learning_bad_config_and_weights(tmp_path):
    d = copy_fixture(trainer("AutoEncoderTopK"), tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    sd = torch.load(d / "ae.pt", weights_only=True)

    def with_trainer(**changes):
        (d / "config.json").write_text(json.dumps({**cfg, "trainer": {**cfg["trainer"], **changes}}))

    with_trainer(dict_class="CrossCoder")
    refused(d, "config.json", "'CrossCoder'", "supported: AutoEncoder", "GatedAutoEncoder")
    with_trainer(dict_size=41)
    refused(d, "ae.pt", "'encoder.weight'", "shape", "dict_size=41")
    with_trainer(activation_dim="13")
    refused(d, "config.json", "'trainer.activation_dim'")
    with_trainer(k=7)
    _, info = load_foreign(d)
    assert info["k"] == 5 and any("k buffer is 5, the trainer's k 7" in n for n in info["notes"])
    (d / "config.json").write_text(json.dumps({"buffer": cfg["buffer"]}))
    refused(d, "config.json", "'trainer' is missing")
    (d / "config.json").write_text(json.dumps({**cfg, "trainer": {k: v for k, v in cfg["trainer"].items()
                                                                   if k != "dict_class"}}))
    refused(d, "config.json", "'trainer.dict_class' is missing")
    (d / "config.json").write_text(json.dumps(cfg)[:50])
    refused(d, "config.json", "not valid JSON")
    (d / "config.json").write_text(json.dumps(cfg))
    torch.save({**sd, "k": torch.tensor(41)}, d / "ae.pt")
    refused(d, "ae.pt", "k is 41")
    torch.save({k: v for k, v in sd.items() if k != "b_dec"}, d / "ae.pt")
    refused(d, "ae.pt", "no tensor 'b_dec'")
    torch.save({**sd, "b_dec": sd["b_dec"][:-1]}, d / "ae.pt")
    refused(d, "ae.pt", "'b_dec'", "shape")
    d = copy_fixture(trainer("MatryoshkaBatchTopKSAE"), tmp_path)
    sd = torch.load(d / "ae.pt", weights_only=True)
    torch.save({**sd, "group_sizes": torch.tensor([10, 10, 10])}, d / "ae.pt")
    refused(d, "ae.pt", "group_sizes")


def test_dictionary_learning_hook_from_a_run_folder_name(tmp_path):
    d = tmp_path / "gemma-2-2b_topk" / "mlp_out_layer_12" / "trainer_0"
    shutil.copytree(FIXTURES / trainer("AutoEncoderTopK"), d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "trainer": {**cfg["trainer"], "submodule_name": None}}))
    _, info = load_foreign(d)
    assert info["hook_name"] == "blocks.12.hook_mlp_out"


def test_dictionary_learning_missing_files(tmp_path):
    d = copy_fixture(trainer("BatchTopKSAE"), tmp_path)
    (d / "config.json").unlink()
    refused(d, "config.json", "no such file", "ae.pt")
    d = copy_fixture(trainer("JumpReluAutoEncoder"), tmp_path)
    (d / "ae.pt").unlink()
    refused(d, "config.json", "no weights", "ae.pt")


# ------------------------------------------------------------------ hf:// sources
@pytest.mark.parametrize("source, want", [
    ("hf://google/gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_50",
     ("google/gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_50", None)),
    ("hf://org/repo/a/b@v1.0", ("org/repo", "a/b", "v1.0")),
    ("hf://org/repo@main/a/b", ("org/repo", "a/b", "main")),
    ("hf://org/repo@refs/pr/3/a", ("org/repo", "a", "refs/pr/3")),
    ("hf://org/repo/a@refs/pr/3", ("org/repo", "a", "refs/pr/3")),
    ("hf://models/org/repo/a/", ("org/repo", "a", None)),
    ("hf://org/repo", ("org/repo", "", None)),
    (Path("hf://org/repo/x"), ("org/repo", "x", None)),
])
def test_hf_source_syntax(source, want):
    assert parse(source) == want


@pytest.mark.parametrize("source, words", [
    ("hf://justone", ["expected hf://ORG/REPO/PATH[@REVISION]"]),
    ("hf://org/repo/a@", ["empty revision"]),
    ("hf://org/repo/a/../b", ["'..'"]),
    ("hf://datasets/org/repo/a", ["model repos only"]),
])
def test_hf_source_syntax_errors(source, words):
    refused(source, *words)


def test_a_relative_path_that_reads_like_a_hub_folder_says_how_to_name_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused("someone/some-saes/layer_3", "no such directory", "hf://someone/some-saes/layer_3", "RELEASE/SAE_ID")


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hf_cache(root: Path, repo_id: str, folder: str, files: dict[str, Path], refs=("main",)) -> Path:
    """A Hugging Face cache as huggingface_hub writes it: blobs/<sha256>, snapshots/<commit>/<path> links
    to them, refs/<name> holding the commit (no newline)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT / folder
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(COMMIT)
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return root


OFFLINE_LOAD = r"""
import json, sys
import torch
from safetensors.torch import load_file
from saekit.errors import UserError
from saekit.interop import load_foreign
out = {}
for source, io_file in json.loads(sys.argv[1]):
    try:
        model, info = load_foreign(source)
    except UserError as err:
        out[source] = {"error": str(err)}
        continue
    ref = load_file(io_file)
    with torch.no_grad():
        codes, x_hat = model.encode(ref["x"]), model(ref["x"]).x_hat
    out[source] = {"codes": (codes - ref["codes"]).abs().max().item(),
                   "x_hat": (x_hat - ref["x_hat"]).abs().max().item(),
                   **{k: info.get(k) for k in ("format", "model_name", "hook_name", "repo_id", "path_in_repo",
                                               "revision", "commit", "source", "path")}}
print(json.dumps(out))
"""


def offline(cache: Path, sources: list[tuple[str, str]]) -> dict:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(cache.parent / "hf-home")}
    p = subprocess.run([sys.executable, "-c", OFFLINE_LOAD, json.dumps(sources)], capture_output=True, text=True,
                       timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_hf_sources_load_offline_from_the_cache(tmp_path):
    gs, gs2, dl = "gemmascope_npz", "gemmascope2_resid_post", trainer("GatedAutoEncoder")
    cache = tmp_path / "hub"
    hf_cache(cache, MANIFEST[gs]["repo_id"], MANIFEST[gs]["path_in_repo"],
             {"params.npz": FIXTURES / gs / "params.npz"}, refs=("main", "v1"))
    hf_cache(cache, MANIFEST[gs2]["repo_id"], MANIFEST[gs2]["path_in_repo"],
             {n: FIXTURES / gs2 / n for n in ("params.safetensors", "config.json")})
    hf_cache(cache, "someone/dictionaries", "pythia/trainer_5",
             {n: FIXTURES / dl / n for n in ("ae.pt", "config.json")})
    io_of = {gs: str(FIXTURES / gs / "io.safetensors"), gs2: str(FIXTURES / gs2 / "io.safetensors"),
             dl: str(FIXTURES / dl / "io.safetensors")}
    base = f"hf://{MANIFEST[gs]['repo_id']}"
    sources = [(f"{base}/{MANIFEST[gs]['path_in_repo']}", io_of[gs]),
               (f"{base}/{MANIFEST[gs]['path_in_repo']}@v1", io_of[gs]),
               (f"{base}/{MANIFEST[gs]['path_in_repo']}@{COMMIT}", io_of[gs]),
               (f"{base}@main/{MANIFEST[gs]['path_in_repo']}", io_of[gs]),
               (f"hf://{MANIFEST[gs2]['repo_id']}/{MANIFEST[gs2]['path_in_repo']}", io_of[gs2]),
               ("hf://someone/dictionaries/pythia/trainer_5", io_of[dl]),
               # what cannot be had: each a one-line error naming it
               ("hf://nobody/nothing/x", io_of[gs]),
               (f"{base}/{MANIFEST[gs]['path_in_repo']}@v9", io_of[gs]),
               (f"{base}/layer_9/width_16k/average_l0_1", io_of[gs])]
    got = offline(cache, sources)
    for source, _ in sources[:6]:
        r = got[source]
        assert "error" not in r, r
        assert r["codes"] <= TOL and r["x_hat"] <= TOL, (source, r)
        assert r["commit"] == COMMIT and Path(r["path"]).is_relative_to(cache)
    r = got[sources[0][0]]
    assert (r["model_name"], r["hook_name"]) == (MANIFEST[gs]["saelens_model_name"], MANIFEST[gs]["saelens_hook_name"])
    assert r["repo_id"] == MANIFEST[gs]["repo_id"] and r["path_in_repo"] == MANIFEST[gs]["path_in_repo"]
    assert got[sources[1][0]]["revision"] == "v1" and got[sources[3][0]]["revision"] == "main"
    assert got[sources[4][0]]["hook_name"] == MANIFEST[gs2]["saelens_hook_name"]
    assert got[sources[5][0]]["format"] == "dictionary_learning"
    for source, words in ((sources[6][0], ["nobody/nothing", "cannot be downloaded", "not in the local Hugging Face "
                                           "cache", "unset HF_HUB_OFFLINE"]),
                          (sources[7][0], ["'v9'", "cannot be downloaded"]),
                          (sources[8][0], ["no SAE files", "layer_9/width_16k/average_l0_1"])):
        msg = got[source]["error"]
        assert "\n" not in msg and all(w in msg for w in words), msg


def test_saekit_import_from_an_hf_source(tmp_path):
    gs = "gemmascope_npz"
    cache = hf_cache(tmp_path / "hub", MANIFEST[gs]["repo_id"], MANIFEST[gs]["path_in_repo"],
                     {"params.npz": FIXTURES / gs / "params.npz"})
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    source = f"hf://{MANIFEST[gs]['repo_id']}/{MANIFEST[gs]['path_in_repo']}"
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "saekit.cli", "import", source, str(run)], capture_output=True,
                       text=True, timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    info = json.loads((run / "import.json").read_text())
    assert info["format"] == "gemmascope" and info["source"] == source and info["commit"] == COMMIT
    assert info["hook_name"] == MANIFEST[gs]["saelens_hook_name"]
    p = subprocess.run([sys.executable, "-m", "saekit.cli", "import", "hf://nobody/nothing/x", str(tmp_path / "r2")],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 2 and "nobody/nothing" in p.stderr and "Traceback" not in p.stderr
