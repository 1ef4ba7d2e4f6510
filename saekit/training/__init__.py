"""One trainer for every autoencoder family: ``train(cfg, data=None) -> run_dir``.

Modules: trainer (the loop, run-dir layout), optimizer (Adam, its parameter groups), schedule (lr and sparsity warm-up/decay), data_stats
(input scale, decoder-bias init), dead_latents, batches (resumable data stream), checkpoint
(safetensors + JSON), tracking (console, W&B, loss plot), distributed (torchrun collectives), and
``python -m saekit.training`` (__main__, what torchrun launches). Metrics come from saekit.metrics;
nothing here imports another stage.
"""
from saekit.training.schedule import default_lr  # noqa: F401
from saekit.training.trainer import NonFiniteLossError, Trainer, train  # noqa: F401
