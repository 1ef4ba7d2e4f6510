"""``python -m saekit.training CONFIG.yaml [--key value ...]``; under torchrun too (see distributed.py).
A sweep file (a top-level ``models:`` list) trains its runs from one pass, as ``saekit train`` does.

A user error (a bad config value, a missing store, ...) prints one line per rank and exits with status 2.
"""
import os
import sys

from saekit.errors import UserError
from saekit.schema import parse_override_args
from saekit.training.trainer import train_file


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path, overrides = (None, argv) if not argv or argv[0].startswith("-") else (argv[0], argv[1:])
    try:
        for run_dir in train_file(path, parse_override_args(overrides)):
            if os.environ.get("RANK", "0") == "0":  # one line per run, not per rank
                print(f"run: {run_dir}")
    except UserError as err:
        print(f"saekit train: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
