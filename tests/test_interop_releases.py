"""SAELens release names (``RELEASE/SAE_ID``) resolved through SAELens's own table (saekit/interop/
saelens_releases.json.gz, written by scripts/make_saelens_releases.py from the installed sae-lens) and read
offline from a Hugging Face cache laid out as huggingface_hub lays it out, holding fixtures the real
libraries saved (tests/fixtures/interop) under the repo and folder each release names."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from saekit.interop import releases
from test_interop import refused
from test_interop_more import FIXTURES, MANIFEST, ROOT, TOL, hf_cache, trainer

LOAD = r"""
import json, sys
import torch
from safetensors.torch import load_file
from saekit.errors import UserError
from saekit.interop import load_foreign
out = {}
for source, io_file, scale in json.loads(sys.argv[1]):
    try:
        model, info = load_foreign(source)
    except UserError as err:
        out[source] = {"error": str(err)}
        continue
    ref = load_file(io_file)  # the library's outputs on its own (normalized) inputs x
    x = ref["x"] / scale      # the raw activations those came from
    with torch.no_grad():
        codes, x_hat = model.encode(x), model(x).x_hat
    out[source] = {"codes": (codes - ref["codes"]).abs().max().item(),
                   "x_hat": (x_hat * scale - ref["x_hat"]).abs().max().item(),  # in the library's units
                   "input_scale": model.input_scale.item(), "kind": model.kind,
                   "info": json.loads(json.dumps(info, default=str))}
print(json.dumps(out))
"""


def load_offline(cache: Path, sources: list[tuple[str, str, float]]) -> dict:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(cache.parent / "hf-home")}
    p = subprocess.run([sys.executable, "-c", LOAD, json.dumps(sources)], capture_output=True, text=True,
                       timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def entry(release: str, sae_id: str) -> tuple[str, str]:
    """(repo_id, path) of a release's SAE, as the table has it."""
    _, info = releases.resolve(f"{release}/{sae_id}")
    return info["repo_id"], info["path_in_repo"]


def files(name: str, *names: str) -> dict[str, Path]:
    return {n: FIXTURES / name / n for n in names}


def test_the_table_is_saelens_own():
    t = releases.table()
    assert t["sae_lens_version"].startswith("6.")
    assert len(t["releases"]) > 100 and sum(len(r["saes"]) for r in t["releases"].values()) > 10_000
    # spot checks against SAELens's pretrained_saes.yaml
    assert entry("gpt2-small-res-jb", "blocks.8.hook_resid_pre") == ("jbloom/GPT2-Small-SAEs-Reformatted",
                                                                     "blocks.8.hook_resid_pre")
    assert entry("gemma-scope-2b-pt-res-canonical", "layer_0/width_16k/canonical") == (
        "google/gemma-scope-2b-pt-res", "layer_0/width_16k/average_l0_105")


