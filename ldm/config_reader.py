"""Reading yaml data into frozen dataclasses, strictly: the machinery under ldm/config.py.

Field names are the original parameter names, so a yaml the original accepts parses, and a misspelled key
fails loudly (naming the yaml path and the file) instead of being eaten by `**ignore_kwargs`. Annotations drive
the checks: unions try each member, lists become tuples, mappings become nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """A config file that cannot be read into the config dataclasses."""


def convert(tp: Any, value: Any, where: str, src: str) -> Any:
    """Check `value` against the annotation `tp`; lists become tuples, mappings become dataclasses."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(arg, value, where, src)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where, src)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{src}: {where} must be a list, got {value!r}")
        return tuple(convert(args[0], v, f"{where}[{i}]", src) for i, v in enumerate(value))
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, Mapping),
    }[tp]
    if not ok:
        raise ConfigError(f"{src}: {where} must be of type {tp.__name__}, got {value!r}")
    if tp is float and not math.isfinite(value):  # .nan / .inf parse as floats; none is a valid setting
        raise ConfigError(f"{src}: {where} must be a finite number, got {value!r}")
    return float(value) if tp is float else dict(value) if tp is dict else value


def build(cls: type, data: Any, where: str, src: str, **given: Any) -> Any:
    """Build dataclass `cls` from a mapping; unknown and missing fields name the yaml path and the file."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{src}: {where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in given]
    for key in data:
        if key not in names:
            raise ConfigError(f"{src}: unknown field {where}.{key!r} (expected one of: {', '.join(names)})")
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data and f.name not in given:
            raise ConfigError(f"{src}: missing required field {where}.{f.name}")
    kwargs = {k: convert(hints[k], v, f"{where}.{k}", src) for k, v in data.items()}
    return cls(**kwargs, **given)



def read_yaml(path: str | os.PathLike) -> Any:
    """The plain data of a yaml file as omegaconf reads it (incl. `1e-4` floats); only its `model` section is
    resolved (against the whole file): interpolations in data/lightning sections do not concern us."""
    from omegaconf import DictConfig, OmegaConf  # lazy: only needed for files

    try:
        conf = OmegaConf.load(os.fspath(path))
        if isinstance(conf, DictConfig) and "model" in conf:
            return {"model": OmegaConf.to_container(conf.model, resolve=True)}
        return OmegaConf.to_container(conf, resolve=True)
    except Exception as e:  # omegaconf/yaml syntax errors: name the file
        # yaml's messages span lines (problem mark, context mark): keep ours on one
        raise ConfigError(f"{os.fspath(path)}: cannot read yaml: {' '.join(str(e).split())}") from e
