"""One validation layer for what is read from disk or given as a flag: typed field getters that fail as one
line naming the file and the field, number checks for flags, and a size check before anything large is
allocated (docs/design.md). Imports nothing heavy."""

from __future__ import annotations

import math
from typing import Any

from gprebn_edge.errors import ArtifactError, GprebnError, InputError

__all__ = ["MISSING", "field", "check", "require", "optional", "number", "int_list", "number_list", "flag_number",
           "check_size", "check_preprocess", "MAX_BYTES", "oneline"]

MISSING: Any = object()
MAX_BYTES = 16 << 30  # the most one read may allocate before it is refused (16 GiB)
_REMAKE = "re-create it with `gprebn-edge adapt` (info --json shows what it holds)"
_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
          bool: "true or false", type(None): "null"}


def oneline(e: BaseException | str, limit: int = 200, typed: bool = False) -> str:
    """The first line of an exception's message (or its type), cut at a word boundary with an ellipsis;
    `typed`: as "Type: first line" (for a foreign library's error, whose type says what went wrong)."""
    text = str(e).strip()
    text = text.splitlines()[0] if text else type(e).__name__
    if typed and str(e).strip() and isinstance(e, BaseException):
        text = f"{type(e).__name__}: {text}"
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    name = _NAMES.get(type(value), type(value).__name__)
    shown = repr(value)
    return f"{name} ({shown[:40]}{'...' if len(shown) > 40 else ''})"


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    kinds = _kinds(kind)
    if isinstance(value, bool) and bool not in kinds and object not in kinds:  # true is not a number in metadata
        return False
    if isinstance(value, int) and float in kinds:
        return True
    return isinstance(value, kinds)


def _expected(kind: type | tuple[type, ...]) -> str:
    return " or ".join(_NAMES.get(k, k.__name__) for k in _kinds(kind))


def field(obj: Any, name: str, kind: type | tuple[type, ...], where: object, *, default: Any = MISSING,
          error: type[GprebnError] = ArtifactError, fix: str = _REMAKE, prefix: str = "") -> Any:
    """obj[a][b]... for name "a.b", checked to be of `kind`. A missing field returns `default`, or fails when
    there is none; a field of the wrong type always fails. Messages: "<where>: its metadata field 'a.b' is ...,
    expected ...: <fix>", the field named as `prefix` + name (for fields inside lists, or keys with dots)."""
    value = obj
    parts = name.split(".")
    for i, part in enumerate(parts):
        if not isinstance(value, dict):
            parent = prefix + ".".join(parts[:i]) if i or prefix else "metadata"
            raise error(f"{where}: its metadata field '{parent}' is {_describe(value)}, expected an object: {fix}")
        if part not in value:
            if default is not MISSING:
                return default
            raise error(f"{where}: its metadata lacks the field '{prefix}{name}': {fix}")
        value = value[part]
    return check(value, prefix + name, kind, where, error=error, fix=fix)


def check(value: Any, label: str, kind: type | tuple[type, ...], where: object, *,
          error: type[GprebnError] = ArtifactError, fix: str = _REMAKE) -> Any:
    """`value` (the metadata field `label`) checked to be of `kind`, and finite where it is a float."""
    if not _is(value, kind):
        raise error(f"{where}: its metadata field '{label}' is {_describe(value)}, expected "
                    f"{_expected(kind)}: {fix}")
    if isinstance(value, float) and not math.isfinite(value):
        raise error(f"{where}: its metadata field '{label}' is {value}, expected a finite number: {fix}")
    return value


def require(obj: Any, name: str, kind: type | tuple[type, ...], where: object, **kw: Any) -> Any:
    """field() with no default: the field must be there."""
    return field(obj, name, kind, where, **kw)


def optional(obj: Any, name: str, kind: type | tuple[type, ...], where: object, **kw: Any) -> Any:
    """field() that may be absent or null (None then)."""
    return field(obj, name, (*_kinds(kind), type(None)), where, default=None, **kw)


