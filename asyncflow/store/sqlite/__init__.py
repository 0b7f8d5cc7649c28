"""The SQLite backend (``sqlite+aiosqlite://``): :class:`~asyncflow.store.sqlite.backend.SqliteBackend`.

``schema`` (migrations), ``engine`` (connection settings), ``sql`` (every per-instance statement),
``lane`` (the write gate and the backend's own connection), ``backend`` (the calls).
"""
