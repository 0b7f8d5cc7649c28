"""The engine's pure rules (asyncflow.engine.rules): outcomes in Go's order, error records, node
contexts, JSON copies and the retry schedule."""

from __future__ import annotations

import math
from datetime import datetime

import pytest

from asyncflow.engine.rules import (
    NodeOutcome,
    Outcome,
    SchedulePolicy,
    build_node_context,
    classify_failure,
    error_text,
    json_copy,
    record_error,
    sanitize_json,
)
from asyncflow.errors import ParamInvalidError, TaskFailedContinue, TaskFailedTerminate, TaskNotReady
from asyncflow.status import NODE_EVENT, PRE_NODE_CONTEXT, REASON, SYSTEM, TIMEOUT_REASON, WORKFLOW_CONTEXT


def classify(exc: BaseException, **kw: int) -> NodeOutcome:
    values = {"fail_count": 0, "fail_max_count": 0, "max_wait_time_ts": 0, "started_at": 100, "now": 100}
    values.update(kw)
    return classify_failure(exc, **values)


def test_error_text_is_type_and_message() -> None:
    assert error_text(ValueError("bad")) == "ValueError: bad"
    assert error_text(ValueError()) == "ValueError"


def test_outcomes_follow_gos_order() -> None:
    assert classify(TaskNotReady("x")).outcome is Outcome.NOT_READY
    assert classify(TaskFailedContinue("x")).outcome is Outcome.CONTINUE
    assert classify(TaskFailedTerminate("x")).outcome is Outcome.FATAL
    assert classify(RuntimeError("x")).outcome is Outcome.RETRY
    # the timeout comes first, and is strict
    timed_out = classify(TaskNotReady("x"), max_wait_time_ts=10, started_at=0, now=11)
    assert (timed_out.outcome, timed_out.timed_out) == (Outcome.FATAL, True)
    assert classify(TaskNotReady("x"), max_wait_time_ts=10, started_at=0, now=10).outcome is Outcome.NOT_READY
    # not ready and continue are never counted against fail_max_count
    assert classify(TaskNotReady("x"), fail_count=9, fail_max_count=1).outcome is Outcome.NOT_READY
    assert classify(TaskFailedContinue("x"), fail_count=9, fail_max_count=1).outcome is Outcome.CONTINUE
    # the N-th counted failure fails the node
    assert classify(RuntimeError("x"), fail_count=1, fail_max_count=3).outcome is Outcome.RETRY
    last = classify(RuntimeError("x"), fail_count=2, fail_max_count=3)
    assert last.outcome is Outcome.FATAL and last.last_error.startswith("fail max count reached (3/3)")


def test_outcomes_look_through_the_cause_chain() -> None:
    try:
        try:
            raise TaskNotReady("inner")
        except TaskNotReady as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError as outer:
        assert classify(outer).outcome is Outcome.NOT_READY


def test_record_error_writes_system_and_the_timeout_reason() -> None:
    context: dict[str, object] = {SYSTEM: "not a dict"}
    record_error(context, NodeOutcome(Outcome.FATAL, "E: x", timed_out=True), now=0.0)
    system = context[SYSTEM]
    assert isinstance(system, dict) and system["last_error"] == "E: x"
    assert datetime.fromisoformat(system["last_error_time"]).timestamp() == 0
    assert context[REASON] == TIMEOUT_REASON
    kept = {REASON: "mine"}
    record_error(kept, NodeOutcome(Outcome.FATAL, "E", timed_out=True), now=1.0)
    assert kept[REASON] == "mine"
    plain: dict[str, object] = {}
    record_error(plain, NodeOutcome(Outcome.RETRY, "E"), now=1.0)
    assert REASON not in plain


def test_json_copy_is_deep_for_json_shapes() -> None:
    original = {"a": [{"b": 1}], "c": "d"}
    copied = json_copy(original)
    assert copied == original
    copied["a"][0]["b"] = 2
    assert original["a"][0]["b"] == 1


def test_sanitize_json_makes_anything_storable() -> None:
    cleaned = sanitize_json({"n\x00": [math.nan, math.inf, (1, "x\x00"), object, "\ud800", None, True]})
    [(key, values)] = cleaned.items()
    assert key == "n\ufffd"
    assert values[:2] == ["nan", "inf"] and values[2] == [1, "x\ufffd"]
    assert values[3].startswith("<class") and values[4] == "?" and values[5:] == [None, True]


def test_build_node_context_strips_and_copies_like_go() -> None:
    pre = {"x": 1, SYSTEM: {"e": 1}, PRE_NODE_CONTEXT: {}, WORKFLOW_CONTEXT: {}}
    workflow = {"w": [1]}
    context = build_node_context([("a", pre)], workflow, keep_event_from={NODE_EVENT: {"k": 1}, "y": 2})
    assert context == {PRE_NODE_CONTEXT: {"a": {"x": 1}}, WORKFLOW_CONTEXT: {"w": [1]}, NODE_EVENT: {"k": 1}}
    context[WORKFLOW_CONTEXT]["w"].append(2)
    assert workflow == {"w": [1]}
    assert NODE_EVENT not in build_node_context([], {}, keep_event_from={"y": 2})


def test_build_node_context_copies_nested_values_and_shares_no_container() -> None:
    class Sub(dict):  # type: ignore[type-arg]
        pass

    pre = {"d": {"k": [1, {"z": 2}]}, "s": "t", "n": None, "f": 1.5, "sub": Sub(a=[1]), WORKFLOW_CONTEXT: {}}
    workflow = {"a": 1, "b": {"c": [1]}}
    context = build_node_context([("p", pre), ("q", {"only": "scalars", "i": 1})], workflow)
    assert context == {
        PRE_NODE_CONTEXT: {
            "p": {"d": {"k": [1, {"z": 2}]}, "s": "t", "n": None, "f": 1.5, "sub": {"a": [1]}},
            "q": {"only": "scalars", "i": 1},
        },
        WORKFLOW_CONTEXT: {"a": 1, "b": {"c": [1]}},
    }
    copied = context[PRE_NODE_CONTEXT]["p"]
    copied["d"]["k"][1]["z"] = 3
    copied["sub"]["a"].append(2)
    context[WORKFLOW_CONTEXT]["b"]["c"].append(2)
    assert pre["d"] == {"k": [1, {"z": 2}]} and pre["sub"] == {"a": [1]} and workflow["b"] == {"c": [1]}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"poll_interval": -1},
        {"retry_base": math.nan},
        {"retry_max": math.inf},
        {"retry_jitter": 1.0},
        {"poll_interval": True},
        {"retry_base": "1"},
    ],
)
def test_schedule_policy_refuses_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ParamInvalidError):
        SchedulePolicy(**kwargs)  # type: ignore[arg-type]
