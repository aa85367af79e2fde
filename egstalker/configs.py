"""Dataclass configs saved as JSON next to every output, and loaded back without eval()."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import typing
from pathlib import Path
from typing import Any, TypeVar

from egstalker.errors import EgstalkerError

T = TypeVar("T")


def to_dict(config: Any) -> dict:
    """A JSON-ready dict of a (possibly nested) dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def from_dict(cls: type[T], data: dict, *, source: str = "config") -> T:
    """Build `cls` from a dict, recursing into nested dataclasses; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise EgstalkerError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; valid keys: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise EgstalkerError(f"{source}.{key} must be an object of {hint.__name__}'s keys, not {value!r}")
            value = from_dict(hint, value, source=f"{source}.{key}")
        else:
            value = _checked(value, hint, f"{source}.{key}")
        kwargs[key] = value
    return cls(**kwargs)


def _checked(value: Any, hint: Any, where: str) -> Any:
    """`value` as the type `hint` names (int, float, bool, str, X | None, tuple[X, ...]); a clear error otherwise.
    Other hints are passed through unchecked."""
    args = typing.get_args(hint)
    if type(None) in args:  # X | None
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        return _checked(value, rest[0], where) if len(rest) == 1 else value
    if typing.get_origin(hint) is tuple and args and args[-1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise EgstalkerError(f"{where} must be a list, not {value!r}")
        return tuple(_checked(item, args[0], f"{where}[{k}]") for k, item in enumerate(value))
    kinds = {bool: ("true or false", lambda v: isinstance(v, bool)),
             int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
             float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
             str: ("a string", lambda v: isinstance(v, str))}
    if hint not in kinds:
        return value
    name, ok = kinds[hint]
    if not ok(value):
        raise EgstalkerError(f"{where} must be {name}, not {value!r}")
    return float(value) if hint is float else value


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file through a temporary name and rename it, so readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_config(config: Any, path: str | os.PathLike) -> None:
    atomic_write_text(path, json.dumps(to_dict(config), indent=2) + "\n")


def load_config(cls: type[T], path: str | os.PathLike) -> T:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EgstalkerError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise EgstalkerError(f"config file {path} is not valid JSON ({e}); fix or delete it") from None
    except OSError as e:
        raise EgstalkerError(f"config file {path} cannot be read ({e.strerror}); pass a JSON file") from None
    if not isinstance(data, dict):
        raise EgstalkerError(f"config file {path} must hold a JSON object of {cls.__name__}'s keys")
    return from_dict(cls, data, source=str(path))
