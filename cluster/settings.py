"""Flags and `TANDEM_*` environment variables derived from a frozen config dataclass.

A setting is written once, as a field: its type, its default and its help
(`field(metadata={"help": ...})`) give the flag `--field-name`, the variable
`TANDEM_FIELD_NAME` and the `--help` line, which shows the default and the variable.

    flags = ConfigFlags(WorkerConfig, fixed=("role",))   # `role` is the program's, not a flag
    flags.add_to(parser)
    config = flags.parse(parser, argv, role=Role.PREFILL)

- A flag wins over its variable; a variable that does not parse is an error naming it.
- A field that neither gives keeps the dataclass's own default (None stays None); a field
  without a default must be given.
- Types: str, int, float, bool (`--x` / `--no-x`; variables take 1/0, true/false, yes/no,
  on/off), `X | None`, and choices from `Literal[...]` or `metadata={"choices": ...}`.
- A field whose type is a dataclass (`WorkerConfig.engine`) is flattened: its fields become
  flags under their own names (`--block-size`, not `--engine-block-size`); a name may appear
  once in the whole tree.

Hand-written rather than a library: jsonargparse would nest the engine's fields as dotted flags
(`--engine.block_size`), renaming flags that deployments use, and pydantic-settings wants
pydantic models, while `engine/` keeps plain dataclasses that import no third-party config
code; neither is a dependency. The derivation is stdlib `dataclasses` + `argparse`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

T = TypeVar("T")

ENV_PREFIX = "TANDEM_"
_SCALARS: tuple[type, ...] = (str, int, float, bool)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Setting:
    """One flag: the field it sets (`path`: ("engine", "block_size") when nested)."""

    path: tuple[str, ...]
    kind: type  # str, int, float or bool (a field typed `kind | None` may also be None)
    choices: tuple[Any, ...] | None
    required: bool  # the field has no default
    default: Any  # for --help only (the dataclass applies its own default)
    help: str

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def parse_text(self, text: str, source: str) -> Any:
        """The value of `text` (from `source`, a flag or variable name); ValueError naming
        `source` when it does not parse or is not one of the choices."""
        try:
            value = _parse_bool(text) if self.kind is bool else self.kind(text)
        except ValueError:
            raise ValueError(f"{source}: expected {self.kind.__name__}, got {text!r}") from None
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{source}: must be one of {', '.join(map(str, self.choices))}, "
                             f"got {text!r}")
        return value

    def help_line(self) -> str:
        where = "required" if self.required else f"default: {_show(self.default)}"
        # argparse formats help with %: a literal % in a field's help must be doubled
        return f"{self.help} ({where}; env {self.env})".replace("%", "%%")


class ConfigFlags(Generic[T]):
    """The flags of config dataclass `cls` (see the module doc); `fixed` names fields the
    program sets itself (passed to `build`/`parse`), which get no flag."""

    def __init__(self, cls: type[T], fixed: Collection[str] = ()) -> None:
        self.cls = cls
        self.fixed = frozenset(fixed)
        unknown = self.fixed - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        if unknown:
            raise TypeError(f"{cls.__name__}: no fields {sorted(unknown)} to fix")
        self.settings = _settings(cls, (), self.fixed, None)
        names = [s.name for s in self.settings]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise TypeError(f"{cls.__name__}: flattened field names repeat: {duplicates}")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Adds one flag per setting; nested configs get an argument group each."""
        groups: dict[tuple[str, ...], Any] = {(): parser}
        for setting in self.settings:
            prefix = setting.path[:-1]
            if prefix not in groups:
                groups[prefix] = parser.add_argument_group(".".join(prefix))
            _add_flag(groups[prefix], setting)

    def build(self, args: argparse.Namespace, environ: Mapping[str, str] | None = None,
              **fixed: Any) -> T:
        """The config from parsed `args`, then `environ` (default: os.environ), then the
        dataclass defaults. ValueError (naming the field or variable) for a missing required
        field, a malformed variable, or what the dataclass's own validation refuses."""
        if set(fixed) != self.fixed:
            raise TypeError(f"{self.cls.__name__}: fixed fields are {sorted(self.fixed)}, "
                            f"got {sorted(fixed)}")
        environ = os.environ if environ is None else environ
        values: dict[tuple[str, ...], Any] = {}
        for setting in self.settings:
            if hasattr(args, setting.name):
                values[setting.path] = getattr(args, setting.name)
            elif setting.env in environ:
                values[setting.path] = setting.parse_text(environ[setting.env], setting.env)
            elif setting.required:
                raise ValueError(f"{setting.name}: {setting.flag} (or {setting.env}) is required")
        return _construct(self.cls, (), values, fixed)

    def parse(self, parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
              **fixed: Any) -> T:
        """`parse_args` then `build`; a bad setting ends the program as argparse does (the
        message, exit status 2)."""
        args = parser.parse_args(argv)
        try:
            return self.build(args, **fixed)
        except ValueError as error:
            parser.error(str(error))


