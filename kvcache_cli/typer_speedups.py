"""Start-up speed: coerce plain CLI parameters without importing pydantic.

Typer (0.29) validates every non-flag parameter through a pydantic ``TypeAdapter``,
which imports pydantic at the first command run (about 80 ms, half of a bare Typer
app's start-up). kvcache's parameters are plain ``bool``, ``str``, ``int``, ``float`` and
``Path`` (and lists of them): for a well-formed value this module converts it
directly, exactly as the adapter would (same type, same ``min``/``max`` checks). Any
value it does not recognise (odd spelling, out of range, other annotations) is handed
to Typer's own pydantic path, so error messages and edge cases stay Typer's.

``install()`` patches ``typer.core._TyperParameter.get_runtime_param``; if that
internal is missing (another Typer version) it does nothing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, get_args, get_origin

_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_PATH_DEFAULTS = {
    "exists": False,
    "file_okay": True,
    "dir_okay": True,
    "writable": False,
    "readable": True,
    "resolve_path": False,
    "allow_dash": False,
    "path_type": None,
}
_SKIP = object()


def _plain(info: Any) -> bool:
    """No parser, clamp or formats: nothing beyond the type (and min/max) to apply."""
    return (
        getattr(info, "parser", None) is None
        and not getattr(info, "clamp", False)
        and getattr(info, "formats", None) is None
    )


def _leaf_converter(annotation: Any, info: Any) -> Any:
    """A function value -> converted value (or ``_SKIP``), or None when not handled."""
    low, high = getattr(info, "min", None), getattr(info, "max", None)

    def in_range(number: float) -> bool:
        return (low is None or number >= low) and (high is None or number <= high)

    if annotation is bool:
        return lambda v: v if isinstance(v, bool) else _SKIP
    if annotation is str and low is None and high is None:
        return lambda v: v if isinstance(v, str) else _SKIP
    if annotation is int:

        def to_int(v: Any) -> Any:
            if isinstance(v, bool):
                return _SKIP
            if isinstance(v, int):
                number = v
            elif isinstance(v, str) and _INT_RE.fullmatch(v):
                number = int(v)
            else:
                return _SKIP
            return number if in_range(number) else _SKIP

        return to_int
    if annotation is float:

        def to_float(v: Any) -> Any:
            if isinstance(v, bool):
                return _SKIP
            if isinstance(v, (int, float)):
                number = float(v)
            elif isinstance(v, str) and _FLOAT_RE.fullmatch(v):
                number = float(v)
            else:
                return _SKIP
            return number if in_range(number) else _SKIP

        return to_float
    if annotation is Path and low is None and high is None:
        if any(getattr(info, k, d) != d for k, d in _PATH_DEFAULTS.items()):
            return None
        return lambda v: Path(v) if isinstance(v, str) and v else (v if isinstance(v, Path) else _SKIP)
    return None


def _converter(annotation: Any, info: Any) -> Any:
    if not _plain(info):
        return None
    if get_origin(annotation) is list:
        args = get_args(annotation)
        leaf = _leaf_converter(args[0], info) if len(args) == 1 else None
        if leaf is None:
            return None

        def to_list(v: Any) -> Any:
            items = list(v) if isinstance(v, (list, tuple)) else [v]
            out = [leaf(item) for item in items]
            return _SKIP if any(item is _SKIP for item in out) else out

        return to_list
    return _leaf_converter(annotation, info)


def install() -> bool:
    """Patch Typer's parameter coercion (idempotent); False when Typer's internals differ."""
    try:
        from typer import core
        from typer._coercion import RuntimeParam
    except ImportError:
        return False
    param_class = getattr(core, "_TyperParameter", None)
    original = getattr(param_class, "get_runtime_param", None)
    if param_class is None or original is None or getattr(original, "_kvcache_fast", False):
        return False

    class FastRuntimeParam(RuntimeParam):  # type: ignore[misc]
        """Converts plain values itself; anything else goes to Typer's pydantic path."""

        _convert: Any
        _slow: Any

        def __init__(self, descriptor: Any, convert: Any, slow: Any) -> None:
            object.__setattr__(self, "parameter_info", descriptor.parameter_info)
            object.__setattr__(self, "annotation", descriptor.annotation)
            object.__setattr__(self, "_convert", convert)
            object.__setattr__(self, "_slow", slow)

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            result = self._convert(value)
            if result is _SKIP:
                return self._slow()._coerce_value(value, param=param, ctx=ctx)
            return result

    def get_runtime_param(self: Any) -> Any:
        if getattr(self, "_runtime_param", None) is None:
            descriptor: Any = getattr(self, "type_descriptor", None)
            convert = None
            if descriptor is not None and getattr(descriptor, "file_annotation", None) is None:
                convert = _converter(descriptor.annotation, descriptor.parameter_info)
            if convert is not None:
                from typer._coercion import build_runtime_param

                slow_cache: list[Any] = []

                def slow() -> Any:
                    if not slow_cache:
                        slow_cache.append(build_runtime_param(descriptor))
                    return slow_cache[0]

                self._runtime_param = FastRuntimeParam(descriptor, convert, slow)
        return original(self)

    get_runtime_param._kvcache_fast = True  # type: ignore[attr-defined]
    param_class.get_runtime_param = get_runtime_param
    return True
