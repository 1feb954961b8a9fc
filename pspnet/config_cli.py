"""The command line of :class:`pspnet.config.TrainConfig`: one argparse option per field, generated from the
dataclass (its type, default, help text and whether it may change on resume).

Syntax: ``--key value`` or ``--key=value`` (dashes may stand for underscores: ``--max-iters 3``); a bool
field also as a bare ``--key`` (true), ``--key false`` and ``--no-key``; a list as ``--scales 0.5,0.75,1.0``
or ``--bins "[1, 2]"``; ``none`` for an optional field. Values are parsed by
:func:`pspnet.config.parse_value`. An unknown option is an error with a "did you mean" hint.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import typing
from typing import Any, Mapping, Optional, Sequence

from .config import ConfigError, TrainConfig, field_help, field_name, field_type, parse_value, resume_free_keys

__all__ = ["ConfigArgumentParser", "config_overrides", "parse_overrides"]


class ConfigArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` with an option per :class:`TrainConfig` field, in the argument group
    "config keys"; the entry points (``pspnet.train``, ``pspnet.evaluate``, ``pspnet.predict``) add their own
    options to it. Config options are absent from the parsed namespace unless given
    (:func:`config_overrides` collects them). ``allow_abbrev`` is off: ``--max`` is not ``--max_iters``.

    With ``exit_on_error=False`` every error raises :class:`ConfigError` instead of exiting with status 2.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        group = self.add_argument_group(
            "config keys", "Every TrainConfig field; each overrides the --config file (or the stored config).")
        for f in dataclasses.fields(TrainConfig):
            _add_option(group, f.name, f.default if f.default_factory is dataclasses.MISSING else f.default_factory())

    def parse_known_args(self, args: Optional[Sequence[str]] = None,
                         namespace: Optional[argparse.Namespace] = None) -> tuple[argparse.Namespace, list[str]]:
        """``ArgumentParser.parse_known_args`` after spelling ``--some-key`` as the field name ``--some_key``."""
        tokens = [_canonical(token) for token in (sys.argv[1:] if args is None else args)]
        try:
            return super().parse_known_args(tokens, namespace)
        except argparse.ArgumentError as e:  # raised instead of error() when exit_on_error is False
            self.error(str(e))

    def parse_args(self, args: Optional[Sequence[str]] = None,
                   namespace: Optional[argparse.Namespace] = None) -> argparse.Namespace:
        """``ArgumentParser.parse_args``, whose error for an unknown option suggests the closest option."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self._unknown(extras[0]))
        return parsed

    def _unknown(self, token: str) -> str:
        if not token.startswith("--"):
            return f"expected '--key value', got {token!r}"
        option = token.partition("=")[0]
        close = difflib.get_close_matches(option, list(self._option_string_actions), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown config key or option '{option}'{hint}"

    def error(self, message: str) -> typing.NoReturn:
        """Exit with status 2 and the usage (argparse's way), or raise :class:`ConfigError` when
        ``exit_on_error`` is False."""
        if not self.exit_on_error:
            raise ConfigError(f"command line: {message}")
        super().error(message)


def config_overrides(namespace: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line parsed into ``namespace``, as ``{field: value}``."""
    return {f.name: getattr(namespace, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(namespace, f.name)}


def parse_overrides(overrides: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Config overrides as ``{field: value}``: command-line tokens (``["--base_lr", "0.02", "--no-fused"]``)
    are parsed; a mapping (already parsed) is copied, its keys checked (values are checked by
    :meth:`TrainConfig.validate`).

    Raises:
        ConfigError: an unknown key, a missing or unparsable value; the message names the key.
        TypeError: ``overrides`` is a single string.
    """
    if isinstance(overrides, Mapping):
        return {field_name(str(key), "overrides"): value for key, value in overrides.items()}
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of command-line tokens, not one string")
    parser = ConfigArgumentParser(prog="overrides", add_help=False, exit_on_error=False)
    return config_overrides(parser.parse_args(list(overrides)))


def _canonical(token: str) -> str:
    """``--some-key[=v]`` -> ``--some_key[=v]`` and ``--no_flag`` / ``--no-some-flag`` -> ``--no-some_flag`` when
    they name a field; other tokens unchanged."""
    if not token.startswith("--") or len(token) == 2:
        return token
    key, sep, value = token[2:].partition("=")
    name = key.replace("-", "_")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    if name in names:
        return f"--{name}{sep}{value}"
    if name.startswith("no_") and name[3:] in names and field_type(name[3:]) is bool:
        return f"--no-{name[3:]}{sep}{value}"
    return token


def _add_option(group: argparse._ArgumentGroup, name: str, default: Any) -> None:
    """``--name`` (and ``--no-name`` for a bool) for field ``name``, parsed by :func:`parse_value`."""
    tp = field_type(name)
    help_text = f"{field_help(name)} Default: {_show(default)}."
    if name in resume_free_keys():
        help_text += " May change on resume."

    def convert(text: str) -> Any:
        try:
            return parse_value(tp, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    help_text = help_text.replace("%", "%%")  # argparse %-formats help strings
    if tp is bool:
        group.add_argument(f"--{name}", dest=name, type=convert, nargs="?", const=True, default=argparse.SUPPRESS,
                           metavar="BOOL", help=f"{help_text} --no-{name} sets it to false.")
        group.add_argument(f"--no-{name}", dest=name, action="store_false", default=argparse.SUPPRESS,
                           help=argparse.SUPPRESS)
    else:
        group.add_argument(f"--{name}", dest=name, type=convert, default=argparse.SUPPRESS, metavar=_metavar(tp),
                           help=help_text)


def _metavar(tp: Any) -> str:
    """``BOOL``, ``INT``, ``FLOAT``, ``TEXT``, ``FLOAT,...`` or ``INT|none``."""
    if typing.get_origin(tp) is list:
        return f"{_metavar(typing.get_args(tp)[0])},..."
    if type(None) in typing.get_args(tp):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_metavar(inner)}|none"
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "TEXT"}[tp]


def _show(value: Any) -> str:
    """A default as it is typed on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)
