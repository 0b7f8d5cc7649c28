"""What to do about a database failure: one hint for the usual causes, shared by the CLI's messages
and the dashboard's error pages."""

from __future__ import annotations

from .errors import StoreError, iter_exception_chain

__all__ = ["store_error_hint"]

INIT_DB = "the tables are missing: run `asyncflow init-db` first"
MIGRATE = "the database's schema is older than this asyncflow's: run `asyncflow migrate`"
UNREACHABLE = "is the database running and the URL right?"


def store_error_hint(error: StoreError) -> str | None:
    """The likely fix of ``error`` (its whole chain is read), or ``None`` when nothing is recognized."""
    chain = " ".join(str(e) for e in iter_exception_chain(error)).lower()
    if "no such table" in chain or ("does not exist" in chain and "relation" in chain):
        return INIT_DB
    if "no such column" in chain or (
        "does not exist" in chain and ("column" in chain or "function" in chain)
    ):  # a schema behind this asyncflow's (not a connection: "database ... does not exist" is one)
        return MIGRATE
    if any(isinstance(e, OSError | TimeoutError) for e in iter_exception_chain(error)) or (
        "connect" in chain or "does not exist" in chain or "unable to open" in chain
    ):
        return UNREACHABLE
    return None
