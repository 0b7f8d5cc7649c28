"""Helpers of the SQLite repo tests: the file behind a URL, and a write from another connection."""

from __future__ import annotations

import sqlite3

__all__ = ["db_path", "write_elsewhere"]


def db_path(sqlite_url: str) -> str:
    return sqlite_url.split("///", 1)[1]


def write_elsewhere(path: str) -> str:
    """A write from another connection that does not wait: "written" unless a writer holds the file
    (proves no transaction was left open, or that one holds the write lock)."""
    conn = sqlite3.connect(path, timeout=0)
    try:
        conn.execute("UPDATE workflow_instance SET task_id = task_id")
        conn.commit()
        return "written"
    except sqlite3.OperationalError as error:
        return str(error)
    finally:
        conn.close()
