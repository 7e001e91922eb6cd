"""Checks a frozen config dataclass makes on its fields (`PruneConfig`, `HealConfig`): one wording for every config."""

from __future__ import annotations

import dataclasses
from typing import Any

from lorp_fx.core.errors import ConfigError


def check_whole(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be a whole number >= {minimum}, got {value!r}")


def check_choice(value, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def from_mapping(cls, data: Any, what: str):
    """`cls(**data)`, with ConfigError for a value that is not a mapping or a field `cls` does not have."""
    if not isinstance(data, dict):
        raise ConfigError(f"a {what} is a mapping of field names to values, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown {what} field(s) {', '.join(unknown)}; the fields are: {', '.join(names)}")
    return cls(**data)
