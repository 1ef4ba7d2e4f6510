"""Evaluation: one definition per metric (metrics.py), downstream metrics by splicing into the LM
(downstream.py), `saekit evaluate` (evaluate.py), `saekit compare` (compare.py), and the applications:
anomaly scores (anomaly.py), linear probes (probe.py) and RBM sampling checks (sampling.py).

Nothing here imports the CLI.
"""
from saekit.evaluation.anomaly import token_scores, worst_contexts
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
    "token_scores",
    "worst_contexts",
]
