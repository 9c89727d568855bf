"""``docs/configuration.md``, rendered from the config schema (``medidiff.config``).

Generated, so it cannot drift from the code: every key of every section, with its type, default,
valid values (ranges of ``Field(ge=, le=, gt=, lt=)``, the names of ``medidiff.names``) and its
``Field(description=...)``::

    python -m medidiff.config_docs            # rewrite docs/configuration.md
    python -m medidiff.config_docs --check    # exit 1 if it is out of date

``tests/test_docs.py`` compares the committed file with :func:`render`.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from medidiff.config import Config

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
COMMAND = "python -m medidiff.config_docs"

HEADER = f"""\
# Configuration reference

<!-- Generated from medidiff/config.py by `{COMMAND}`: do not edit by hand. -->

A config is YAML, validated on load: an unknown key or a wrong type is an error that names the
key. Any value can be overridden on the command line with `--set key=value` (the value is parsed
as YAML). The resolved config is written to `MODEL_DIR/config.yaml`, stored in `model.yaml`, and
logged to MLflow. Presets live in `configs/<task>/<preset>.yaml`: `cpu-tiny` (tests, seconds),
`cpu-small` (the demo, minutes on 2 CPU cores), `gpu-2d` and `gpu-3d` (real work).

Each section below is one key of the config (`train:`, `anomaly:`, ...); a config names only
the keys it changes. A model trained for a task reads `data`, `model`, `diffusion`, `train` and
the section of its task.
"""


def _code(value: Any) -> str:
    """A default or allowed value as YAML would write it, in a code span."""
    return f"`{_yaml(value)}`"


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return str(value)


def _names(values: tuple) -> str:
    return ", ".join(_code(v) for v in values)


def _type(annotation: Any) -> tuple[str, str]:
    """(type, allowed values) of an annotation: ``int``, ``list of float``, ``name`` + names..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        kind = "name" if all(isinstance(a, str) for a in args) else type(args[0]).__name__
        return kind, "one of " + _names(args)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            kind, allowed = _type(rest[0])
        else:
            kind, allowed = " or ".join(_type(a)[0] for a in rest), ""
        return f"{kind} or null", allowed
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            kind, allowed = _type(args[0])
            return f"{len(args)} × {kind}", allowed
        kind, allowed = _type(args[0]) if args else ("any", "")
        return f"list of {kind}", f"each {allowed}" if allowed else ""
    return getattr(annotation, "__name__", str(annotation)), ""


_BOUNDS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}


def _range(field: FieldInfo) -> str:
    """``Field(ge=, gt=, le=, lt=)`` as ``0 ≤ x < 1``, ``≥ 1``..."""
    bounds = {}
    for item in field.metadata:
        for name in _BOUNDS:
            if getattr(item, name, None) is not None:
                bounds[name] = getattr(item, name)
    low = next(((k, v) for k, v in bounds.items() if k in ("ge", "gt")), None)
    high = next(((k, v) for k, v in bounds.items() if k in ("le", "lt")), None)
    if low and high:
        left = "≤" if low[0] == "ge" else "<"
        return f"{low[1]} {left} x {_BOUNDS[high[0]]} {high[1]}"
    if low or high:
        name, value = low or high
        return f"{_BOUNDS[name]} {value}"
    return ""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _row(key: str, field: FieldInfo, default: Any) -> str:
    kind, allowed = _type(field.annotation)
    valid = "; ".join(v for v in (_range(field), allowed) if v)
    return (f"| `{key}` | {kind} | {_code(default)} | {_cell(valid)} | "
            f"{_cell(field.description or '')} |")


def _prose(cls: type) -> str:
    """A section's class docstring as Markdown (RST ``code`` becomes `code`)."""
    text = inspect.cleandoc(cls.__doc__ or "")
    return re.sub(r"``([^`]+)``", r"`\1`", text)


_TABLE = "| key | type | default | valid | meaning |\n|---|---|---|---|---|"


def render() -> str:
    """The whole of docs/configuration.md for the current schema."""
    defaults = Config().to_dict()
    top = [(name, field) for name, field in Config.model_fields.items()
           if not _is_section(field)]
    parts = [HEADER, "## Top level\n", _TABLE]
    parts += [_row(name, field, defaults[name]) for name, field in top]
    for name, field in Config.model_fields.items():
        if not _is_section(field):
            continue
        section = field.annotation
        parts += ["", f"## `{name}`\n", _prose(section) + "\n", _TABLE]
        parts += [_row(f"{name}.{key}", sub, defaults[name][key])
                  for key, sub in section.model_fields.items()]
    return "\n".join(parts) + "\n"


def _is_section(field: FieldInfo) -> bool:
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", type=Path, default=DOC_PATH,
                        help="file to write [default: docs/configuration.md]")
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the file differs from the schema")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.path.read_text() if args.path.is_file() else ""
        if current != text:
            print(f"{args.path} is out of date: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    args.path.write_text(text)
    print(f"wrote {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
