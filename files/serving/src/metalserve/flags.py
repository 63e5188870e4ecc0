"""Command-line flags from pydantic-settings models: the one bridge to argparse.

Each command's options are one settings model (``metalserve.settings``,
``metalserve.bench.options``): :func:`add_arguments` generates the command's argparse flags
from the model's fields and :func:`settings_from_args` builds the model from the parsed flags,
so flags, defaults and validation can never drift apart. Two kinds of model:

* environment models (``env_prefix`` in their config: ``ServeSettings``): every field is both a
  flag (``--max-batch-size``) and an environment variable (``METALSERVE_MAX_BATCH_SIZE``); a
  flag given on the command line wins. Flags are strings for pydantic to parse and validate.
* command models (:class:`CommandSettings`): argparse converts each flag (its type from the
  field's annotation, or :class:`Arg`'s ``type``), so bad values are reported as argparse does
  (``argument --seed: invalid int value: 'x'``), exit code 2. Only fields whose :class:`Arg`
  names an ``env`` read the environment (``METALSERVE_STORE`` for ``--store``).

How a field is spelled on the command line is said by an :class:`Arg` in its annotation:
``out_dir: Annotated[Path, Arg(positional=True, metavar="OUT_DIR")]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from metalserve.exitcodes import ExitCode

M = TypeVar("M", bound=BaseSettings)


@dataclass(frozen=True)
class Arg:
    """How a settings field appears on the command line (metadata in ``Annotated[...]``).

    Without one, a field is the flag ``--field-name`` of its annotation's type.
    """

    positional: bool = False
    flag: str | None = None  # the option string; default: --field-name
    metavar: str | None = None
    env: str | None = None  # the one environment variable that also sets it (command models)
    type: Callable[[str], Any] | None = None  # argparse type; its errors name the flag
    choices: Sequence[Any] | None = None  # default: a Literal annotation's values
    nargs: str | None = None
    append: bool = False  # repeatable flag, collected into a list
    group: str | None = None  # name of a mutually exclusive group
    cli: bool = True  # False: no flag; set by code only


NO_ARG = Arg()


def field_arg(info: FieldInfo) -> Arg:
    """The :class:`Arg` of a field (the default one when its annotation has none)."""
    return next((m for m in info.metadata if isinstance(m, Arg)), NO_ARG)


def flag_of(name: str, info: FieldInfo) -> str:
    """The field's flag (``--max-batch-size``), or the metavar of a positional (``URL``)."""
    arg = field_arg(info)
    if arg.positional:
        return arg.metavar or name
    return arg.flag or "--" + name.replace("_", "-")


def _environment_model(model: type[BaseSettings]) -> bool:
    return bool(model.model_config.get("env_prefix"))


def add_arguments(parser: argparse.ArgumentParser, model: type[BaseSettings]) -> None:
    """One argument per field of ``model``, in field order; absent flags stay absent (so the
    model's defaults and environment apply)."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for name, info in model.model_fields.items():
        arg = field_arg(info)
        if not arg.cli:
            continue
        target: Any = parser
        if arg.group is not None:
            if arg.group not in groups:
                groups[arg.group] = parser.add_mutually_exclusive_group()
            target = groups[arg.group]
        if _environment_model(model):
            _add_environment_flag(target, name, info, str(model.model_config["env_prefix"]))
        else:
            _add_typed_argument(target, name, info, arg)


def _add_environment_flag(parser: Any, name: str, info: FieldInfo, prefix: str) -> None:
    flag = "--" + name.replace("_", "-")
    default = "required" if info.is_required() else f"default: {info.default}"
    help_text = f"{info.description} [{prefix}{name.upper()}; {default}]"
    kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
    if info.annotation in (bool, bool | None):  # absent: the default (None: decided later)
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
    else:
        parser.add_argument(flag, metavar=name.upper(), **kwargs)


def _add_typed_argument(parser: Any, name: str, info: FieldInfo, arg: Arg) -> None:
    annotation = _without_none(info.annotation)
    kwargs: dict[str, Any] = {"help": _help(info)}
    if arg.metavar is not None:
        kwargs["metavar"] = arg.metavar
    if arg.nargs is not None:
        kwargs["nargs"] = arg.nargs
    if annotation is bool:
        kwargs["action"] = "store_true"
    else:
        choices = arg.choices
        if choices is None and get_origin(annotation) is Literal:
            choices = get_args(annotation)
        converter = arg.type or _converter(annotation, choices)
        if converter is not None:
            kwargs["type"] = converter
        if choices is not None:
            kwargs["choices"] = choices
        if arg.append:
            kwargs["action"] = "append"
    if arg.positional:
        parser.add_argument(name, **kwargs)
        return
    required = info.is_required() and not (arg.env and os.environ.get(arg.env))
    if required:
        kwargs["required"] = True
    parser.add_argument(flag_of(name, info), dest=name, default=argparse.SUPPRESS, **kwargs)


def _without_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, UnionType):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _converter(annotation: Any, choices: Sequence[Any] | None) -> Callable[[str], Any] | None:
    if choices:
        kind = type(choices[0])
        return None if kind is str else kind
    if annotation in (int, float, Path):
        return annotation  # type: ignore[no-any-return]
    return None


def _help(info: FieldInfo) -> str | None:
    """The description, with ``%(default)s`` standing for the field's default (argparse itself
    only sees ``SUPPRESS``)."""
    if info.description is None:
        return None
    marker = "\x00"
    text = info.description.replace("%(default)s", marker).replace("%", "%%")
    return text.replace(marker, str(info.default))


def given_values(model: type[BaseSettings], args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``model`` present in ``args`` (flags given on the command line)."""
    return {k: v for k, v in vars(args).items() if k in model.model_fields}


