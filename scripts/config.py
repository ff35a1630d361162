"""--config FILE: the command line's options in a reviewed JSON or YAML file; flags given on the
command line override it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

NOT_IN_CONFIG = ("help", "config", "verbose")


class ConfigError(ValueError):
    """The config file cannot be read, or holds an option or value the command does not take."""


def namespace_from_config(parser: argparse.ArgumentParser, path: str) -> argparse.Namespace:
    """The file's options as a namespace to parse the command line into: argparse fills in only what
    the namespace lacks, so flags override the file and defaults fill the rest."""
    options = _read(Path(path))
    actions = {a.dest: a for a in parser._actions if a.dest not in NOT_IN_CONFIG}
    namespace = argparse.Namespace()
    for key, value in options.items():
        dest = key.replace("-", "_")
        if dest not in actions:
            raise ConfigError(f"config {path!r} has unknown option {key!r}; it takes the command line's options "
                              f"({', '.join(sorted(actions))})")
        setattr(namespace, dest, _value(path, key, actions[dest], value))
    return namespace


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"config {str(path)!r} cannot be read: {exc.strerror or exc}") from exc
    yaml_file = path.suffix.lower() in (".yaml", ".yml")
    try:
        if yaml_file:
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        kind = "YAML" if yaml_file else "JSON"
        raise ConfigError(f"config {str(path)!r} is not valid {kind}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config {str(path)!r} must hold a mapping of option names to values, not a {type(data).__name__}")
    return data


def _value(path: str, key: str, action: argparse.Action, value: Any) -> Any:
    """``value`` checked as the flag would check it on the command line."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"config {path!r}: {key} must be true or false, got {value!r}")
        return value  # under the option's own name: bias: false, not no_bias: true
    if value is None:
        return None
    if action.type is not None and not isinstance(value, bool):
        try:
            value = action.type(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config {path!r}: {key} must be {action.type.__name__}, got {value!r}") from None
    elif isinstance(value, (dict, list, bool)):
        raise ConfigError(f"config {path!r}: {key} must be a single value, got {value!r}")
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"config {path!r}: {key} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value if action.type is not None else str(value)
