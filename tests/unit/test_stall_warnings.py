"""``StallWarnings``: a stalled node is warned about once per service, within a bounded memory."""

from __future__ import annotations

from asyncflow.engine.runner import StallWarnings


def test_each_key_is_new_once_and_the_least_recently_seen_is_forgotten_first() -> None:
    stalls = StallWarnings(memory=2)
    a, b, c = (1, "A", "weird"), (2, "A", "weird"), (1, "B", "weird")
    assert stalls.first_time(a) and stalls.first_time(b)
    assert not stalls.first_time(a)  # seen: and now the most recent
    assert stalls.first_time(c)  # over the memory: b, the least recently seen, is forgotten
    assert not stalls.first_time(a) and not stalls.first_time(c)
    assert stalls.first_time(b)
    assert stalls.first_time((1, "A", "other status"))  # a new status of the same node is news
