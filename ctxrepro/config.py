"""Params: `params.yaml` sections parsed once, at the edge, into typed frozen dataclasses.

Every section of params.yaml is named like its DVC stage. Fields are declared with
`param(...)`, which records the allowed range or choices; parsing refuses unknown keys, wrong types and
out-of-range values with a message that names the section, key, value and what is allowed.

YAML is read as DVC writes it, YAML 1.2 style for floats: `1e-5`, `1E-3`, `.5` and `-2e+0` are numbers
(PyYAML's YAML 1.1 would make the first two strings, and `dvc exp run -S pretrain.lr=1e-5` writes
exactly that). NaN and infinities are refused unless a field allows them; an empty (null) section is an
error, never a silent fall-back to the code's defaults.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


# Every whole number in params (counts, sizes, seeds) is at most this, whatever its own rule: a count
# beyond it is a typo, not a budget, and would overflow the int32 tensors and loops it feeds.
COUNT_MAX = 2**31 - 1


class ParamsError(ValueError):
    """A params file or override that cannot be used: the message says which key and why."""


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's float syntax (exponent without a dot, sign optional)."""


Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"),
    list("-+0123456789."))


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=Yaml12Loader)


def param(default: Any, *, min: float | None = None, max: float | None = None,
          choices: tuple | list | None = None, nonfinite: bool = False, refers: str | None = None,
          help: str = "") -> Any:
    """A dataclass field carrying its validation rule; lists become tuples so dataclasses stay frozen.

    `nonfinite=True` lets a float field hold NaN or an infinity (none does today). `refers="section.key"`:
    the value (each item, for a list) must be a key of that mapping in the same params file
    (`check_references`).
    """
    if isinstance(default, list):
        default = tuple(default)
    if max is None and isinstance(default, int) and not isinstance(default, bool):
        max = COUNT_MAX  # shown by `ctxrepro params`; `_check_scalar` holds every int to it anyway
    meta = {"min": min, "max": max, "choices": tuple(choices) if choices is not None else None,
            "nonfinite": nonfinite, "refers": refers, "help": help}
    if dataclasses.is_dataclass(default) or isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class BaseParams:
    """What every stage shares (section `base`)."""

    seed: int = param(0, min=0, help="the one seed every per-stage and per-worker seed derives from")
    device: str = param("auto", choices=("auto", "cpu", "cuda"), help="auto picks cuda when available")
    workers: int = param(2, min=0, max=256, help="default worker processes for data loading")
    threads: int = param(0, min=0, max=1024,
                         help="torch CPU threads per process; 0 = torch's default. CPU results depend on it "
                              "(reduction order), so a fixed value makes reruns bit-identical")
    runtime: str = param("local", choices=("local", "docker"),
                         help="docker: rerun each stage inside the project image (ctxrepro docker build first)")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_scalar(tp: Any, value: Any, where: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > COUNT_MAX:
                raise ParamsError(f"{where}: {value!r} is too large: a whole number in params is at most "
                                  f"{COUNT_MAX} (2^31 - 1)")
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, str):
            return Path(value)
    elif tp is Any:
        return value
    else:
        raise ParamsError(f"{where}: unsupported field type {tp!r}")
    raise ParamsError(f"{where}: {value!r} is a {type(value).__name__}, expected {_type_name(tp)}")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(a, value, where)
            except ParamsError as e:
                errors.append(str(e))
        raise ParamsError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {inner}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: {value!r} is a {type(value).__name__}, expected a list")
        args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [Any]
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: {value!r} is a {type(value).__name__}, expected a mapping")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_coerce(kt, k, where): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, value, where)
    return _check_scalar(tp, value, where)


