"""``python -m saekit.training CONFIG.yaml [--key value ...]``; under torchrun too (see distributed.py).

A user error (a bad config value, a missing store, ...) prints one line per rank and exits with status 2.
"""
import sys

from saekit.config import TrainConfig, load_config
from saekit.errors import UserError
from saekit.schema import parse_override_args
from saekit.training.trainer import train


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path, overrides = (None, argv) if not argv or argv[0].startswith("-") else (argv[0], argv[1:])
    try:
        train(load_config(TrainConfig, path, parse_override_args(overrides)))
    except UserError as err:
        print(f"saekit train: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