def number(obj: Any, name: str, where: object, *, low: float | None = None, positive: bool = False,
           integer: bool = False, **kw: Any) -> Any:
    """A finite number field (an integer with `integer`), at least `low`, above 0 with `positive`."""
    value = field(obj, name, int if integer else float, where, **kw)
    if value is None or value is kw.get("default", MISSING):
        return value
    fix = kw.get("fix", _REMAKE)
    error = kw.get("error", ArtifactError)
    if (positive and value <= 0) or (low is not None and value < low):
        bound = "positive" if positive else f"at least {low}"
        raise error(f"{where}: its metadata field '{name}' is {value!r}, expected a {bound} number: {fix}")
    return value


def _list(obj: Any, name: str, where: object, kind: type, length: int | None, **kw: Any) -> list[Any] | None:
    value = field(obj, name, list, where, **kw)
    if value is None or value is kw.get("default", MISSING):
        return value
    fix = kw.get("fix", _REMAKE)
    error = kw.get("error", ArtifactError)
    if length is not None and len(value) != length:
        raise error(f"{where}: its metadata field '{name}' has {len(value)} values, expected {length}: {fix}")
    for i, item in enumerate(value):
        if not _is(item, kind) or (isinstance(item, float) and not math.isfinite(item)):
            raise error(f"{where}: its metadata field '{name}[{i}]' is {_describe(item)}, expected "
                        f"{'a finite number' if kind is float else _expected(kind)}: {fix}")
    return value


def int_list(obj: Any, name: str, where: object, length: int | None = None, **kw: Any) -> list[int] | None:
    """A list of integers."""
    return _list(obj, name, where, int, length, **kw)


def number_list(obj: Any, name: str, where: object, length: int | None = None, **kw: Any) -> list[float] | None:
    """A list of finite numbers."""
    return _list(obj, name, where, float, length, **kw)


def check_preprocess(meta: Any, where: object, fix: str = _REMAKE) -> dict[str, Any] | None:
    """meta["preprocess"], where present: resize and crop positive integers or null, mean and std three finite
    numbers (std positive)."""
    pre = optional(meta, "preprocess", dict, where, fix=fix)
    if pre is None:
        return None
    for key in ("resize", "crop"):
        if optional(meta, f"preprocess.{key}", int, where, fix=fix) is not None:
            number(meta, f"preprocess.{key}", where, positive=True, integer=True, fix=fix)
    number_list(meta, "preprocess.mean", where, 3, fix=fix)
    if any(v <= 0 for v in number_list(meta, "preprocess.std", where, 3, fix=fix) or []):
        raise ArtifactError(f"{where}: its metadata field 'preprocess.std' holds a value <= 0: {fix}")
    return pre


def flag_number(value: float | None, flag: str, *, low: float | None = None, high: float | None = None,
                positive: bool = False, below_high: bool = False) -> None:
    """A numeric command-line flag: finite, and within its range (InputError naming the flag otherwise)."""
    if value is None:
        return
    if not math.isfinite(value):
        raise InputError(f"{flag} must be a finite number, got {value}")
    if positive and value <= 0:
        raise InputError(f"{flag} must be positive, got {value:g}")
    if low is not None and value < low:
        raise InputError(f"{flag} must be at least {low:g}, got {value:g}")
    if high is not None and (value > high or (below_high and value >= high)):
        raise InputError(f"{flag} must be {'below' if below_high else 'at most'} {high:g}, got {value:g}")


def _human(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError


def check_size(nbytes: int, what: str, fix: str, *, limit: int = MAX_BYTES) -> None:
    """Refuse, before allocating, a read that needs more than `limit` bytes; the message gives the number."""
    if nbytes > limit:
        raise InputError(f"{what} needs {_human(nbytes)} of memory (more than the {_human(limit)} allowed): {fix}")