def test_release_names_load_offline_as_saelens_loads_them(tmp_path):
    cache = tmp_path / "hub"
    sources = []
    # SAELens's own format, a release with config overrides (center_writing_weights) and Neuronpedia ids
    rel = "gpt2-small-res-jb/blocks.0.hook_resid_pre"
    hf_cache(cache, *entry(*rel.split("/", 1)), files("saelens_standard", "cfg.json", "sae_weights.safetensors"))
    sources.append((rel, str(FIXTURES / "saelens_standard" / "io.safetensors"), 1.0))
    # normalize_activations expected_average_only_in + the release's norm_scaling_factor: SAELens folds the
    # factor f, so the model takes raw activations x / f... and gives the library's x_hat / f
    norm = "gemma-2b-res-jb/blocks.12.hook_resid_post"
    f = releases.resolve(norm)[1]["norm_scaling_factor"]
    hf_cache(cache, *entry(*norm.split("/", 1)),
             files("saelens_standard_nobdec_norm", "cfg.json", "sae_weights.safetensors"))
    sources.append((norm, str(FIXTURES / "saelens_standard_nobdec_norm" / "io.safetensors"), f))
    # Gemma Scope (conversion gemma_2), through a canonical id, with the explicit prefix
    gs = "saelens:gemma-scope-2b-pt-res-canonical/layer_3/width_16k/canonical"
    hf_cache(cache, *entry("gemma-scope-2b-pt-res-canonical", "layer_3/width_16k/canonical"),
             files("gemmascope_npz", "params.npz"))
    sources.append((gs, str(FIXTURES / "gemmascope_npz" / "io.safetensors"), 1.0))
    # dictionary_learning (conversion dictionary_learning_1)
    dl_name = trainer("GatedAutoEncoder")
    dl = "gpt-oss-20b-andyrdt/resid_post_layer_11_trainer_0"
    hf_cache(cache, *entry(*dl.split("/", 1)), files(dl_name, "ae.pt", "config.json"))
    sources.append((dl, str(FIXTURES / dl_name / "io.safetensors"), 1.0))
    # what cannot be had: not in the cache, an unknown id, an unsupported conversion, a per-token norm
    missing = "gpt2-small-res-jb/blocks.5.hook_resid_pre"  # its repo is cached, this folder is not
    uncached = "gpt2-small-resid-post-v5-32k/" + next(iter(releases.releases()["gpt2-small-resid-post-v5-32k"]["saes"]))
    bad_id = "gpt2-small-res-jb/blocks.8.hook_resid_prex"
    llama = next(f"{r}/{next(iter(e['saes']))}" for r, e in releases.releases().items() if e["conversion"] == "llama_scope")
    mistral = "mistral-7b-res-wg/" + next(iter(releases.releases()["mistral-7b-res-wg"]["saes"]))
    sources += [(s, sources[0][1], 1.0) for s in (missing, uncached, bad_id, llama, mistral)]
    got = load_offline(cache, sources)
    for source, _, _ in sources[:4]:
        r = got[source]
        assert "error" not in r, r
        assert r["codes"] <= TOL and r["x_hat"] <= TOL, (source, r)
    r = got[rel]["info"]
    assert (r["release"], r["sae_id"], r["neuronpedia_id"]) == ("gpt2-small-res-jb", "blocks.0.hook_resid_pre",
                                                                "gpt2-small/0-res-jb")
    assert r["metadata"]["model_from_pretrained_kwargs"] == {"center_writing_weights": True}
    assert r["repo_id"] == "jbloom/GPT2-Small-SAEs-Reformatted" and r["sae_lens_version"] == releases.table()["sae_lens_version"]
    assert got[norm]["input_scale"] == pytest.approx(f, rel=1e-7) and got[norm]["info"]["normalize_activations"] == "none"
    assert any("norm_scaling_factor" in n for n in got[norm]["info"]["notes"])
    assert got[gs]["info"]["hook_name"] == "blocks.3.hook_resid_post" and got[gs]["info"]["format"] == "gemmascope"
    assert got[dl]["kind"] == "gated" and got[dl]["info"]["neuronpedia_id"] == "gpt-oss-20b/11-resid-post-aa"
    for source, words in ((missing, ["gpt2-small-res-jb/blocks.5.hook_resid_pre (SAELens release) at hf://jbloom/"
                                     "GPT2-Small-SAEs-Reformatted/blocks.5.hook_resid_pre: ", "no SAE files"]),
                          (uncached, ["(SAELens release) at hf://", "not in the local Hugging Face cache"]),
                          (bad_id, ["has no SAE id 'blocks.8.hook_resid_prex'", "did you mean 'blocks.8.hook_resid_pre'"]),
                          (llama, ["'llama_scope'", "saekit does not read"]),
                          (mistral, ["'constant_norm_rescale'", "cannot reproduce"])):
        msg = got[source]["error"]
        assert "\n" not in msg and all(w in msg for w in words), msg


def test_saekit_import_takes_a_release_name(tmp_path):
    rel = "gpt2-small-res-jb/blocks.0.hook_resid_pre"
    cache = hf_cache(tmp_path / "hub", *entry(*rel.split("/", 1)),
                     files("saelens_standard", "cfg.json", "sae_weights.safetensors"))
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "saekit.cli", "import", rel, str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    info = json.loads((tmp_path / "run" / "import.json").read_text())
    assert info["source"] == rel and info["release"] == "gpt2-small-res-jb" and info["format"] == "saelens"
    weights = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert weights["W_enc"].shape == (13, 40)


def test_release_syntax(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert releases.is_release_source("gpt2-small-res-jb/blocks.0.hook_resid_pre")
    assert releases.is_release_source("saelens:anything/x")
    assert not releases.is_release_source("my-own-dir/sae")  # not a release: a (missing) local path
    assert not releases.is_release_source("hf://gpt2-small-res-jb/x")
    local = tmp_path / "gpt2-small-res-jb" / "blocks.0.hook_resid_pre"
    local.mkdir(parents=True)  # a local directory of that name wins over the release
    assert not releases.is_release_source("gpt2-small-res-jb/blocks.0.hook_resid_pre")
    refused("saelens:gpt2-smal-res-jb/blocks.0.hook_resid_pre", "not a SAELens release",
            "did you mean 'gpt2-small-res-jb'")
    refused("saelens:gpt2-small-res-jb", "has no SAE id ''", "its ids:")
    refused("my-own-dir/sae", "no such directory", "hf://my-own-dir/sae", "RELEASE/SAE_ID")
