"""How every saekit config is declared, read and checked: dataclass sections loaded from YAML dicts and
``--key value`` overrides, each value checked once, when it is read.

A config class is a dataclass deriving from ``Section``. Its annotations are the schema:

* ``Literal["a", "b"]`` fields accept only those strings; anything else is an error that names the
  nearest valid choice;
* ``value(default, ge=.., gt=.., le=.., lt=..)`` declares a range (checked for each element of a list);
* ``validate()`` holds the checks that involve several fields (e.g. ``k <= n_latents``);
* nested sections are dataclasses too; a section class may pick its concrete subclass from the data
  (``section_class``: the ``model:`` section picks its family's config by ``kind``).

The checks run in ``__post_init__``, so a config built in Python is checked exactly like one read from a
file. Unknown keys are errors that name the nearest valid key, a renamed key names its new name, and a
section may say which other classes a foreign key belongs to (``foreign_key_hint``).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from saekit.errors import ConfigError

__all__ = ["ConfigError", "FieldError", "Section", "value", "nearest", "check_choice", "from_dict", "to_dict",
           "flatten", "config_diff", "apply_overrides", "parse_override_args", "read_yaml"]


class FieldError(ConfigError):
    """A bad value of one field; ``key`` is its dotted name, prefixed as the error travels outwards."""

    def __init__(self, key: str, detail: str):
        super().__init__(f"config key '{key}' {detail}")
        self.key, self.detail = key, detail


# ----------------------------------------------------------------------------------------- hints
def nearest(word: str, choices) -> str | None:
    """The closest of ``choices`` to ``word`` (the one "did you mean" of saekit), or None."""
    near = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.0)
    return near[0] if near else None


def _choices_text(word: str, choices) -> str:
    near = nearest(word, choices)
    hint = f"; did you mean '{near}'?" if near is not None and near != str(word) else ""
    return f"{hint} (valid: {', '.join(sorted(str(c) for c in choices))})"


def check_choice(value: str, choices, what: str) -> str:
    """``value`` if it is one of ``choices``, else a ConfigError naming the nearest one. For function
    arguments that do not come through a config section (sections check their Literals themselves)."""
    if value in choices:
        return value
    raise ConfigError(f"unknown {what} {value!r}{_choices_text(value, choices)}")


# -------------------------------------------------------------------------------------- sections
def value(default: Any = dataclasses.MISSING, *, factory=dataclasses.MISSING, ge=None, gt=None, le=None,
          lt=None, check=None):
    """A dataclass field with a declared range, checked on every construction; ``check(value)`` may
    return what is wrong with a value (None: fine)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return dataclasses.field(default=default, default_factory=factory,
                             metadata={"bounds": bounds, "check": check})


_OPS = {"ge": (lambda a, b: a >= b, ">="), "gt": (lambda a, b: a > b, ">"),
        "le": (lambda a, b: a <= b, "<="), "lt": (lambda a, b: a < b, "<")}


