"""Config dataclasses from a JSON file plus ``key=value`` command-line overrides."""
from __future__ import annotations

import dataclasses
import json
import os
import typing


def _coerce(value: str, annotation, current):
    options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if len(options) < len(typing.get_args(annotation)):  # Optional[X]: "none" / "null" clear it
        if value.strip().lower() in ("none", "null"):
            return None
        if len(options) == 1:
            annotation = typing.get_origin(options[0]) or options[0]
    kind = type(current) if current is not None else annotation
    if kind is bool or annotation in (bool, "bool"):
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if kind in (int, "int"):
        return int(value)
    if kind in (float, "float"):
        return float(value)
    if kind in (str, "str") or isinstance(current, str):
        return value
    return json.loads(value)  # lists, dicts, None, numbers in Optional fields


def apply_overrides(config, overrides: dict | list | None):
    """Return a copy of dataclass ``config`` with fields replaced.

    ``overrides`` is a dict (from a config file; values already typed) or a list of ``key=value``
    strings (from the command line; values parsed by the field's type). Unknown keys are an error.
    """
    if not overrides:
        return config
    fields = {f.name: f for f in dataclasses.fields(config)}
    hints = typing.get_type_hints(type(config))
    if isinstance(overrides, dict):
        items = list(overrides.items())
        parse = False
    else:
        items = []
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not of the form key=value")
            key, value = item.split("=", 1)
            items.append((key.strip(), value.strip()))
        parse = True
    changes = {}
    for key, value in items:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ValueError(f"unknown config key {key!r} for {type(config).__name__}; known keys: {known}")
        if parse:
            try:
                value = _coerce(value, hints.get(key), getattr(config, key))
            except ValueError as err:
                raise ValueError(f"config key {key!r}: {err}") from err
        changes[key] = value
    return dataclasses.replace(config, **changes)


def load_config(cls, path: str | os.PathLike | None = None, overrides: list | None = None):
    """Build ``cls()`` then apply a JSON config file (if given) and then ``key=value`` overrides."""
    config = cls()
    if path is not None:
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a JSON object")
        config = apply_overrides(config, data)
    return apply_overrides(config, overrides)


def save_config(config, path: str | os.PathLike) -> None:
    from npg.io import atomic_write_text

    atomic_write_text(path, json.dumps(dataclasses.asdict(config), indent=2))
