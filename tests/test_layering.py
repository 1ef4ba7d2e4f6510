"""The house plan's one-way dependencies, read off every import in the package (function-level imports
included): building blocks never import stages, no stage imports another, nothing imports the CLI."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "saekit"
STAGES = {"harvest", "training", "evaluation", "analysis"}
ORCHESTRATION = {"cli", "demo", "compare"}
# What each building block may import of saekit (besides itself).
ALLOWED = {
    "autoencoders": {"schema", "errors", "files", "metrics"},
    "lm": {"config", "schema", "errors"},
    "data": {"schema", "errors", "files"},
    "metrics": set(), "files": {"errors"}, "errors": set(), "schema": {"errors"},
    "config": {"autoencoders", "schema", "errors"},
    "interop": {"autoencoders", "schema", "errors", "files", "config", "data"},
    "intervene": {"lm", "autoencoders", "errors", "schema", "files", "metrics", "config"},
}


# The one upward import, late (inside a function): Autoencoder.load hands a directory another library wrote
# to saekit.interop.load_foreign, so that loading "an SAE" works whatever wrote it.
EXCEPTIONS = {("autoencoders/base.py", "interop")}


def saekit_imports(path: Path) -> set[str]:
    """The top-level saekit modules/packages that ``path`` imports (``saekit.data.store`` -> ``data``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside its own package
                continue
            mods = [node.module or ""]
            if node.module == "saekit":
                mods = [f"saekit.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        else:
            continue
        names |= {m.split(".")[1] for m in mods if m.startswith("saekit.")}
    return names


def unit_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_dependencies_point_one_way():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = unit_of(path)
        if unit == "__init__":
            continue
        imported = saekit_imports(path) - {unit, "__init__"}
        if unit in ALLOWED:
            bad = imported - ALLOWED[unit]
        elif unit in STAGES:
            bad = imported & (STAGES | ORCHESTRATION)
        else:  # orchestration: demo and compare call the stages; only the CLI may import them
            bad = imported & ({"cli"} if unit != "cli" else set())
            if unit != "cli":
                bad |= imported & {"demo", "compare"} - {unit}
        bad -= {name for file, name in EXCEPTIONS if path == PACKAGE / file}
        problems += [f"{path.relative_to(PACKAGE.parent)} imports saekit.{name}" for name in sorted(bad)]
    assert not problems, "\n".join(problems)


def test_the_checker_sees_function_level_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from saekit.training import train\n    import saekit.cli\n")
    assert saekit_imports(probe) == {"training", "cli"}
