"""A cheaper ``__init__`` for the frozen, slotted dataclasses the engine builds on every node.

A frozen dataclass's generated ``__init__`` stores each field with ``object.__setattr__(self, name,
value)`` (its own ``__setattr__`` refuses). :func:`quick_init` replaces it by one that calls each
slot's descriptor directly (``descriptor.__set__(self, value)``): the same values in the same slots,
about a third cheaper per record (a node's step builds several: its ``Step``, ``TaskInsert`` rows,
``StepResult`` and ``TaskInstanceRecord`` rows). Everything else stays the dataclass's: its signature
(names, defaults, keyword-only), ``__eq__``/``__hash__``/``__repr__``, ``FrozenInstanceError`` on
assignment, ``dataclasses.replace``.

:func:`positional` makes, for such a class, a plain function that takes every field positionally, in
declaration order, and fills the slots the same way. Python builds an instance called with keywords
through a ``**kwargs`` dict (``type.__call__`` to the ``__init__`` slot): about 0.7 us more per record
than a positional call on the reference machine. The engine and the stores build their records on a
node's hot path through these factories; users keep the keyword-only constructors. A factory fills
the slots of a plain twin class and then assigns the instance its record class (see :func:`positional`).
"""

from __future__ import annotations

import dataclasses
import inspect
import sysconfig
from typing import Any, TypeVar, cast

__all__ = ["positional", "quick_init"]

T = TypeVar("T")


def _plain_fields(cls: type, who: str) -> tuple[dataclasses.Field[Any], ...]:
    """The fields of ``cls`` if it is a frozen, slotted dataclass whose ``__init__`` only stores each
    field (no ``default_factory``, ``init=False``, ``InitVar`` or ``__post_init__``); else ``TypeError``."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{who}() needs a frozen dataclass with slots, got {cls.__qualname__}")
    all_fields = dataclasses.fields(cast(Any, cls))
    init_names = [f.name for f in all_fields if f.init]
    generated = cls.__dict__["__init__"]
    if hasattr(cls, "__post_init__") or list(inspect.signature(generated).parameters)[1:] != init_names:
        raise TypeError(f"{who}(): {cls.__qualname__} has __post_init__ or an InitVar")
    for f in all_fields:
        if not f.init or f.default_factory is not dataclasses.MISSING:
            raise TypeError(f"{who}(): field {cls.__qualname__}.{f.name} needs the dataclass's __init__")
    return all_fields


def quick_init(cls: type[T]) -> type[T]:
    """Give the frozen, slotted dataclass ``cls`` an ``__init__`` that stores through its slots.

    Only for plain fields: a field with ``default_factory`` or ``init=False``, an ``InitVar`` or a
    ``__post_init__`` is refused (``TypeError``), as is a class that is not a frozen, slotted dataclass.
    """
    all_fields = _plain_fields(cls, "quick_init")
    generated = cls.__dict__["__init__"]
    namespace: dict[str, Any] = {}
    positional: list[str] = []
    keywords: list[str] = []
    body: list[str] = []
    for f in all_fields:
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


def positional(cls: type[T]) -> Any:
    """A function ``(field1, field2, ...) -> cls`` taking every field of the frozen, slotted dataclass
    ``cls`` positionally (no defaults: each is passed), in declaration order.

    The instance is the one ``cls(**fields)`` builds (equal, same slots), without its ``__init__``: the
    caller passes values of the declared types (the factory checks nothing). The caller types the
    result (``Callable[[...], cls]``), so that mypy checks each call's arguments.

    Where ``cls`` holds all its slots itself (its base is ``object``), the factory fills them on an
    instance of a plain twin class with the same slots, then gives it the class ``cls`` (``__class__``
    assignment, which Python allows between classes of one slot layout). A plain attribute store is a
    specialized bytecode; a descriptor's ``__set__`` is a call. A ``TaskInstanceRecord`` (10 fields)
    took 0.59-0.66 us this way against 0.91-1.48 us through the descriptors (``timeit``, one machine).
    Elsewhere it calls each slot's descriptor, as :func:`quick_init` does, and so on a free-threaded
    build (where a ``__class__`` assignment may stop every thread).

    Each such assignment raises the audit event ``object.__setattr__`` (``sys.addaudithook``): a hook
    sees one per record built. A hook that refuses the assignment when the factories are made (at
    import) gets the descriptor factories; one added later and refusing it would refuse every record."""
    names = [f.name for f in _plain_fields(cls, "positional")]
    make = _twin_factory(cls, names) or _descriptor_factory(cls, names)
    make.__qualname__ = make.__name__ = f"new_{cls.__name__}"
    make.__module__ = cls.__module__
    return make


def _descriptor_factory(cls: type, names: list[str]) -> Any:
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    for name in names:  # a slot's descriptor is in the class that declares it (a base, maybe)
        owner = next(klass for klass in cls.__mro__ if name in klass.__dict__)
        namespace[f"_set_{name}"] = owner.__dict__[name].__set__
    body = "".join(f"    _set_{name}(self, {name})\n" for name in names)
    source = f"def make({', '.join(names)}):\n    self = _new(_cls)\n{body}    return self\n"
    exec(source, namespace)  # as dataclasses builds an __init__
    return namespace["make"]


def _twin_factory(cls: type, names: list[str]) -> Any:
    """The twin-class factory of :func:`positional`, or ``None`` where ``cls``'s layout has no twin."""
    slots = cls.__dict__.get("__slots__")
    if cls.__bases__ != (object,) or not isinstance(slots, tuple) or sorted(slots) != sorted(names):
        return None
    if sysconfig.get_config_var("Py_GIL_DISABLED"):  # there a __class__ assignment may stop every thread
        return None
    twin = type(f"_{cls.__name__}Twin", (), {"__slots__": slots, "__module__": cls.__module__})
    try:  # Python refuses the assignment unless the two layouts are the same
        trial: Any = object.__new__(twin)
        trial.__class__ = cls
    except Exception:  # a different layout (TypeError), or an audit hook that refuses it
        return None
    namespace: dict[str, Any] = {"_new": object.__new__, "_twin": twin, "_cls": cls}
    body = "".join(f"    self.{name} = {name}\n" for name in names)
    head = f"def make({', '.join(names)}):\n    self = _new(_twin)\n"
    source = f"{head}{body}    self.__class__ = _cls\n    return self\n"
    exec(source, namespace)  # as dataclasses builds an __init__
    return namespace["make"]
