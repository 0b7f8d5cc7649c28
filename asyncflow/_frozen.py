"""A cheaper ``__init__`` for the frozen, slotted dataclasses the engine builds on every node.

A frozen dataclass's generated ``__init__`` stores each field with ``object.__setattr__(self, name,
value)`` (its own ``__setattr__`` refuses). :func:`quick_init` replaces it by one that calls each
slot's descriptor directly (``descriptor.__set__(self, value)``): the same values in the same slots,
about a third cheaper per record (a node's step builds several: its ``Step``, ``TaskInsert`` rows,
``StepResult`` and ``TaskInstanceRecord`` rows). Everything else stays the dataclass's: its signature
(names, defaults, keyword-only), ``__eq__``/``__hash__``/``__repr__``, ``FrozenInstanceError`` on
assignment, ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, TypeVar, cast

__all__ = ["quick_init"]

T = TypeVar("T")


def quick_init(cls: type[T]) -> type[T]:
    """Give the frozen, slotted dataclass ``cls`` an ``__init__`` that stores through its slots.

    Only for plain fields: a field with ``default_factory`` or ``init=False``, an ``InitVar`` or a
    ``__post_init__`` is refused (``TypeError``), as is a class that is not a frozen, slotted dataclass.
    """
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"quick_init() needs a frozen dataclass with slots, got {cls.__qualname__}")
    generated = cls.__dict__["__init__"]
    all_fields = dataclasses.fields(cast(Any, cls))
    init_names = [f.name for f in all_fields if f.init]
    if hasattr(cls, "__post_init__") or list(inspect.signature(generated).parameters)[1:] != init_names:
        raise TypeError(f"quick_init(): {cls.__qualname__} has __post_init__ or an InitVar")
    namespace: dict[str, Any] = {}
    positional: list[str] = []
    keywords: list[str] = []
    body: list[str] = []
    for f in all_fields:
        if not f.init or f.default_factory is not dataclasses.MISSING:
            raise TypeError(f"quick_init(): field {cls.__qualname__}.{f.name} needs the dataclass's __init__")
        namespace[f"_set_{f.name}"] = cls.__dict__[f.name].__set__
        param = f.name
        if f.default is not dataclasses.MISSING:
            namespace[f"_default_{f.name}"] = f.default
            param = f"{f.name}=_default_{f.name}"
        (keywords if f.kw_only else positional).append(param)
        body.append(f"    _set_{f.name}(self, {f.name})\n")
    signature = ", ".join(["self", *positional, *(["*", *keywords] if keywords else [])])
    source = f"def __init__({signature}) -> None:\n" + ("".join(body) or "    pass\n")
    exec(source, namespace)  # as dataclasses builds the __init__ it replaces
    init = namespace["__init__"]
    init.__qualname__ = generated.__qualname__
    init.__module__ = cls.__module__
    init.__annotations__ = dict(generated.__annotations__)
    init.__doc__ = generated.__doc__
    cls.__init__ = init  # type: ignore[method-assign]
    return cls
