"""`saekit import`: a SAELens SAE saved by the real library becomes a run directory that `saekit evaluate`
scores like one trained here (on a synthetic store of the SAE's width)."""
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from saekit.autoencoders import Autoencoder
from saekit.data.store import StoreReader, StoreWriter
from saekit.interop import load_foreign
from saekit.metrics import Metrics

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "interop" / "saelens_topk"
HOOK = "blocks.3.hook_resid_pre"  # as the fixture's cfg.json names it


def saekit(*args):
    return subprocess.run([sys.executable, "-m", "saekit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def synthetic_store(path: Path, d: int, hook: str = HOOK) -> Path:
    g = torch.Generator().manual_seed(0)
    meta = {"model": "synthetic", "context_size": 16, "tokenizer": {"name": "synthetic", "special_ids": []}}
    with StoreWriter(path, meta, {"synthetic": True}, [hook], d, shard_sequences=8) as w:
        for _ in range(4):
            tokens = torch.randint(5, 500, (8, 16), generator=g)
            w.add(tokens, torch.ones(8, 16, dtype=torch.bool), {hook: torch.randn(8, 16, d, generator=g) * 2})
        w.finish()
    return path


def test_import_then_evaluate(tmp_path):
    store = synthetic_store(tmp_path / "store", d=13)
    run = tmp_path / "run"
    p = saekit("import", FIXTURE, run, "--store", store)
    assert p.returncode == 0, p.stderr[-3000:]
    info = json.loads((run / "import.json").read_text())
    assert info["format"] == "saelens" and info["hook_name"] == HOOK and info["model_name"] == "gpt2"
    model = Autoencoder.load(run / "model").eval()
    source, _ = load_foreign(FIXTURE)
    x = StoreReader(store).activations(HOOK, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model(x).x_hat, source(x).x_hat)
    p = saekit("evaluate", run, "--downstream", "false", "--device", "cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((run / "eval.json").read_text())["reconstruction"]
    want = Metrics(model.n_latents)
    with torch.no_grad():
        want.update(x, model(x))  # the store has fewer rows than the default held-out window: all of it
    assert result["l0"] <= 5 and abs(result["fvu"] - want.compute()["fvu"]) < 1e-9


def test_import_errors_are_one_line(tmp_path):
    store = synthetic_store(tmp_path / "store", d=9)
    p = saekit("import", FIXTURE, tmp_path / "run", "--store", store)
    assert p.returncode == 2 and "activations of width 9, but the SAE" in p.stderr and "Traceback" not in p.stderr
    p = saekit("import", tmp_path / "nothing", tmp_path / "run")
    assert p.returncode == 2 and "no such directory" in p.stderr
    assert saekit("import", FIXTURE, tmp_path / "run2").returncode == 0
    p = saekit("import", FIXTURE, tmp_path / "run2")
    assert p.returncode == 2 and "already holds a run" in p.stderr


def test_export_import_round_trip_and_analyze_on_the_builtin_store(minilm_run, tmp_path):
    """A MiniLM run exported to SAELens format (what SAELens reads; checked against the real library by
    scripts/check_interop_exports.py), imported back over the built-in store, analyzed like any run."""
    out = tmp_path / "saelens"
    p = saekit("export", minilm_run, out, "--format", "saelens", "--density-tokens", 3000)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "sparsity.safetensors" in p.stdout
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 8 and cfg["d_in"] == 384
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["metadata"]["model_name"] == "all-MiniLM-L6-v2" and cfg["metadata"]["prepend_bos"] is False
    store = Path(minilm_run).parent / "store"
    run = tmp_path / "imported"
    p = saekit("import", out, run, "--store", store)
    assert p.returncode == 0, p.stderr[-3000:]
    original, imported = Autoencoder.load(Path(minilm_run) / "model").eval(), Autoencoder.load(run / "model").eval()
    x = StoreReader(store).activations("blocks.3.hook_resid_post", rows=(0, 500), dtype=torch.float32)
    with torch.no_grad():
        a, b = original(x), imported(x)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(b.x_hat, a.x_hat, rtol=1e-5, atol=1e-5)
    # sparsity.safetensors: log10(density + 1e-10) over the first 3000 training rows, counted densely here
    heldout = json.loads((Path(minilm_run) / "config.json").read_text())["data"]["heldout_tokens"]
    assert StoreReader(store).n_rows - heldout >= 3000
    x = StoreReader(store).activations("blocks.3.hook_resid_post", rows=(0, 3000), dtype=torch.float32)
    with torch.no_grad():
        density = (original.encode(x) != 0).double().mean(0)
    sparsity = load_file(str(out / "sparsity.safetensors"))["sparsity"]
    torch.testing.assert_close(sparsity, torch.log10(density + 1e-10).float(), rtol=0, atol=1e-6)
    assert (density > 0).any() and (density < 1).all()
    p = saekit("analyze", run, "--max_features", 5, "--max_tokens", 2000, "--progress", "false", "--device", "cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run / "dashboard" / "index.html").read_text().count('class="card"') == 5
    p = saekit("export", minilm_run, tmp_path / "x", "--format", "onnx")
    assert p.returncode == 2 and "unknown export format 'onnx'" in p.stderr
    p = saekit("export", minilm_run, tmp_path / "x", "--density-tokens", "many")
    assert p.returncode == 2 and "--density-tokens many: expected a whole number" in p.stderr
    p = saekit("export", minilm_run, tmp_path / "y", "--format", "sparsify")
    assert p.returncode == 0 and not (tmp_path / "y" / "sparsity.safetensors").exists()
