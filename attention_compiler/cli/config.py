"""--config FILE: the command line's options in a reviewed JSON or YAML file; flags given on the
command line override it.

A config file is small and plain, so one that is not is refused before it can cost anything: a
regular file (not a FIFO or a device) of at most 1 MiB, UTF-8 or UTF-16/32 with a BOM, a mapping
whose values expand (through YAML aliases) to at most 10 000 nodes. Values are read as the flag
means them, with none of YAML 1.1's surprises: an integer option takes an integer (not 16.7, not
``1:0``, which YAML 1.1 reads as base 60, nor ``010``, read as octal), and a key given twice is an
error, not the last one winning.
"""

from __future__ import annotations

import argparse
import codecs
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

NOT_IN_CONFIG = ("help", "config", "verbose")
SIZE_LIMIT = 2**20  # bytes
NODE_LIMIT = 10_000  # YAML nodes after alias expansion
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


class ConfigError(ValueError):
    """The config file cannot be read, or holds an option or value the command does not take."""


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error line stays a line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def namespace_from_config(parser: argparse.ArgumentParser, path: str) -> argparse.Namespace:
    """The file's options as a namespace to parse the command line into: argparse fills in only what
    the namespace lacks, so flags override the file and defaults fill the rest."""
    options = _read(Path(path))
    actions = {a.dest: a for a in parser._actions if a.dest not in NOT_IN_CONFIG}
    namespace = argparse.Namespace()
    for key, value in options.items():
        if not isinstance(key, str):
            raise ConfigError(
                f"config {path!r} has the key {shown(key)} ({type(key).__name__}); option names are text "
                "such as embed_dim"
            )
        dest = key.replace("-", "_")
        if dest not in actions:
            raise ConfigError(
                f"config {path!r} has unknown option {shown(key)}; it takes the command line's options "
                f"({', '.join(sorted(actions))})"
            )
        setattr(namespace, dest, _value(path, key, actions[dest], value))
    return namespace


def _read(path: Path) -> dict[Any, Any]:
    raw = read_small_file(path, SIZE_LIMIT, "config")
    text = _decode(path, raw)
    yaml_file = path.suffix.lower() in (".yaml", ".yml")
    kind = "YAML" if yaml_file else "JSON"
    try:
        data = _load_yaml(text) if yaml_file else json.loads(text, object_pairs_hook=_unique_pairs)
    except ConfigError as exc:
        raise ConfigError(f"config {str(path)!r}: {exc}") from None
    except (
        Exception
    ) as exc:  # json.JSONDecodeError, yaml.YAMLError, RecursionError from deep nesting
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"config {str(path)!r} is not valid {kind}: {detail[:200]}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config {str(path)!r} must hold a mapping of option names to values, not a {type(data).__name__}"
        )
    return data


def read_small_file(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; ConfigError for anything else, decided
    before reading (a FIFO would block, /dev/zero never ends)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"{what} {str(path)!r} cannot be read: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(
                f"{what} {str(path)!r} is not a regular file (a FIFO, a device or a folder); "
                "expected a file"
            )
        if info.st_size > limit:
            raise ConfigError(
                f"{what} {str(path)!r} has {info.st_size} bytes, more than a {what} file may have "
                f"({limit}); expected a short file of options"
            )
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(f"{what} {str(path)!r} grew past {limit} bytes while being read")
    return data


def _decode(path: Path, raw: bytes) -> str:
    encoding = next((name for bom, name in _BOMS if raw.startswith(bom)), "utf-8")
    if encoding == "utf-8" and b"\0" in raw:
        raise ConfigError(
            f"config {str(path)!r} holds NUL bytes: UTF-16 without a byte-order mark, or not text; "
            "save it as UTF-8"
        )
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config {str(path)!r} is not {encoding.upper().removesuffix('-SIG')} text (byte "
            f"{exc.start}); save it as UTF-8"
        ) from None


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"option {shown(key)} is given twice; give each option once")
        seen[key] = value
    return seen


