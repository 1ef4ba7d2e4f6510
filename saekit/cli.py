"""`saekit harvest | train | evaluate | analyze | compare | import | export | demo`: thin calls into the library.

Every stage takes an optional YAML file plus ``--key value`` overrides that use the same names as the
file (dotted for nested sections: ``--model.k 64``). An error the user can fix (``saekit.errors
.UserError``: a bad config value, a missing or damaged store, an unknown hook, a missing model, a run
directory holding another run) is one line on stderr and exit status 2; ``--debug`` shows its
traceback. Anything else is a bug in saekit and keeps its traceback. Nothing in the library imports
this module.
"""
from __future__ import annotations

import argparse
import json
import sys

from saekit.errors import UserError


def _stage_config(cls_name: str, path, extra, **fixed):
    from saekit import config
    from saekit.schema import parse_override_args

    return config.load_config(getattr(config, cls_name), path, {**fixed, **parse_override_args(extra)})


def cmd_harvest(path, extra):
    from saekit.harvest import harvest

    print(f"store: {harvest(_stage_config('HarvestConfig', path, extra))}")


def cmd_train(path, extra):
    from saekit.schema import parse_override_args
    from saekit.training.trainer import train_file

    # A file with a `models:` list is a sweep: every run trains from one pass over the data.
    for run_dir in train_file(path, parse_override_args(extra)):
        print(f"run: {run_dir}")


def cmd_evaluate(run, extra):
    from saekit.evaluation import evaluate_run

    print(json.dumps(evaluate_run(_stage_config("EvalConfig", None, extra, run=run)), indent=2))


def cmd_analyze(run, extra):
    from saekit.analysis import analyze_run

    print(f"dashboard: {analyze_run(_stage_config('AnalyzeConfig', None, extra, run=run))}")


def cmd_compare(path, extra):
    from saekit.compare import compare
    from saekit.schema import parse_override_args

    print(f"report: {compare(path, parse_override_args(extra))}")


def cmd_import(targets, extra):
    from saekit.interop.runs import import_run
    from saekit.schema import parse_override_args

    options = parse_override_args(extra)
    unknown = set(options) - {"store", "hook"}
    if unknown:
        raise UserError(f"saekit import takes --store STORE and --hook HOOK, not --{sorted(unknown)[0]}")
    source, run_dir = targets
    print(f"run: {import_run(source, run_dir, options.get('store'), options.get('hook'))}")


def cmd_export(targets, extra):
    from saekit.interop.runs import DENSITY_TOKENS, export_run
    from saekit.schema import parse_override_args

    options = parse_override_args(extra)
    unknown = set(options) - {"format", "density_tokens"}
    if unknown:
        raise UserError("saekit export takes --format saelens|sparsify and --density-tokens N, not "
                        f"--{sorted(unknown)[0].replace('_', '-')}")
    run_dir, out = targets
    tokens = options.get("density_tokens", str(DENSITY_TOKENS))
    if not tokens.isdigit():
        raise UserError(f"--density-tokens {tokens}: expected a whole number of rows (0 writes no density)")
    info = export_run(run_dir, out, options.get("format", "saelens"), int(tokens))
    for note in info["notes"]:
        print(f"note: {note}")
    print(f"exported: {info['path']} ({info['format']} {info['architecture']}; {', '.join(info['files'])})")


def cmd_demo(path, extra):
    from saekit.demo import run_demo
    from saekit.schema import parse_override_args

    run_demo(path, parse_override_args(extra))


COMMANDS = {
    "harvest": (cmd_harvest, "CONFIG", "capture activations into an on-disk store"),
    "train": (cmd_train, "CONFIG", "train an autoencoder on a store (a `models:` list: many in one pass)"),
    "evaluate": (cmd_evaluate, "RUN_DIR", "metrics for a trained run, written beside the model (--suite core,absorption,probing,interp)"),
    "analyze": (cmd_analyze, "RUN_DIR", "top-activating contexts and an HTML dashboard"),
    "compare": (cmd_compare, "CONFIG", "train and evaluate several families on one store"),
    "import": (cmd_import, "SOURCE RUN_DIR", "a SAELens, sparsify, Gemma Scope or dictionary_learning SAE (a directory or hf://ORG/REPO/PATH) as a run directory (--store, --hook)"),
    "export": (cmd_export, "RUN_DIR OUT", "a run's SAE for SAELens or sparsify (--format saelens|sparsify, --density-tokens N)"),
    "demo": (cmd_demo, "CONFIG", "harvest, train, evaluate and analyze on the built-in model"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saekit", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, arg, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text,
                           description=f"{help_text}. Extra --key value pairs override the config.")
        for i, metavar in enumerate(arg.split()):
            p.add_argument(f"target{i}", metavar=metavar, nargs="?" if metavar == "CONFIG" else None)
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] not in COMMANDS or any(a in ("-h", "--help") for a in argv[1:2]):
        parser.parse_args(argv)  # prints usage/help and exits
    # Parsed by hand so "--key value" overrides never get mistaken for the positional argument.
    command, rest = argv[0], argv[1:]
    names = COMMANDS[command][1].split()
    targets = []
    while rest and not rest[0].startswith("--") and len(targets) < len(names):
        targets.append(rest.pop(0))
    if len(targets) < len(names) and names != ["CONFIG"]:
        parser.error(f"saekit {command} needs {' '.join(names)}")
    target = targets if len(names) > 1 else (targets[0] if targets else None)
    try:
        COMMANDS[command][0](target, rest)
    except UserError as err:
        if debug:
            raise
        print(f"saekit {command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"saekit {command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
