"""`saekit demo`: harvest -> train -> evaluate -> analyze on the built-in model and corpus.

Each stage is the same library call the separate CLI commands make, so a demo killed at any point and
run again resumes where it stopped (finished stages are skipped by their own resume logic).
"""
from __future__ import annotations

import time
from pathlib import Path

from saekit.autoencoders import TopKConfig
from saekit.config import AnalyzeConfig, DataConfig, DemoConfig, EvalConfig, HarvestConfig, TrainConfig, load_config


def demo_configs(cfg: DemoConfig) -> tuple[HarvestConfig, TrainConfig, EvalConfig, AnalyzeConfig]:
    out = Path(cfg.out)
    harvest_cfg = HarvestConfig(out=str(out / "store"), model=cfg.model, hooks=[cfg.hook],
                                max_tokens=cfg.harvest_tokens, device=cfg.device)
    train_cfg = TrainConfig(out=str(out / "topk"), device=cfg.device, total_tokens=cfg.train_tokens,
                            data=DataConfig(store=harvest_cfg.out, hook=cfg.hook, batch_tokens=cfg.batch_tokens,
                                            heldout_tokens=cfg.heldout_tokens),
                            model=TopKConfig(n_latents=cfg.n_latents, k=cfg.k))
    eval_cfg = EvalConfig(run=train_cfg.out, heldout_tokens=cfg.heldout_tokens, device=cfg.device)
    analyze_cfg = AnalyzeConfig(run=train_cfg.out, max_features=cfg.features, device=cfg.device)
    return harvest_cfg, train_cfg, eval_cfg, analyze_cfg


def run_demo(path: str | None = None, overrides: dict | None = None) -> dict:
    from saekit.analysis import analyze_run
    from saekit.evaluation import evaluate_run
    from saekit.harvest import harvest
    from saekit.training import train

    cfg = load_config(DemoConfig, path, overrides)
    harvest_cfg, train_cfg, eval_cfg, analyze_cfg = demo_configs(cfg)
    start = time.time()
    print(f"[1/4] harvest {cfg.model} {cfg.hook} -> {harvest_cfg.out}", flush=True)
    harvest(harvest_cfg)
    print(f"[2/4] train TopK SAE ({cfg.n_latents} latents, k={cfg.k}) -> {train_cfg.out}", flush=True)
    train(train_cfg)
    print(f"[3/4] evaluate on the last {cfg.heldout_tokens:,} (held-out) tokens", flush=True)
    metrics = evaluate_run(eval_cfg)
    print(f"[4/4] analyze {cfg.features} features", flush=True)
    dashboard = analyze_run(analyze_cfg)
    headline = _headline(metrics)
    print("\n".join(f"  {k:>28}: {v}" for k, v in headline.items()))
    print(f"done in {time.time() - start:.0f} s. Open the dashboard: {Path(dashboard).resolve()}")
    return {"metrics": metrics, "dashboard": str(dashboard)}


HEADLINE = ("fvu", "l0", "dead_fraction", "cosine",  # reconstruction, on held-out tokens
            "cosine_spliced", "embedding_recovered",  # encoders: the spliced sentence embedding
            "loss_increase", "ce_loss_recovered", "kl_clean_spliced")  # causal LMs


def _headline(metrics: dict) -> dict:
    """The few numbers a newcomer should see, from the evaluate stage's JSON."""
    both = {**metrics.get("reconstruction", {}), **(metrics.get("downstream") or {})}
    return {name: f"{both[name]:.4g}" for name in HEADLINE if isinstance(both.get(name), float)}