def _check_range(f: dataclasses.Field, value: Any, where: str) -> None:
    lo, hi, choices = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("choices")
    items = value if isinstance(value, tuple) else (value,)
    for v in items:
        if v is None:
            continue
        if isinstance(v, float) and not math.isfinite(v) and not f.metadata.get("nonfinite"):
            raise ParamsError(f"{where}: {v!r} is not a finite number")
        if choices is not None and v not in choices:
            raise ParamsError(f"{where}: {v!r} is not allowed; choose one of {', '.join(map(repr, choices))}")
        if lo is not None and v < lo:
            raise ParamsError(f"{where}: {v!r} is below the minimum {lo}")
        if hi is not None and v > hi:
            raise ParamsError(f"{where}: {v!r} is above the maximum {hi}")


def parse_dataclass(cls: type, data: Any, section: str) -> Any:
    """Build a frozen `cls` from a mapping: unknown keys, wrong types and out-of-range values are errors."""
    if data is None:
        raise ParamsError(f"section '{section}' is empty (null): give its keys, or remove it where it may be "
                          "left out; an empty section would silently take the code's defaults")
    if not isinstance(data, dict):
        raise ParamsError(f"section '{section}': expected a mapping of keys, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(f"section '{section}': unknown key '{unknown[0]}' (known keys: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        where = f"{section}.{name}"
        coerced = _coerce(hints[name], value, where)
        _check_range(fields[name], coerced, where)
        values[name] = coerced
    try:
        obj = cls(**values)
    except ParamsError:  # a nested section's own message already names its key
        raise
    except (TypeError, ValueError) as e:
        raise ParamsError(f"section '{section}': {e}") from e
    return obj


def load_yaml(path: Path | str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {path} not found (run from the repository root or pass --params)")
    try:
        data = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"params file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ParamsError(f"params file {path}: expected a mapping of sections at the top level")
    return data


def apply_overrides(data: dict, sets: list[str] | tuple[str, ...]) -> dict:
    """Apply `section.key=value` overrides (values parsed as YAML, like `dvc exp run -S`); returns a copy."""
    import copy

    out = copy.deepcopy(data)
    for item in sets:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ParamsError(f"--set {item!r}: expected section.key=value")
        try:
            value = yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ParamsError(f"--set {item!r}: value is not valid YAML: {e}") from e
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ParamsError(f"--set {item!r}: '{p}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def to_plain(obj: Any) -> Any:
    """A dataclass as plain YAML/JSON-able data (for logs and checkpoints)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def load_params(path: Path | str, section: str, cls: type, sets: list[str] | tuple[str, ...] = ()):
    """Parse `base` and `section` of a params file after overrides: returns (BaseParams, cls instance)."""
    data = apply_overrides(load_yaml(path), sets)
    for item in sets:
        top = item.partition("=")[0].split(".")[0]
        if top not in ("base", section):
            raise ParamsError(f"--set {item!r}: stage '{section}' reads only sections 'base' and '{section}'")
    base = parse_dataclass(BaseParams, data.get("base", {}), "base")
    if section not in data:
        raise ParamsError(f"params file {path} has no section '{section}'")
    params = parse_dataclass(cls, data.get(section), section)
    check_references(params, data, section)
    return base, params


def check_references(obj: Any, data: dict, where: str) -> None:
    """Refuse a value naming a key another section does not have (a `refers` field, nested dataclasses and
    mappings of them included), naming the key and the allowed values. A referred section the file does
    not hold is not checked."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{where}.{f.name}"
        target = f.metadata.get("refers")
        if target is not None:
            section, _, name = target.partition(".")
            allowed = (data.get(section) or {}).get(name) if isinstance(data.get(section), dict) else None
            if isinstance(allowed, dict):
                for v in value if isinstance(value, tuple) else (value,):
                    if v not in allowed:
                        raise ParamsError(f"{key}: {v!r} is not a `{target}` key: choose one of "
                                          f"{', '.join(map(str, allowed))}")
        if dataclasses.is_dataclass(value):
            check_references(value, data, key)
        elif isinstance(value, dict):
            for k, v in value.items():
                if dataclasses.is_dataclass(v):
                    check_references(v, data, f"{key}.{k}")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; asking for cuda without one is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ParamsError("base.device: 'cuda' was asked for but no CUDA device is visible; use auto or cpu")
    return device
