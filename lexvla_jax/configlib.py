"""Config files and `--config.a.b=value` overrides.

A config is a Python file with `get_config(arg=None) -> ml_collections.ConfigDict` (big_vision style),
named on the command line as `path/to/file.py` or `path/to/file.py:arg`. Overrides are checked against
the loaded config before any JAX work: an unknown key or a value of the wrong type is one line naming
the key and the closest existing keys.

Why not `ml_collections.config_flags.DEFINE_config_file`: it needs absl's global flag parsing (each
`lexvla <command>` has its own argparse options), and an unknown override is an absl traceback with no
suggestion. The file format and the `--config.a.b=value` syntax are the same as config_flags', so big_vision-
style config files work unchanged; what this module adds is the early, one-line error with the closest keys.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from collections.abc import Iterable, Sequence

import ml_collections


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message is one line."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of `error`'s message (its type name when empty), cut to `limit` characters: what a
    one-line error quotes of a library's long exception."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `file.py[:arg]` and returns `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist; pass e.g. --config configs/tiny.py")
    module_name = "lexvla_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config(arg=None)")
    config = module.get_config(arg or None)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"get_config in {path!r} must return an ml_collections.ConfigDict")
    return config


def variant_base(variant_file: str, arg: str | None) -> ml_collections.ConfigDict:
    """The config a variant file modifies: `bases.py` beside it, called with the variant's `:arg` (the config files
    of a project name their bases; e.g. configs/variants/bases.py: "paper" by default, or "tiny")."""
    bases = os.path.join(os.path.dirname(os.path.abspath(variant_file)), "bases.py")
    return load_config_file(f"{bases}:{arg}" if arg else bases)


def swap_vision_tower(config: ml_collections.ConfigDict, tower: str, preset: str) -> None:
    """Makes a variant's image tower `tower` (`models/vision.py`): `preset` where the base names a released size (the
    paper config), else the base's own widths (the tiny config), its FFN width spelled as CLIP and SigLIP spell it."""
    vision = config.model.vision
    if vision.get("preset"):
        config.model.vision = ml_collections.ConfigDict({"tower": tower, "preset": preset})
        return
    fields = {k: v for k, v in vision.items() if k not in ("tower", "mlp_ratio", "pos_interpolation")}
    fields["intermediate_size"] = int(vision.hidden_size * vision.get("mlp_ratio", 4.0))
    config.model.vision = ml_collections.ConfigDict({"tower": tower, **fields})


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted leaf and node keys of a config."""
    keys = []
    for name, value in config.items():
        key = f"{prefix}{name}"
        keys.append(key)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, key + "."))
    return keys


def _parse_value(key: str, text: str, current):
    """Parses `text` to the type of `current` (the existing value)."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}={text}: expected a bool (true/false)")
    if isinstance(current, str):
        return text
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--config.{key}={text}: expected an int") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--config.{key}={text}: expected a float") from None
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"--config.{key}: is a group of settings; set one of its fields instead")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ConfigError(f"--config.{key}={text}: expected a {type(current).__name__} literal") from None
    if current is not None and isinstance(current, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            value = (value,)
        return type(current)(value)
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Applies `a.b=value` strings (without the `--config.` prefix) to `config` in place."""
    keys = flat_keys(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--config.{key}: missing '=value'")
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise ConfigError(f"--config.{key}: no such config key{hint}")
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = _parse_value(key, text, node[leaf])
    return config


def split_config_args(argv: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
    """Separates `--config FILE`, `--config.x=y` overrides and the remaining args."""
    config_spec, overrides, rest = None, [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a file, e.g. --config configs/tiny.py")
            config_spec = args[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config_spec = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            body = arg[len("--config.") :]
            if "=" not in body and i + 1 < len(args) and not args[i + 1].startswith("--"):
                body = f"{body}={args[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return config_spec, overrides, rest


def load_config(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Loads a config file and applies overrides."""
    return apply_overrides(load_config_file(spec), overrides)


def parse_command(argv: Sequence[str], parser) -> tuple[ml_collections.ConfigDict, object]:
    """A command's `--config FILE[:arg]`, its `--config.a.b=value` overrides and the parser's own flags."""
    spec, overrides, rest = split_config_args(argv)
    args = parser.parse_args(rest)
    if spec is None:
        parser.error("--config is required, e.g. --config configs/tiny.py")
    return load_config(spec, overrides), args
