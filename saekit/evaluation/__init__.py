"""Evaluation: `saekit evaluate` (evaluate.py) over the one metric definitions (saekit/metrics.py),
downstream metrics by splicing into the LM (downstream.py), linear probes (probe.py) and RBM sampling
checks (sampling.py). Reads a trained model and its store; imports no other stage (the comparison
across families, which trains, is orchestration: saekit/compare.py).
"""
from saekit.evaluation.downstream import (ce_loss_recovered, downstream_metrics, embedding_recovered,
                                         fraction_recovered)
from saekit.evaluation.evaluate import evaluate_model, evaluate_run, reconstruction_metrics

__all__ = [
    "ce_loss_recovered",
    "downstream_metrics",
    "embedding_recovered",
    "evaluate_model",
    "evaluate_run",
    "fraction_recovered",
    "reconstruction_metrics",
]
