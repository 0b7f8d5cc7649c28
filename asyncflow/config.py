"""Workflow configs: the Go JSON shape as frozen dataclasses.

A config is what users write (``WorkflowConfig`` with ``NodeConfig`` entries, or the Go JSON)::

    {"id": "order", "name": "Order", "nodes": [
        {"id": "pay", "name": "Pay", "next_nodes": ["ship"], "fail_max_count": 3, "max_wait_time_ts": null},
        {"id": "ship", "name": "Ship", "next_nodes": null}]}

Constructing a config checks field types only (a ``bool`` is not an int, ``next_nodes`` is not a bare
string, counts are not negative). The graph rules (ids, edges, cycles, workers) are checked when the config
is loaded or built: see :func:`asyncflow.definition.validate_config`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from asyncflow._json_depth import loads_json_checked
from asyncflow._text import shown
from asyncflow.errors import ConfigError, ParamInvalidError
from asyncflow.retry import RetryPolicy

__all__ = ["INT64_MAX", "NodeConfig", "WorkflowConfig"]

#: Upper bound of ``fail_max_count`` and ``max_wait_time_ts`` (Go stores them as int64).
INT64_MAX = 2**63 - 1

_NODE_KEYS = frozenset({"id", "name", "next_nodes", "fail_max_count", "max_wait_time_ts", "join", "retry"})
JOINS = ("all", "any", "first")
"""The values of ``NodeConfig.join`` (0.2): when a node with several predecessors runs."""
_WORKFLOW_KEYS = frozenset({"id", "name", "nodes"})


def _where(workflow: str | None, node: str | None) -> str:
    parts = []
    if workflow is not None:
        parts.append(f"workflow {shown(workflow)}")
    if node is not None:
        parts.append(f"node {node}")
    return ": ".join(parts) + ": " if parts else ""


def _node_ref(raw_id: object, index: int | None) -> str:
    if isinstance(raw_id, str) and raw_id:
        return repr(raw_id)
    return f"#{index}" if index is not None else shown(raw_id)


def _fail(message: str, *, workflow: str | None, node: str | None = None, node_id: str = "") -> ConfigError:
    return ConfigError(
        _where(workflow, node) + message,
        workflow_type=workflow or "",
        nodes=(node_id,) if node_id else (),
    )


def count_problem(value: object, field: str) -> str | None:
    """What is wrong with an optional count (``None`` or an int in 0..int64 max), or ``None`` if nothing."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{field} must be an integer or null, got {type(value).__name__} {shown(value)}"
    if value < 0:
        return f"{field} must not be negative (0 or null disables it), got {shown(value)}"
    if value > INT64_MAX:
        return f"{field} is larger than int64, got {shown(value)}"
    return None


