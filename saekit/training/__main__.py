"""``python -m saekit.training CONFIG.yaml [--key value ...]``; under torchrun too (see distributed.py)."""
from saekit.training.distributed import main

main()
