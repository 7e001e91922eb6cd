"""Recipes: every option of a run in one YAML file, mergekit-style (`lorp-fx prune --config recipe.yaml`).

A recipe holds the command line's options by their field names (`calib_file`,
`seq_len`, `selector_options`, ...). Options given on the command line win over the
recipe's. Every output directory holds the `recipe.yaml` that produced it, written by
`recipe_of`, which `--config` reads back from anywhere.

One rule for paths: a relative path in a recipe is relative to the recipe's folder,
and a written recipe holds absolute paths. (A model that is not a path there, such as
a hub id or `smollm2-135m`, is kept as it is.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from lorp_fx.core.errors import ConfigError
from lorp_fx.core.files import read_text

# options that are not a recipe's: the command itself
NOT_OPTIONS = ("run", "command", "debug", "config")
# not written to a recipe: replacing an output is decided per run, on the command line, not replayed
NOT_WRITTEN = (*NOT_OPTIONS, "overwrite", "heal_resume")  # resuming is per run too
SWITCHES = ("overwrite", "no_gguf", "heal")
STRINGS = ("model", "out", "offload_dir", "max_memory", "device", "dtype", "heal_resume", "heal_checkpoint_dir")
PATHS = ("calib_file", "eval_file", "out", "offload_dir", "heal_file", "heal_resume", "heal_checkpoint_dir")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (where YAML lets the last one win)."""


def _mapping_without_duplicates(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"config file {loader.name}: option {key!r} is given twice (line "
                              f"{key_node.start_mark.line + 1}); give each option once")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML (or JSON) recipe as a dict, its relative paths resolved from its folder; ConfigError with one
    line for a missing or malformed file, or a key given twice."""
    path = Path(path).expanduser()
    text = read_text(path, "config file", ConfigError)
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{at}: {getattr(error, 'problem', None) or error}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values, not a {type(data).__name__}")
    return data


def merge_recipe(options: dict[str, Any], path: str | os.PathLike, given: set[str], several_eval_files: bool) -> dict[str, Any]:
    """`options` (the command line's, by field name) with the recipe's values where the command line did not
    give the option (`given`). Unknown options and values of the wrong type are refused, naming the file."""
    recipe = read_recipe(path)
    known = set(options) - set(NOT_OPTIONS)
    unknown = sorted(set(recipe) - known - {"selector_options"})
    if unknown:
        raise ConfigError(f"config file {path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    check_types(path, recipe, several_eval_files)
    folder = Path(path).expanduser().resolve().parent
    merged = dict(options)
    # A recipe that says `heal: false` records every option of a run that did not heal, the healing ones included
    # (at that version's defaults): those are inert, unless --heal on the command line turns healing on.
    inert = recipe.get("heal") is False and "heal" not in given
    for key, value in recipe.items():
        if key not in given and not (inert and key.startswith("heal_")):
            merged[key] = _resolved(key, value, folder)
    for key in ("calib_file", "heal_file"):  # lists of paths, as their flags give them
        value = merged.get(key)
        if value is not None:
            merged[key] = [Path(p) for p in ([value] if isinstance(value, (str, Path)) else value)]
    evaluation = merged.get("eval_file")
    if isinstance(evaluation, list) and not several_eval_files:
        merged["eval_file"] = evaluation[0] if len(evaluation) == 1 else evaluation
    if merged.get("eval_file") is not None:
        value = merged["eval_file"]
        merged["eval_file"] = [Path(p) for p in value] if isinstance(value, list) else Path(value)
    return merged


def _resolved(key: str, value, folder: Path):
    """A recipe's value with relative paths taken from the recipe's folder."""
    if value is None:
        return None
    if key in PATHS:  # an empty name stays empty, and is refused as such (`out: ""` from an unset variable)
        items = value if isinstance(value, list) else [value]
        resolved = [str(folder / Path(item).expanduser()) if str(item).strip() else item for item in items]
        return resolved if isinstance(value, list) else resolved[0]
    if key == "model":
        candidate = folder / Path(value).expanduser()
        return str(candidate) if candidate.exists() else value  # a hub id or a built-in name stays as it is
    return value


def check_types(path, recipe: dict, several_eval_files: bool) -> None:
    """ConfigError for a recipe value of the wrong type, which the flags' own parsing would have refused
    (a string where a switch is meant was taken as true: `overwrite: "no"` replaced an output)."""
    def refuse(key, what, value):
        raise ConfigError(f"config file {path}: {key} must be {what}, got {value!r}")

    for key, value in recipe.items():
        if key in SWITCHES and not isinstance(value, bool):
            refuse(key, "true or false", value)
        elif key in STRINGS and value is not None and not isinstance(value, str):
            refuse(key, "a string", value)
        elif key == "selector_options" and value is not None and not isinstance(value, dict):
            refuse(key, "a mapping of option names to values", value)
        elif key in ("calib_file", "eval_file", "heal_file") and value is not None:
            several = key != "eval_file" or several_eval_files
            items = value if isinstance(value, list) and several else [value]
            if not items or not all(isinstance(item, str) and item.strip() for item in items):
                refuse(key, "a file path" + (" or a list of them" if several else ""), value)


def given_on_command_line(argv: list[str]) -> set[str]:
    """The field names of the options that `argv` gives (`--seq-len 16` and `--seq-len=16` give seq_len)."""
    return {a.split("=", 1)[0][2:].replace("-", "_") for a in map(str, argv) if a.startswith("--")}


def recipe_of(options: dict[str, Any]) -> str:
    """Every option of a run as recipe YAML that `--config` reads back from any folder: paths absolute."""
    recipe = {}
    for key, value in options.items():
        if key in NOT_WRITTEN or callable(value):
            continue
        if key in PATHS and value is not None:
            value = [_absolute(v) for v in value] if isinstance(value, (list, tuple)) else _absolute(value)
        elif key == "model" and value is not None and Path(str(value)).expanduser().exists():
            value = _absolute(value)
        recipe[key] = value
    return yaml.safe_dump(json.loads(json.dumps(recipe, default=str)), sort_keys=True)


def _absolute(value) -> str:
    return str(Path(str(value)).expanduser().resolve())