@functools.lru_cache(maxsize=None)
def field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _literal_choices(tp) -> tuple | None:
    """The allowed strings of ``Literal[...]`` or ``Literal[...] | None``, else None."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if typing.get_origin(arg) is Literal:
                return typing.get_args(arg)
    return None


class Section:
    """Base of every config dataclass: checks Literals, ranges and ``validate()`` on construction."""

    # Old key -> new key, so a config written for an earlier saekit gets a precise error.
    RENAMED: ClassVar[dict[str, str]] = {}
    # Old key -> where it lives now, outside this section (said in full, e.g. "the training config's
    # 'kernels.fast_path'").
    MOVED: ClassVar[dict[str, str]] = {}
    # A section tagged with a kind (the model families) writes it as its first key.
    kind: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_field(self, f, field_types(type(self))[f.name])
        self.validate()

    def validate(self) -> None:
        """Checks across fields; raise FieldError(field name, what is wrong and how to fix it)."""

    @classmethod
    def section_class(cls, data: dict, where: str) -> type:
        """The class to build ``data`` with (a subclass picked by the data, e.g. by ``kind``)."""
        return cls

    @classmethod
    def foreign_key_hint(cls, key: str) -> str | None:
        """For a key this section lacks: which other classes have it (None: a plain unknown key)."""
        return None


def _check_field(obj, f: dataclasses.Field, tp) -> None:
    val = getattr(obj, f.name)
    choices = _literal_choices(tp)
    if choices is not None and val is not None and val not in choices:
        raise FieldError(f.name, f"is {val!r}{_choices_text(val, choices)}")
    if val is None or not f.metadata:
        return
    problem = f.metadata["check"](val) if f.metadata.get("check") else None
    if problem:
        raise FieldError(f.name, problem)
    bounds = f.metadata.get("bounds")
    if not bounds:
        return
    for item in (val if isinstance(val, list) else [val]):
        for op, limit in bounds.items():
            test, sign = _OPS[op]
            if not test(item, limit):
                raise FieldError(f.name, f"must be {sign} {limit}, got {val!r}")


# -------------------------------------------------------------------------------------- reading
def _is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(val: Any, tp: Any, name: str) -> Any:
    """Turn YAML/CLI values into the declared type; strings from the command line are parsed as YAML."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if val is None or (isinstance(val, str) and val.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(val, inner[0], name)
    if origin is Literal:
        if isinstance(val, bool):  # YAML 1.1 reads `off` / `on` as booleans
            val = "on" if val else "off"
        return val if isinstance(val, str) else str(val)  # membership is checked by the section
    if isinstance(val, str) and tp is not str:
        val = yaml.safe_load(val)
    if tp is bool:
        if isinstance(val, bool):
            return val
        raise FieldError(name, f"must be true or false, got {val!r}")
    if tp is int:
        if isinstance(val, bool) or not isinstance(val, (int, float)) or int(val) != val:
            raise FieldError(name, f"must be an integer, got {val!r}")
        return int(val)
    if tp is float:
        if isinstance(val, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                val = float(val)
            except ValueError:
                pass
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise FieldError(name, f"must be a number, got {val!r}")
        return float(val)
    if tp is str:
        if isinstance(val, (dict, list)):
            raise FieldError(name, f"must be a string, got {val!r}")
        return str(val)
    if origin is list:
        if isinstance(val, str):
            val = [v.strip() for v in val.split(",") if v.strip()]
        elif not isinstance(val, (list, tuple)):
            val = [val]
        return [_coerce(v, args[0], name) for v in val]
    if origin is dict:
        if not isinstance(val, dict):
            raise FieldError(name, f"must be a mapping, got {val!r}")
        return val
    if _is_section(tp):
        return from_dict(tp, val, where=name + ".")
    return val


def _unknown_key(cls, key: str, where: str) -> ConfigError:
    if key in cls.RENAMED:
        return ConfigError(f"config key '{where}{key}' was renamed to '{where}{cls.RENAMED[key]}'")
    if key in cls.MOVED:
        return ConfigError(f"config key '{where}{key}' moved to {cls.MOVED[key]}")
    foreign = cls.foreign_key_hint(key)
    if foreign:
        return ConfigError(f"config key '{where}{key}' {foreign}")
    valid = list(field_types(cls))
    return ConfigError(f"unknown config key '{where}{key}'{_choices_text(key, valid)}")


def from_dict(cls, data: dict | None, where: str = ""):
    """Build section ``cls`` from a plain dict, rejecting unknown keys and bad values by name."""
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{where.rstrip('.') or '<top>'}' must be a mapping of keys, "
                          f"got {data!r}")
    data = dict(data)
    cls = cls.section_class(data, where)
    types_ = field_types(cls)
    kwargs = {}
    for key, val in data.items():
        if key not in types_:
            raise _unknown_key(cls, key, where)
        kwargs[key] = _coerce(val, types_[key], where + key)
    try:
        return cls(**kwargs)
    except FieldError as err:  # raised by the checks of this section's own fields
        raise FieldError(where + err.key, err.detail) from None


def to_dict(obj) -> Any:
    """Plain dicts and lists of a section (a tagged section's ``kind`` first), for JSON and diffs."""
    if _is_section(type(obj)):
        out = {"kind": obj.kind} if getattr(obj, "kind", None) else {}
        out.update({f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"model": {"k": 32}}`` -> ``{"model.k": 32}``."""
    out = {}
    for key, val in d.items():
        if isinstance(val, dict):
            out.update(flatten(val, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = val
    return out


def config_diff(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every key that differs; a missing key reads '<absent>'."""
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(a.keys() | b.keys())
            if a.get(k, "<absent>") != b.get(k, "<absent>") and k not in ignore]


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys (``model.k``) in a nested dict."""
    data = json.loads(json.dumps(data))
    for dotted, val in overrides.items():
        node = data
        parts = dotted.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{dotted}': '{part}' is not a section")
        node[parts[-1]] = val
    return data


def parse_override_args(args: list[str]) -> dict[str, str]:
    """``['--model.k', '64', '--hooks=a,b']`` -> ``{'model.k': '64', 'hooks': 'a,b'}``."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, val = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value")
            i += 1
            val = args[i]
        out[key.replace("-", "_")] = val
        i += 1
    return out


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML config file; a missing, undecodable or non-mapping file is a ConfigError."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a YAML config file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file (byte {err.start} is not UTF-8)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data
