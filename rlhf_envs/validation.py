"""One check of settings' types and finiteness, shared by every config dataclass and env constructor.

:func:`check_config_fields` reads a dataclass's type hints: a ``float`` field takes any real
number (``int``, ``float``, NumPy scalars) that is finite, an ``int`` field any integral type
(NumPy integers included, ``bool`` excluded), a ``bool`` field a ``bool``, a ``str`` field a
``str``; ``X | None`` also takes ``None``. Values are normalised to the plain Python type, so
``config.json`` stays JSON. Fields of other types are left to the config's own checks. Errors
name the field, the value, the type expected and the fix, and come before anything runs.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from typing import Any

__all__ = ["check_config_fields", "check_number"]


def check_number(value: Any, name: str, kind: type = float, optional: bool = False) -> Any:
    """``value`` as a plain ``float`` (finite) or ``int`` (``kind``), ``None`` if ``optional``; else raise.

    ``TypeError`` for the wrong type (a ``str`` such as ``"0.1"``, a ``bool``), ``ValueError`` for NaN or inf.
    """
    if value is None and optional:
        return None
    expected = "a finite number" if kind is float else "an integer"
    expected += " or None" if optional else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real if kind is float else numbers.Integral):
        hint = f"; pass {name.rsplit('.', 1)[-1]}={value}, not a string" if isinstance(value, str) else ""
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}{hint}")
    if kind is int:
        return int(value)
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}; pass a finite value")
    return value


def _field_kind(hint: Any) -> tuple[type | None, bool]:
    """``(float | int | bool | str | None, optional)`` for a type hint; ``None`` for types checked elsewhere."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            return None, optional
        hint = args[0]
    return (hint if hint in (float, int, bool, str) else None), optional


def check_config_fields(config: Any) -> None:
    """Check (and normalise in place) every ``float``/``int``/``bool``/``str`` field of the dataclass ``config``."""
    cls = type(config)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(config):
        kind, optional = _field_kind(hints.get(f.name))
        if kind is None:
            continue
        name = f"{cls.__name__}.{f.name}"
        value = getattr(config, f.name)
        if kind in (float, int):
            value = check_number(value, name, kind, optional)
        elif not (isinstance(value, kind) or (optional and value is None)):
            if kind is bool and type(value).__name__ == "bool_":  # numpy.bool_
                value = bool(value)
            else:
                raise TypeError(f"{name} must be {kind.__name__}{' or None' if optional else ''}, "
                                f"got {type(value).__name__} {value!r}")
        object.__setattr__(config, f.name, value)  # frozen dataclasses too