def _settings(cls: type, path: tuple[str, ...], fixed: frozenset[str],
              instance: Any) -> list[Setting]:
    """`cls`'s settings, nested dataclasses flattened; `instance` (a nested field's default
    value, or None) supplies the defaults shown in --help."""
    hints = typing.get_type_hints(cls)
    found: list[Setting] = []
    for f in dataclasses.fields(cls):
        if not f.init or (not path and f.name in fixed):
            continue
        tp = hints[f.name]
        where = f"{cls.__name__}.{f.name}"
        if dataclasses.is_dataclass(tp):
            found += _settings(tp, (*path, f.name), fixed, _default(f))  # type: ignore[arg-type]
            continue
        if "help" not in f.metadata:
            raise TypeError(f"{where}: no help (field(metadata={{'help': ...}}))")
        kind, choices = _kind(tp, where)
        if "choices" in f.metadata:
            choices = tuple(f.metadata["choices"])
        has_default = (f.default is not dataclasses.MISSING
                       or f.default_factory is not dataclasses.MISSING)
        default = getattr(instance, f.name) if instance is not None else _default(f)
        found.append(Setting((*path, f.name), kind, choices,
                             required=not has_default and instance is None, default=default,
                             help=f.metadata["help"]))
    return found


def _construct(cls: Any, path: tuple[str, ...], values: Mapping[tuple[str, ...], Any],
               fixed: Mapping[str, Any]) -> Any:
    """`cls` from the given values; fields not given keep their defaults."""
    kwargs: dict[str, Any] = dict(fixed)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = (*path, f.name)
        if dataclasses.is_dataclass(hints.get(f.name)):
            nested: dict[tuple[str, ...], Any] = {
                k: v for k, v in values.items() if k[:len(key)] == key}
            default = _default(f)
            if default is None:
                kwargs[f.name] = _construct(hints[f.name], key, nested, {})
            elif nested:
                kwargs[f.name] = _replace(default, key, nested)
        elif key in values:
            kwargs[f.name] = values[key]
    return cls(**kwargs)


def _replace(obj: Any, path: tuple[str, ...], values: Mapping[tuple[str, ...], Any]) -> Any:
    """`obj` (a nested config's default) with the given values, at any depth: a config two
    levels down (the engine's sim cost model in a worker's engine config) keeps the rest of its
    default and takes its own values."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        key = (*path, f.name)
        current = getattr(obj, f.name)
        if dataclasses.is_dataclass(current):
            nested = {k: v for k, v in values.items() if k[:len(key)] == key}
            if nested:
                changes[f.name] = _replace(current, key, nested)
        elif key in values:
            changes[f.name] = values[key]
    return dataclasses.replace(obj, **changes)


def _default(f: dataclasses.Field[Any]) -> Any:
    """The field's default value (None when it has none)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _kind(tp: Any, where: str) -> tuple[type, tuple[Any, ...] | None]:
    """(scalar type, choices) of a field's annotation (`X | None` is X); TypeError if it is
    not supported."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1 or len(args) != 2:
            raise TypeError(f"{where}: only `X | None` unions are supported, got {tp}")
        tp = rest[0]
    choices = None
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        kinds = {type(c) for c in choices}
        if len(kinds) != 1:
            raise TypeError(f"{where}: Literal choices must share one type, got {choices}")
        tp = kinds.pop()
    if tp not in _SCALARS:
        raise TypeError(f"{where}: unsupported type {tp} (str, int, float, bool, X | None, "
                        f"Literal, or a nested dataclass)")
    return tp, choices


def _add_flag(parser: Any, setting: Setting) -> None:
    # default=SUPPRESS: a flag that is not given leaves no attribute, so `build` can tell it
    # from one given with the default's value and fall back to the variable
    options: dict[str, Any] = dict(dest=setting.name, default=argparse.SUPPRESS,
                                   help=setting.help_line())
    if setting.kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    else:
        options["type"] = _flag_type(setting)
        if setting.choices is not None:
            options["choices"] = setting.choices
    parser.add_argument(setting.flag, **options)


def _flag_type(setting: Setting) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return setting.kind(text)
        except ValueError:
            # argparse turns this into "argument --x: invalid <name> value: 'text'"
            raise argparse.ArgumentTypeError(
                f"expected {setting.kind.__name__}, got {text!r}") from None

    convert.__name__ = setting.kind.__name__
    return convert


def _parse_bool(text: str) -> bool:
    if text.strip().lower() in _TRUE:
        return True
    if text.strip().lower() in _FALSE:
        return False
    raise ValueError(text)


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
