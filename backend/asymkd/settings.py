"""Settings declared once: a dataclass field's default beside its help, flag, named choices
and range.

The config sections (config.py) and ClassifyOptions declare every field with `setting()`;
the CLI flags, the `--set` keys, validation and `asymkd choices` are all read from these
declarations, so a new setting is one field. Kept free of torch (read on every command line).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, get_args, get_type_hints

from . import choices as named

METADATA_KEY = "asymkd.setting"
BOTH: Literal["both"] = "both"  # flag=BOTH: a boolean offered as --x and --no-x
DESTS = "_settings"  # the parser default that maps each flag's dest to its setting's key

# inclusive lowest and highest value, and what a special value means ("0 = all")
Range = tuple[float, float, str]


@dataclass(frozen=True)
class Setting:
    """One setting's declaration (its default is the dataclass field's)."""

    help: str                      # "{default}" stands for the default
    flag: bool | Literal["both"] = True  # False: only the config file, --set and the Python API
    choices: Mapping[str, str] | None = None  # name -> meaning (a table of choices.py)
    range: Range | None = None
    metavar: str | None = None
    path: bool = False             # a file or folder: a flag's value is made absolute (runs resume elsewhere)
    group: str | None = None       # the flags of one group exclude each other


def setting(default: Any, *, help: str, flag: bool | Literal["both"] = True,
            choices: Mapping[str, str] | None = None, range: Range | None = None,
            metavar: str | None = None, path: bool = False, group: str | None = None) -> Any:
    """A dataclass field holding `default` and the setting's one declaration."""
    spec = Setting(help, flag, choices, range, metavar, path, group)
    return dataclasses.field(default=default, metadata={METADATA_KEY: spec})


def declaration(cls: type, name: str) -> Setting:
    """The declaration of field `name` of the dataclass `cls`."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata[METADATA_KEY]
    raise KeyError(name)


def shown(value: Any) -> str:
    """A default as a help text or a message shows it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


@dataclass(frozen=True)
class Entry:
    """A declared setting as found in a tree of dataclasses."""

    key: str         # dotted path from the root: "teacher.epochs", "seed"
    name: str        # the field's name, also its flag's dest
    kind: type       # bool, int, float or str: what a flag's text is read as
    default: Any
    spec: Setting

    def flags(self) -> list[str]:
        """The option strings: --x; for a boolean the one that changes the default, or both."""
        dashed = self.name.replace("_", "-")
        if self.spec.flag is False:
            return []
        if self.kind is bool:
            if self.spec.flag == BOTH:
                return [f"--{dashed}", f"--no-{dashed}"]
            return [f"--no-{dashed}"] if self.default is True else [f"--{dashed}"]
        return [f"--{dashed}"]

    def text(self) -> str:
        return self.spec.help.replace("{default}", shown(self.default))

    def describe(self) -> str:
        """The help text with the meaning of each choice, as a flag's --help shows it."""
        text = self.text()
        if self.kind is bool and self.spec.flag is True and self.default is True:  # the --no-x flag alone
            text = f"turn off (default on): {text}"
        if self.spec.choices:
            text += ": " + "; ".join(f"{name}: {about}" for name, about in self.spec.choices.items())
        return text


def kind_of(hint: Any) -> type:
    """What a field's text (a flag, a --set value) is read as: text wherever the field takes it."""
    options = [a for a in (get_args(hint) or (hint,)) if a is not type(None)]
    return next((kind for kind in (str, bool, float, int) if kind in options), str)


def entries(cls: type, prefix: str = "") -> list[Entry]:
    """Every setting of the dataclass `cls`, its sections' (dataclass fields) included, in field
    order. A field declared without `setting()` is a TypeError: each needs its declaration."""
    hints = get_type_hints(cls)
    out: list[Entry] = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out += entries(hint, f"{prefix}{f.name}.")
            continue
        spec = f.metadata.get(METADATA_KEY)
        if not isinstance(spec, Setting):
            raise TypeError(f"{cls.__name__}.{f.name} is declared without settings.setting()")
        out.append(Entry(prefix + f.name, f.name, kind_of(hint), f.default, spec))
    return out


def section(found: Iterable[Entry], name: str, *names: str) -> list[Entry]:
    """The entries directly in section `name` ("" = the top level), only `names` if given."""
    return [e for e in found if e.key.rpartition(".")[0] == name and (not names or e.name in names)]


def value(obj: Any, key: str) -> Any:
    """The value of a dotted setting key in a tree of dataclasses."""
    return functools.reduce(getattr, key.split("."), obj)


class Names(tuple[str, ...]):
    """A table's names as argparse `choices`: "cuda:N" admits cuda:0, cuda:1, ..."""

    def __contains__(self, item: object) -> bool:
        return named.allows(self, item)


def absolute(text: str) -> str:
    return str(Path(text).resolve())


def add_flags(parser: argparse.ArgumentParser, chosen: Iterable[Entry], *, given_only: bool = True) -> None:
    """Add the flag of each entry declared with one (dest: the field's name) and record
    dest -> key in the parser's DESTS default, which `given` reads. given_only: flags default
    to None, "not given", so the config file and --set keep their values; else to the declared
    default."""
    dests = dict(parser.get_default(DESTS) or {})
    groups: dict[str, Any] = {}
    for entry in chosen:
        if not entry.flags():
            continue
        if entry.name in dests:
            raise ValueError(f"two settings would share the flag {entry.flags()[0]}")
        target: Any = parser
        if entry.spec.group is not None:
            if entry.spec.group not in groups:
                groups[entry.spec.group] = parser.add_mutually_exclusive_group()
            target = groups[entry.spec.group]
        keywords = _argument(entry, given_only)
        # BooleanOptionalAction makes the --no-x form itself
        names = entry.flags()[:1] if keywords.get("action") is argparse.BooleanOptionalAction else entry.flags()
        target.add_argument(*names, dest=entry.name, **keywords)
        dests[entry.name] = entry.key
    parser.set_defaults(**{DESTS: dests})


def _argument(entry: Entry, given_only: bool) -> dict[str, Any]:
    """add_argument's keywords for an entry's flag."""
    out: dict[str, Any] = {"default": None if given_only else entry.default,
                           "help": entry.describe().replace("%", "%%")}  # argparse formats help with %
    if entry.kind is bool:
        if entry.spec.flag == BOTH:
            out["action"] = argparse.BooleanOptionalAction
        else:
            out["action"] = "store_false" if entry.default is True else "store_true"
        return out
    out["type"] = absolute if entry.spec.path else entry.kind
    out["metavar"] = entry.spec.metavar
    if entry.spec.choices:
        out["choices"] = Names(entry.spec.choices)
    return out


def given(args: argparse.Namespace) -> dict[str, Any]:
    """key -> value of the setting flags on the command line (None: not given)."""
    dests: dict[str, str] = getattr(args, DESTS, None) or {}
    return {key: getattr(args, dest) for dest, key in dests.items() if getattr(args, dest, None) is not None}


def report(entry: Entry) -> dict[str, Any]:
    """One setting for `asymkd choices`: help, type, default, flags, and its choices and range."""
    out: dict[str, Any] = {"help": entry.text(), "type": "text" if entry.kind is str else entry.kind.__name__,
                           "default": entry.default, "flags": entry.flags()}
    if entry.spec.choices:
        out["choices"] = dict(entry.spec.choices)
    if entry.spec.range:
        out["range"] = list(entry.spec.range)
    return out
