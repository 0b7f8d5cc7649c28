"""The PostgreSQL backend (``postgresql+asyncpg://``): :class:`.backend.PostgresBackend`.

``schema`` (migrations), ``functions`` (the plpgsql step functions), ``sql`` (every per-instance
statement), ``lanes`` (kept asyncpg connections), ``batches`` (group commit), ``notify`` (wake-ups
for drivers), ``backend`` (the calls).
"""