def settings_from_args(model: type[M], args: argparse.Namespace) -> M:
    """Build ``model`` from the parsed flags (over its defaults and environment)."""
    return model(**given_values(model, args))


def describe_errors(model: type[BaseSettings], exc: ValidationError) -> str:
    """A validation error as argparse words it: ``argument --flag: message`` per problem."""
    problems = []
    for error in exc.errors(include_url=False):
        loc = error.get("loc") or ()
        name = str(loc[0]) if loc else ""
        info = model.model_fields.get(name)
        where = f"argument {flag_of(name, info)}: " if info is not None else ""
        problems.append(where + str(error.get("msg", "invalid")))
    return "; ".join(problems)


def add_command(
    subparsers: Any,
    name: str,
    model: type[BaseSettings],
    handler: Callable[[Any], int],
    **parser_kwargs: Any,
) -> argparse.ArgumentParser:
    """A subcommand whose flags come from ``model``; ``handler`` gets the built settings."""
    parser: argparse.ArgumentParser = subparsers.add_parser(name, **parser_kwargs)
    configure_command(parser, model, handler)
    return parser


def configure_command(
    parser: argparse.ArgumentParser, model: type[BaseSettings], handler: Callable[[Any], int]
) -> None:
    """Give an existing (sub)parser ``model``'s flags and ``handler``."""
    add_arguments(parser, model)
    parser.set_defaults(handler=_Command(parser, model, handler))


@dataclass(frozen=True)
class _Command:
    """Builds a command's settings from its parsed flags, then runs it. Invalid settings exit
    2: an environment model's as pydantic words them ("invalid settings:" and the fields), a
    command model's through its parser, like every other bad flag."""

    parser: argparse.ArgumentParser
    model: type[BaseSettings]
    handler: Callable[[Any], int]

    def __call__(self, args: argparse.Namespace) -> int:
        try:
            settings = settings_from_args(self.model, args)
        except ValidationError as exc:
            if _environment_model(self.model):
                print(f"metalserve: error: invalid settings:\n{exc}", file=sys.stderr)
                return ExitCode.USAGE
            self.parser.error(describe_errors(self.model, exc))  # exits 2
        return self.handler(settings)


class _NamedEnvSource(PydanticBaseSettingsSource):
    """The environment variables that the fields' :class:`Arg` name (empty ones ignored)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        env = field_arg(field).env
        value = os.environ.get(env) if env else None
        return (value or None), field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, info in self.settings_cls.model_fields.items():
            value, _, _ = self.get_field_value(info, name)
            if value is not None:
                values[name] = value
        return values


class CommandSettings(BaseSettings):
    """Settings of one command: its flags, and the environment variables its fields' ``Arg``
    name (no others)."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _NamedEnvSource(settings_cls)
