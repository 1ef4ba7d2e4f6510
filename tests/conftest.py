import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels compile for GPUs only; its interpreter runs the same kernel code on CPU tensors,
    # so the tests check them here too. Read when triton is first imported, hence set this early.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(scope="session")
def minilm_run(tmp_path_factory):
    """A small real pipeline on the built-in model: a 6k-token store and a TopK SAE trained on it."""
    from saekit.autoencoders import TopKConfig
    from saekit.config import DataConfig, HarvestConfig, TrainConfig
    from saekit.harvest import harvest
    from saekit.training import train

    root = tmp_path_factory.mktemp("minilm_run")
    store = harvest(HarvestConfig(out=str(root / "store"), max_tokens=6000, batch_sequences=8, shard_sequences=16,
                                  context_size=64, progress=False))
    run = train(TrainConfig(out=str(root / "topk"), total_tokens=20000, progress=False, lr=2e-3,
                            data=DataConfig(store=str(store), batch_tokens=256, heldout_tokens=1000),
                            model=TopKConfig(n_latents=256, k=8)))
    return run


@pytest.fixture
def one_thread():
    """For tests of tiny tensors: one intra-op thread is as fast, and far faster on shared cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
