"""``hybridmethod``: one name callable on the class (with an id) and on an instance (meaning itself)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class hybridmethod(Generic[P, R]):  # noqa: N801 - lowercase like the builtin decorators
    """``Snapshot.delete("id")`` and ``snap.delete()`` are both natural; the wrapped function receives
    the instance, or the class when called on the class, as its first argument."""

    def __init__(self, func: Callable[Concatenate[Any, P], R]) -> None:
        self.func = func
        functools.update_wrapper(self, func)  # type: ignore[arg-type]

    def __get__(self, obj: object | None, objtype: type | None = None) -> Callable[P, R]:
        return functools.partial(self.func, obj if obj is not None else objtype)