_SEXAGESIMAL = re.compile(r"[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?")
_OCTAL = re.compile(r"[-+]?0[0-7_]+")


def _load_yaml(text: str) -> Any:
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            self.flatten_mapping(node)  # merge keys (<<) first, as SafeLoader does
            keys: list[Any] = []
            for key_node, value_node in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in keys:
                    raise ConfigError(
                        f"option {shown(key)} is given twice (line {key_node.start_mark.line + 1}); "
                        "give each option once"
                    )
                keys.append(key)
                if (
                    isinstance(value_node, yaml.ScalarNode)
                    and value_node.tag.endswith((":int", ":float"))
                    and not value_node.style
                ):
                    _check_yaml_number(key, value_node.value)
            return super().construct_mapping(node, deep)

    loader = Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_yaml_number(key: Any, text: str) -> None:
    """Refuse the YAML 1.1 numbers that read as something else than they look."""
    if _SEXAGESIMAL.fullmatch(text):
        raise ConfigError(
            f"{key}: {text} is a base-60 number in YAML 1.1 ({text} would mean "
            f"{_sexagesimal(text)}); quote it, or write the number you mean"
        )
    if _OCTAL.fullmatch(text) and text.strip("+-0_"):
        raise ConfigError(
            f"{key}: {text} is an octal number in YAML 1.1 (it would mean {int(text.replace('_', ''), 8)}); "
            "write it without the leading 0"
        )


def _sexagesimal(text: str) -> float:
    sign = -1 if text.startswith("-") else 1
    value = 0.0
    for part in text.lstrip("+-").replace("_", "").split(":"):
        value = value * 60 + float(part)
    return sign * (int(value) if value.is_integer() else value)


def _check_expansion(root: Any) -> None:
    """The node count of the document with every alias expanded, computed once per node (aliases
    share nodes), so a billion laughs is refused without being built."""
    sizes: dict[int, int] = {}
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = (
            [n for pair in node.value for n in pair]
            if node.id == "mapping"
            else list(node.value)
            if node.id == "sequence"
            else []
        )
        if children_done or not children:
            sizes[id(node)] = 1 + sum(sizes.get(id(c), 0) for c in children)
            if sizes[id(node)] > NODE_LIMIT:
                raise ConfigError(
                    f"it expands to more than {NODE_LIMIT} values (YAML anchors and aliases); a config "
                    "holds a flat mapping of options"
                )
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)


def _value(path: str, key: str, action: argparse.Action, value: Any) -> Any:
    """``value`` checked as the flag would check it on the command line."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"config {path!r}: {key} must be true or false, got {shown(value)}")
        return value  # under the option's own name: bias: false, not no_bias: true
    if value is None:
        return None
    if action.nargs in ("+", "*"):  # keep_fp32: [encoder.layer.0, pooler], or one name
        names = value if isinstance(value, list) else [value]
        if not names or not all(isinstance(v, str) and v for v in names):
            raise ConfigError(f"config {path!r}: {key} must be a list of names, got {shown(value)}")
        return names
    if action.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config {path!r}: {key} must be an integer, got {shown(value)}")
        return value
    if action.type is float:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ConfigError(f"config {path!r}: {key} must be a finite number, got {shown(value)}")
        return float(value)
    if (
        isinstance(value, list)
        and action.type is not None
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        value = ",".join(map(str, value))  # latency_shape: [1, 128, 128]
    if isinstance(value, (dict, list, bool)):
        raise ConfigError(f"config {path!r}: {key} must be a single value, got {shown(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config {path!r}: {key} must be finite, got {shown(value)}")
    if action.type is not None:
        try:
            value = action.type(str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"config {path!r}: {key}: {str(exc)[:200]}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(
            f"config {path!r}: {key} must be one of {', '.join(map(str, action.choices))}, got {shown(value)}"
        )
    return value if action.type is not None else str(value)
