"""Instance and node statuses with the Go strings and texts, and the reserved names."""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "END_NODE",
    "END_NODE_NAME",
    "NODE_EVENT",
    "PRE_NODE_CONTEXT",
    "REASON",
    "ROOT_NODE",
    "ROOT_NODE_NAME",
    "RUNNABLE_INSTANCE_STATUSES",
    "SYSTEM",
    "TERMINAL_STATUSES",
    "TERMINAL_TASK_STATUSES",
    "TIMEOUT_REASON",
    "WORKFLOW_CONTEXT",
    "InstanceStatus",
    "TaskStatus",
    "instance_status_text",
    "is_over_instance_status",
    "is_over_task_status",
    "task_status_text",
]


class InstanceStatus(StrEnum):
    """Status of a workflow instance (the values are the Go strings)."""

    INIT = "init"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"


class TaskStatus(StrEnum):
    """Status of a node (task instance). ``uncreated`` is never stored: it marks a node with no row."""

    UNCREATED = "uncreated"
    INIT = "init"
    RESTARTING = "restarting"
    RUNNING = "running"
    PENDING = "pending"
    FINISHING = "finishing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    SKIPPED = "skipped"  # 0.2: a branch not taken (af.choose) or a join that cannot run; terminal


RUNNABLE_INSTANCE_STATUSES: tuple[str, ...] = (InstanceStatus.INIT.value, InstanceStatus.RUNNING.value)
"""Instance statuses the driver claims and passes run (every SQL list of them is built from this)."""

TERMINAL_STATUSES: tuple[str, ...] = (
    InstanceStatus.COMPLETED.value,
    InstanceStatus.FAILED.value,
    InstanceStatus.CANCELED.value,
)
"""The terminal statuses, of instances and nodes alike (every SQL list of them is built from this)."""

TERMINAL_TASK_STATUSES: tuple[str, ...] = (*TERMINAL_STATUSES, TaskStatus.SKIPPED.value)
"""The terminal node statuses: the terminal statuses and ``skipped`` (every SQL list of them is built
from this)."""

_OVER = frozenset(TERMINAL_STATUSES)
_TASK_OVER = frozenset(TERMINAL_TASK_STATUSES)

_INSTANCE_TEXT = {
    "init": "初始化",
    "running": "运行中",
    "completed": "完成",
    "failed": "失败",
    "canceled": "取消",
}
_TASK_TEXT = {
    "uncreated": "未创建",
    "init": "初始化",
    "restarting": "重新启动",
    "running": "运行中",
    "pending": "等待中",
    "finishing": "完成中",
    "canceled": "取消",
    "failed": "失败",
    "completed": "完成",
    "skipped": "跳过",
}
_UNKNOWN = "未知"


def is_over_instance_status(status: str) -> bool:
    """True for the terminal instance statuses: completed, failed, canceled."""
    return status in _OVER


def is_over_task_status(status: str) -> bool:
    """True for the terminal node statuses: completed, failed, canceled, skipped."""
    return status in _TASK_OVER


def instance_status_text(status: str) -> str:
    """The Go display text of an instance status (``未知`` for an unknown one)."""
    return _INSTANCE_TEXT.get(status, _UNKNOWN)


def task_status_text(status: str) -> str:
    """The Go display text of a node status (``未知`` for an unknown one)."""
    return _TASK_TEXT.get(status, _UNKNOWN)


# Node-context keys (Go: NodeContextKey*).
NODE_EVENT = "node_event"
SYSTEM = "system"
PRE_NODE_CONTEXT = "pre_node_context"
WORKFLOW_CONTEXT = "workflow_context"
REASON = "reason"

# Reserved node ids and the Go default names of the implicit nodes.
ROOT_NODE = "root"
END_NODE = "end"
ROOT_NODE_NAME = "开始节点"
END_NODE_NAME = "结束节点"

# The reason the engine writes when a node times out (Go: "task node execution timed out").
TIMEOUT_REASON = "任务节点执行超时"
