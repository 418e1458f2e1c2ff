"""Old parameter names that keep working, with a warning: for the config dataclasses and the env constructors.

A public name, once shipped, keeps working: a renamed field still accepts its old name, warns with a
``FutureWarning`` that names the new one, and the ``rlhf`` command accepts the old flag the same way.
Giving both names is an error.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TypeVar

__all__ = ["RENAMED_FIELDS", "renamed_fields"]

RENAMED_FIELDS = "_renamed_fields"
"""Class attribute holding ``{old_name: new_name}`` (read by the CLI to accept old flags)."""

T = TypeVar("T")


def renamed_fields(**renames: str) -> Callable[[type[T]], type[T]]:
    """Class decorator (a dataclass or any class whose __init__ takes keywords): ``@renamed_fields(old="new")`` maps
    keyword ``old`` to field ``new``."""

    def wrap(cls: type[T]) -> type[T]:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(f"{cls.__name__}: got both {old!r} and {new!r}; {old!r} is the old name of "
                                    f"{new!r}: pass {new!r} only")
                warnings.warn(f"{cls.__name__}.{old} was renamed to {new!r}: pass {new}= instead", FutureWarning,
                              stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        setattr(cls, RENAMED_FIELDS, {**getattr(cls, RENAMED_FIELDS, {}), **renames})
        return cls

    return wrap
