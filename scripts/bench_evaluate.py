"""The evaluation suite (core, absorption, probing, interp) on a trained run, against one encoder pass.

    python scripts/bench_evaluate.py --run runs/topk          # a 6144-latent SAE on the built-in store
    python scripts/bench_evaluate.py --run runs/topk --suite absorption,probing

Prints the seconds of each evaluation and its ratio to one pass of the encoder over the same held-out
tokens (read from the store, timed in the same run), then the total and a last line
`ratio X (goal <= G)`: G is the issue's budget, the whole suite in 3 minutes, in encoder passes of this
machine. Results go to a temporary directory, not into the run.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saekit.config import EvalConfig, load_config  # noqa: E402
from saekit.data.store import StoreReader, split_rows  # noqa: E402
from saekit.evaluation import evaluate_run  # noqa: E402
from saekit.evaluation.evaluate import DEFAULT_HELDOUT, load_run  # noqa: E402

BUDGET_S = 180.0


def encoder_pass_s(model, reader, hook: str, rows: tuple[int, int], batch: int) -> float:
    """Seconds to read and encode ``rows`` once (best of two)."""
    best = float("inf")
    with torch.inference_mode():
        for _ in range(2):
            t = time.perf_counter()
            for a in range(*rows, batch):
                model.encode(reader.activations(hook, (a, min(rows[1], a + batch)), dtype=torch.float32))
            best = min(best, time.perf_counter() - t)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/topk", help="a trained run directory (saekit train / saekit demo)")
    p.add_argument("--suite", default="core,absorption,probing,interp")
    p.add_argument("--device", default="cpu")
    a, extra = p.parse_known_args()
    run = Path(a.run)
    if not (run / "model" / "config.json").exists():
        sys.exit(f"{run}: no trained run; train one first (saekit train configs/train_topk.yaml, or saekit demo)")
    model, train_cfg, _ = load_run(run, a.device)
    data = (train_cfg or {}).get("data", {})
    reader = StoreReader(data["store"])
    overrides = dict(zip([k.lstrip("-").replace("-", "_") for k in extra[::2]], extra[1::2]))
    tmp = Path(tempfile.mkdtemp(prefix="bench_evaluate_"))
    try:
        cfg = load_config(EvalConfig, None, {"run": str(run), "out": str(tmp / "eval.json"), "suite": a.suite,
                                             "device": a.device, "progress": "false", **overrides})
        heldout = cfg.heldout_tokens or int(data.get("heldout_tokens") or 0) or DEFAULT_HELDOUT
        _, rows = split_rows(reader.n_rows, heldout)
        enc = encoder_pass_s(model, reader, data["hook"], rows, cfg.batch_tokens)
        t = time.perf_counter()
        result = evaluate_run(cfg)
        total = time.perf_counter() - t
        timings = result["timings_s"]
        print(json.dumps({"run": str(run), "kind": model.kind, "n_latents": model.n_latents,
                          "heldout_tokens": rows[1] - rows[0], "encoder_pass_s": round(enc, 3)}))
        for name, seconds in timings.items():
            print(f"{name:<11} {seconds:7.1f} s   {seconds / enc:7.1f} encoder passes")
        print(f"{'total':<11} {total:7.1f} s   {total / enc:7.1f} encoder passes (goal: under {BUDGET_S:.0f} s)")
        headline = {"absorption": (result.get("absorption") or {}).get("mean_absorption_fraction"),
                    "probe_k1": (result.get("probing") or {}).get("sae_top_1_test_accuracy"),
                    "detection": (result.get("interp") or {}).get("autointerp_score")}
        print(json.dumps(headline))
        print(f"ratio {total / enc:.1f} (goal <= {BUDGET_S / enc:.0f})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
