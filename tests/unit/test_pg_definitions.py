"""The revision of the PostgreSQL function and trigger definitions (``asyncflow.store.postgres.
definitions``) moves with their text: two releases never mark different bodies with one revision."""

from __future__ import annotations

import hashlib

from asyncflow.store.postgres import definitions, functions, notify, schema

_DIGESTS = {
    1: "af10838be2ed4bbbc7b523abd1517586b2ceeb781c9beac4182654bb78f4ea67",
    2: "1d74e881c1f0f243050dcf14cf194289366c96e036c4f6120bf40040f8a19ae6",  # asyncflow_claim_states_v1
}
"""The sha256 of the definitions' text at each revision (add a line when you bump it)."""


def _digest() -> str:
    texts = (
        *functions.ALL,
        notify._FUNCTION_SQL,
        notify._INSERT_FUNCTION_SQL,
        notify._TRIGGER_SQL,
        notify._INSERT_TRIGGER_SQL,
    )
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def test_a_changed_definition_comes_with_a_new_revision() -> None:
    assert max(_DIGESTS) == definitions.REVISION
    assert _DIGESTS[definitions.REVISION] == _digest(), (
        "a PostgreSQL function or trigger definition changed: bump definitions.REVISION and add its "
        "digest to _DIGESTS"
    )


def test_every_function_migrate_repairs_is_covered() -> None:
    assert set(schema.REPAIR) <= set(functions.ALL)


def test_a_marker_is_read_as_its_revision_and_anything_else_as_zero() -> None:
    assert definitions.revision_of("asyncflow definitions 12") == 12
    for other in (None, "", "asyncflow definitions", "asyncflow definitions 2 (edited)", "my own note"):
        assert definitions.revision_of(other) == 0