def _as_str_tuple(value: object, field: str) -> tuple[tuple[str, ...] | None, str | None]:
    if value is None:
        return (), None
    if isinstance(value, str | bytes | Mapping | set | frozenset) or not isinstance(value, Iterable):
        # a mapping would give its keys and a set no order: Go's JSON accepts only an array here
        return None, f"{field} must be a list of strings, got {type(value).__name__} {shown(value)}"
    items = tuple(value)
    for item in items:
        if not isinstance(item, str):
            return None, f"{field} must hold strings only, got {type(item).__name__} {shown(item)}"
    return items, None


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """One node of a workflow config (Go ``NodeDefinitionConfig``).

    ``id`` is the node's task type (and worker key); ``next_nodes`` its successors (empty: it feeds the
    implicit end node); ``fail_max_count`` fails the workflow at the N-th counted failure and
    ``max_wait_time_ts`` after that many seconds since the node started (0: disabled). ``None`` (the
    JSON key missing or ``null``) leaves ``fail_max_count`` unset, so the service's
    ``default_fail_max_count`` applies; ``0`` means no limit whatever the default. ``retry`` (a
    :class:`~asyncflow.retry.RetryPolicy`; JSON key ``"retry": {"initial_interval": 5, ...}``) replaces
    the service's back-off for this node. Bad values raise :class:`ConfigError`. ``next_nodes`` is
    stored as a tuple.
    ``join`` (0.2) is ``"all"`` (default), ``"any"`` or ``"first"``: when the node runs once its
    predecessors are done (README "Branches and joins"); anything else raises :class:`ConfigError`.
    """

    id: str
    name: str = ""
    next_nodes: Sequence[str] = ()
    fail_max_count: int | None = None
    max_wait_time_ts: int | None = None
    join: str = "all"
    retry: RetryPolicy | None = None

    def __post_init__(self) -> None:
        self._check(workflow=None, index=None)

    def _check(self, *, workflow: str | None, index: int | None) -> None:
        ref = _node_ref(self.id, index)
        node_id = self.id if isinstance(self.id, str) else ""
        if not isinstance(self.id, str):
            problem = f"id must be a string, got {type(self.id).__name__} {shown(self.id)}"
            raise _fail(problem, workflow=workflow, node=ref)
        if not isinstance(self.name, str):
            raise _fail(
                f"name must be a string, got {type(self.name).__name__} {shown(self.name)}",
                workflow=workflow,
                node=ref,
                node_id=node_id,
            )
        nexts, problem = _as_str_tuple(self.next_nodes, "next_nodes")
        if problem is None:
            problem = count_problem(self.fail_max_count, "fail_max_count")
        if problem is None:
            problem = count_problem(self.max_wait_time_ts, "max_wait_time_ts")
        if problem is None and self.join not in JOINS:
            problem = f"join must be one of {', '.join(map(repr, JOINS))}, got {shown(self.join)}"
        if problem is None and self.retry is not None and not isinstance(self.retry, RetryPolicy):
            problem = self._parse_retry()
        if problem is not None:
            raise _fail(problem, workflow=workflow, node=ref, node_id=node_id)
        object.__setattr__(self, "next_nodes", nexts)

    def _parse_retry(self) -> str | None:
        if not isinstance(self.retry, Mapping):
            got = f"{type(self.retry).__name__} {shown(self.retry)}"
            return f"retry must be a RetryPolicy or an object, got {got}"
        try:
            object.__setattr__(self, "retry", RetryPolicy.from_dict(self.retry))
        except ParamInvalidError as exc:
            return str(exc).replace("RetryPolicy.", "retry.")
        return None

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], *, workflow: str | None = None, index: int | None = None
    ) -> NodeConfig:
        """Parse one node in the Go JSON shape; unknown keys and wrong types raise :class:`ConfigError`."""
        if d is None:
            raise _fail("is null", workflow=workflow, node=f"#{index}" if index is not None else "entry")
        if not isinstance(d, Mapping):
            raise _fail(
                f"must be an object, got {type(d).__name__}",
                workflow=workflow,
                node=f"#{index}" if index is not None else "entry",
            )
        raw_id = d.get("id", "")
        ref = _node_ref(raw_id, index)
        node_id = raw_id if isinstance(raw_id, str) else ""
        unknown = sorted(str(k) for k in d if k not in _NODE_KEYS)
        if unknown:
            problem = f"unknown key(s) {', '.join(map(repr, unknown))}"
            raise _fail(problem, workflow=workflow, node=ref, node_id=node_id)
        node = cls.__new__(cls)
        for field in _NODE_KEYS:
            object.__setattr__(node, field, d.get(field, "" if field in ("id", "name") else None))
        if "join" not in d:
            object.__setattr__(node, "join", "all")
        node._check(workflow=workflow, index=index)
        return node

    def to_dict(self) -> dict[str, Any]:
        """The Go JSON shape of this node (``next_nodes`` is always a list)."""
        return {
            "id": self.id,
            "name": self.name,
            "next_nodes": list(self.next_nodes),
            "fail_max_count": self.fail_max_count,
            "max_wait_time_ts": self.max_wait_time_ts,
            **({"join": self.join} if self.join != "all" else {}),  # Go's shape when not used
        } | ({} if self.retry is None else {"retry": self.retry.to_dict()})


