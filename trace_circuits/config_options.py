"""Command-line options generated from the config dataclasses (:mod:`trace_circuits.config`): one option per field,
its help and default from the field, so every default is written once."""

from __future__ import annotations

import argparse
import dataclasses
import typing


def _flag(f: dataclasses.Field, prefix: str) -> str:
    name = f.metadata.get("flag") or f.name.replace("_", "-")
    return f"--{prefix}{name}"


def add_options(parser: argparse.ArgumentParser, cls, prefix: str = "", skip: tuple = ()) -> None:
    """One option per field of ``cls`` (nested configs excluded), help text and default from the field. Defaults are
    not set on the parser (``SUPPRESS``): :func:`from_options` fills them from the dataclass, so values given on the
    command line can be told apart from defaults (and laid over a config file)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t) or f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = _flag(f, prefix)
        dest = f"{prefix.replace('-', '_')}{f.name}"
        helptext = f"{f.metadata.get('help', '')}. Default: {default}"
        base = [a for a in typing.get_args(t) if a is not type(None)] or [t]
        if base[0] is bool:
            neg = f"--{prefix}no-{(f.metadata.get('flag') or f.name).replace('_', '-')}"
            parser.add_argument(neg, dest=dest, action="store_false", default=argparse.SUPPRESS,
                                help=f"turn off: {f.metadata.get('help', '')}" if default else argparse.SUPPRESS)
            if not default:
                parser.add_argument(flag, dest=dest, action="store_true", default=argparse.SUPPRESS, help=helptext)
        elif base[0] is list:
            parser.add_argument(flag, dest=dest, action="append", default=argparse.SUPPRESS, help=helptext)
        else:
            parser.add_argument(flag, dest=dest, type=base[0], default=argparse.SUPPRESS, help=helptext,
                                choices=f.metadata.get("choices"), metavar=None if f.metadata.get("choices") else
                                f.name.upper())


def from_options(cls, args: argparse.Namespace, prefix: str = "", base=None):
    """``base`` (default: ``cls()``) with every option given on the command line laid over it."""
    obj = base if base is not None else cls()
    changes = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        dest = f"{prefix.replace('-', '_')}{f.name}"
        if hasattr(args, dest):
            changes[f.name] = getattr(args, dest)
    return dataclasses.replace(obj, **changes)
