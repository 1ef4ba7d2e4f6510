"""`saekit compare` end to end on a tiny random GPT-2: harvest, train four cheap kinds, evaluate, report."""
import csv
import json

import pytest
import yaml

from saekit.cli import main as cli_main
from saekit.config import ConfigError
from saekit.compare import CompareConfig, compare, pareto_front, plan
from support import HOOK, save_tiny, write_corpus


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    model_dir = save_tiny("gpt2", root / "gpt2")
    cfg = {
        "out": str(root / "out"),
        "store": str(root / "store"),  # missing: compare harvests it
        "harvest": {"model": str(model_dir), "dataset": str(write_corpus(root / "corpus.txt")),
                    "hooks": [HOOK], "context_size": 32, "max_tokens": 2500, "batch_sequences": 8,
                    "shard_sequences": 32, "device": "cpu", "progress": False},
        "train": {"total_tokens": 1024, "device": "cpu", "log_every_steps": 2,
                  "data": {"hook": HOOK, "batch_tokens": 256, "buffer_tokens": 1024, "heldout_tokens": 800},
                  "model": {"n_latents": 64}},
        "eval": {"downstream_sequences": 4, "probe": True, "probe_tokens": 600, "rbm_samples": 200,
                 "gibbs_steps": 20, "device": "cpu"},
        "models": [
            {"name": "topk", "model": {"kind": "topk"}, "sweep": {"model.k": [4, 8]}},
            {"model": {"kind": "pca", "n_latents": 8}},
            {"name": "relu", "model": {"kind": "relu", "l1_coefficient": 1.0}},
            {"model": {"kind": "rbm", "n_latents": 32}},
        ],
    }
    path = root / "compare.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


def test_compare_end_to_end(config, capsys):
    path, cfg = config
    assert cli_main(["compare", str(path)]) == 0
    out = capsys.readouterr().out
    report = out.strip().splitlines()[-1].removeprefix("report: ")
    assert report.endswith("compare.md")
    root = path.parent / "out"
    for name in ("compare.md", "compare.csv", "compare.json", "pareto_fvu_l0.png",
                 "pareto_downstream_l0.png"):
        assert (root / name).stat().st_size > 0, name
    with open(root / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["topk-k4", "topk-k8", "pca", "relu", "rbm"]
    by = {r["method"]: r for r in rows}
    assert float(by["topk-k4"]["l0"]) <= 4 and float(by["topk-k8"]["l0"]) <= 8
    assert float(by["pca"]["l0"]) == pytest.approx(8, abs=0.01) and by["pca"]["code_size"] == "8"
    for r in rows:
        assert 0 <= float(r["fvu"]) and 0 <= float(r["probe_accuracy"]) <= 1
        assert r["downstream_name"] == "ce_loss_recovered" and r["loss_increase"] != ""
        assert float(r["train_tokens_per_s"]) > 0 and 0 <= float(r["dead_pct"]) <= 100
    assert by["rbm"]["rbm_cov_error"] != "" and by["topk-k4"]["rbm_cov_error"] == ""
    md = (root / "compare.md").read_text()
    assert "| method |" in md and "topk-k8" in md and "Δ loss (nats)" in md and "pareto_fvu_l0.png" in md
    assert "raw activations" in md
    full = json.loads((root / "compare.json").read_text())
    assert len(full) == 5 and all("run" in r for r in full)

    # A rerun reuses every trained model and every evaluation.
    stamps = {p: p.stat().st_mtime_ns for p in root.glob("runs/*/eval.json")}
    assert len(stamps) == 5
    assert compare(path, {}) == root / "compare.md"
    assert stamps == {p: p.stat().st_mtime_ns for p in root.glob("runs/*/eval.json")}


def test_plan_sweeps_and_errors(config):
    _, cfg = config
    from saekit.config import from_dict

    runs = plan(from_dict(CompareConfig, cfg))
    assert [n for n, _ in runs] == ["topk-k4", "topk-k8", "pca", "relu", "rbm"]
    assert [t.model.k for _, t in runs[:2]] == [4, 8]
    assert runs[2][1].model.n_latents == 8 and runs[3][1].model.n_latents == 64  # entry over base
    assert all(t.data.store == cfg["store"] and t.data.heldout_tokens == 800 for _, t in runs)
    bad = dict(cfg, models=[{"model": {"kind": "topk", "kk": 3}}])
    with pytest.raises(ConfigError, match="did you mean 'k'"):
        plan(from_dict(CompareConfig, bad))
    twice = dict(cfg, models=[{"model": {"kind": "pca"}}, {"model": {"kind": "pca"}}])
    with pytest.raises(ConfigError, match="unique"):
        plan(from_dict(CompareConfig, twice))
    with pytest.raises(ConfigError, match="did you mean 'models'"):
        from_dict(CompareConfig, {"model": []})
    # The shared train section is checked per entry, as that entry's kind.
    shared_k = dict(cfg, train={**cfg["train"], "model": {"n_latents": 64, "k": 4}})
    with pytest.raises(ConfigError, match=r"models\[1\] \(pca\).*'model.k' does not apply to kind 'pca'"):
        plan(from_dict(CompareConfig, shared_k))


def test_pareto_front():
    pts = [(1, 0.9), (2, 0.5), (4, 0.6), (8, 0.2), (3, 0.5)]
    assert pareto_front(pts) == [0, 1, 3]
    assert pareto_front([(1, 0.1), (2, 0.5), (3, 0.4)], higher_is_better=True) == [0, 1]