@dataclass(frozen=True, slots=True)
class WorkflowConfig:
    """A workflow type's config (Go ``WorkflowConfig``): its id, display name and nodes in order.

    ``nodes`` is stored as a tuple of :class:`NodeConfig`; a ``None`` entry or a field of the wrong type
    raises :class:`ConfigError`. Graph rules are checked at load time, not here.
    """

    id: str
    name: str = ""
    nodes: Sequence[NodeConfig] = ()

    def __post_init__(self) -> None:
        wid = self.id if isinstance(self.id, str) else None
        if not isinstance(self.id, str):
            raise ConfigError(f"workflow id must be a string, got {type(self.id).__name__} {shown(self.id)}")
        if not isinstance(self.name, str):
            raise _fail(
                f"name must be a string, got {type(self.name).__name__} {shown(self.name)}", workflow=wid
            )
        if isinstance(self.nodes, str | bytes | Mapping) or not isinstance(self.nodes, Iterable):
            raise _fail(f"nodes must be a list of NodeConfig, got {type(self.nodes).__name__}", workflow=wid)
        nodes = tuple(self.nodes)
        for index, node in enumerate(nodes):
            if node is None:
                raise _fail("is null", workflow=wid, node=f"#{index}")
            if not isinstance(node, NodeConfig):
                raise _fail(
                    f"must be a NodeConfig, got {type(node).__name__} (from_dict parses dicts)",
                    workflow=wid,
                    node=f"#{index}",
                )
        object.__setattr__(self, "nodes", nodes)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WorkflowConfig:
        """Parse the Go JSON shape (keys exactly as Go: ``id``, ``name``, ``nodes``).

        Unknown keys, wrongly typed fields (a ``bool`` is not an int) and ``null`` node entries raise
        :class:`ConfigError` naming the workflow and the node. A missing key takes Go's zero value.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"workflow config must be an object, got {type(d).__name__}")
        raw_id = d.get("id", "")
        if not isinstance(raw_id, str):
            raise ConfigError(f"workflow id must be a string, got {type(raw_id).__name__} {shown(raw_id)}")
        unknown = sorted(str(k) for k in d if k not in _WORKFLOW_KEYS)
        if unknown:
            raise _fail(f"unknown key(s) {', '.join(map(repr, unknown))}", workflow=raw_id)
        raw_nodes = d.get("nodes", [])
        if not isinstance(raw_nodes, list | tuple):
            raise _fail(f"nodes must be a list, got {type(raw_nodes).__name__}", workflow=raw_id)
        nodes = tuple(NodeConfig.from_dict(raw, workflow=raw_id, index=i) for i, raw in enumerate(raw_nodes))
        return cls(id=raw_id, name=d.get("name", ""), nodes=nodes)

    @classmethod
    def from_json(cls, text_or_bytes: str | bytes | bytearray) -> WorkflowConfig:
        """Parse Go JSON text; invalid JSON or a non-object raises :class:`ConfigError`."""
        if not isinstance(text_or_bytes, str | bytes | bytearray):
            raise ConfigError(
                f"workflow config JSON must be str or bytes, got {type(text_or_bytes).__name__}"
            )
        try:
            data = loads_json_checked(text_or_bytes, "workflow config", error=ConfigError)
        except ConfigError:  # worded already (too deep, an integer too long); a ConfigError is a ValueError
            raise
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise ConfigError(f"workflow config is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The Go JSON shape of this config; ``from_dict(to_dict())`` gives an equal config."""
        return {"id": self.id, "name": self.name, "nodes": [node.to_dict() for node in self.nodes]}
