"""The CLI's options generated from the config dataclasses, whose fields declare each option's name, type, default,
choices and help once (config.py); the command receives the validated config."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import List, Literal, Optional

import typer

from flowerfeat.config import flag_of


def config_option(cls, name: str, **changes):
    """The typer Option of ``cls``'s field ``name``: its flag, default and help (``changes`` override them)."""
    f = cls.__dataclass_fields__[name]
    default = None if isinstance(f.default, tuple) else f.default  # a repeatable option: None = the field's default
    kw = {"help": f.metadata["help"], "metavar": f.metadata.get("metavar")}
    if f.type in (bool, "bool"):
        kw["metavar"] = ""  # a flag: --strict, no --no-strict
    kw.update(changes)
    return typer.Option(kw.pop("default", default), flag_of(f), **kw)


def _annotation(f: dataclasses.Field, hint):
    """What typer parses a field as: its choices, a list for a tuple field, else the field's own type."""
    if f.metadata.get("choices"):
        return Literal[f.metadata["choices"]]
    if typing.get_origin(hint) is tuple:
        return Optional[List[typing.get_args(hint)[0]]]
    return hint


def config_options(cls, skip: tuple[str, ...] = ()):
    """Add ``cls``'s fields (those the CLI offers) as options to the command, after its own parameters; the command
    receives the validated config as ``cfg``, built once here."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and f.name not in skip]

    def wrap(fn):
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "cfg"]
        params = own + [
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=config_option(cls, f.name),
                              annotation=_annotation(f, hints[f.name]))  # fmt: skip
            for f in fields
        ]

        @functools.wraps(fn)
        def inner(**kw):
            given = {f.name: kw.pop(f.name) for f in fields}
            given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None or
                     cls.__dataclass_fields__[k].default is None}  # fmt: skip
            return fn(cfg=cls(**given), **kw)

        del inner.__wrapped__  # typer reads the signature below, not fn's
        inner.__signature__ = inspect.Signature(params)
        inner.__annotations__ = {p.name: p.annotation for p in params}
        return inner

    return wrap
