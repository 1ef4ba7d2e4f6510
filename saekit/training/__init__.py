"""One trainer for every autoencoder family: ``train(cfg, data=None) -> run_dir``.

Modules: trainer (the loop, run-dir layout), schedule (lr and sparsity warm-up/decay), data_stats
(input scale, decoder-bias init), dead_latents, batches (resumable data stream), checkpoint
(safetensors + JSON), tracking (console, W&B, loss plot), distributed (torchrun).
"""
from saekit.training.schedule import default_lr  # noqa: F401
from saekit.training.trainer import NonFiniteLossError, Trainer, train  # noqa: F401
