"""Versioned migrations: a database migrated from scratch is ``af.metadata``; concurrent migrators
apply each version once; every backend lists versions 1..SCHEMA_VERSION."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import pytest
from sqlalchemy import UniqueConstraint as _Unique
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import asyncflow as af
from asyncflow.errors import InvalidStateError, StoreError
from asyncflow.store.migrations import Migration
from asyncflow.store.postgres import definitions
from asyncflow.store.postgres import schema as pg_schema
from asyncflow.store.postgres.functions import STEP_FUNCTION
from asyncflow.store.sqlite import schema as sqlite_schema
from tests.conftest import isolated_pg_engine


def test_every_backend_lists_each_version_once() -> None:
    for schema in (pg_schema, sqlite_schema):
        assert [m.version for m in schema.MIGRATIONS] == list(range(1, af.SCHEMA_VERSION + 1))


def _shape(sync_conn: Any) -> dict[str, Any]:
    found = inspect(sync_conn)
    shape: dict[str, Any] = {}
    for table in found.get_table_names():
        shape[table] = (
            {(c["name"], c["nullable"]) for c in found.get_columns(table)},
            {ix["name"] for ix in found.get_indexes(table) if not ix.get("duplicates_constraint")},
            {tuple(uq["column_names"]) for uq in found.get_unique_constraints(table)},
            {
                (fk["referred_table"], tuple(fk["constrained_columns"]))
                for fk in found.get_foreign_keys(table)
            },
        )
    return shape


def _metadata_shape(dialect: str) -> dict[str, Any]:
    shape: dict[str, Any] = {}
    for table in af.metadata.sorted_tables:
        shape[table.name] = (
            {(c.name, bool(c.nullable) and not c.primary_key) for c in table.columns},
            {ix.name for ix in table.indexes},
            {tuple(c.name for c in uq.columns) for uq in table.constraints if isinstance(uq, _Unique)},
            # task_instance's key is created on SQLite only (migration 11 dropped it on PostgreSQL)
            {(fk.column.table.name, (fk.parent.name,)) for fk in table.foreign_keys if dialect == "sqlite"},
        )
    return shape


def test_only_sqlite_creates_the_node_rows_foreign_key() -> None:
    from sqlalchemy.dialects import postgresql, sqlite
    from sqlalchemy.schema import CreateTable

    table = af.metadata.tables["task_instance"]
    assert "FOREIGN KEY" in str(CreateTable(table).compile(dialect=sqlite.dialect()))
    assert "FOREIGN KEY" not in str(CreateTable(table).compile(dialect=postgresql.dialect()))


async def _check_fresh(engine: AsyncEngine) -> None:
    repos = [af.SQLAlchemyWorkflowRepo(engine) for _ in range(4)]
    await asyncio.gather(*(repo.migrate() for repo in repos))  # concurrent migrators, fresh database
    async with engine.connect() as conn:
        shape = await conn.run_sync(_shape)
        versions = (await conn.exec_driver_sql("SELECT version FROM asyncflow_schema ORDER BY version")).all()
    assert [row[0] for row in versions] == list(range(1, af.SCHEMA_VERSION + 1))
    assert shape == _metadata_shape(engine.dialect.name)
    for repo in repos:
        await repo.aclose()


async def test_sqlite_from_scratch_matches_metadata(sqlite_url: str) -> None:
    async with af.SQLAlchemyWorkflowRepo(sqlite_url) as owner:
        await _check_fresh(owner.engine)


@pytest.mark.postgres
async def test_postgres_from_scratch_matches_metadata(postgres_url: str) -> None:
    async with isolated_pg_engine(postgres_url) as engine:
        await _check_fresh(engine)


async def _check_schema_version(engine: AsyncEngine) -> None:
    async with af.SQLAlchemyWorkflowRepo(engine) as repo:
        assert await repo.schema_version() == 0  # no asyncflow table yet
        async with engine.begin() as conn:  # tables made by another tool: nothing recorded
            await conn.run_sync(af.metadata.create_all)
        assert await repo.schema_version() == 0
        await repo.migrate()
        assert await repo.schema_version() == af.SCHEMA_VERSION
        async with engine.begin() as conn:  # as a database of the asyncflow before this one
            await conn.exec_driver_sql(f"DELETE FROM asyncflow_schema WHERE version = {af.SCHEMA_VERSION}")
        assert await repo.schema_version() == af.SCHEMA_VERSION - 1
        await repo.migrate()
        assert await repo.schema_version() == af.SCHEMA_VERSION


async def test_sqlite_schema_version_is_what_the_database_recorded(sqlite_url: str) -> None:
    async with af.SQLAlchemyWorkflowRepo(sqlite_url) as owner:
        await _check_schema_version(owner.engine)


@pytest.mark.postgres
async def test_postgres_schema_version_is_what_the_database_recorded(postgres_url: str) -> None:
    async with isolated_pg_engine(postgres_url) as engine:
        await _check_schema_version(engine)


@pytest.mark.postgres
async def test_schema_version_reads_the_current_schema_not_one_behind_it_in_the_search_path(
    postgres_url: str,
) -> None:
    """A tenant's schema first in ``search_path``, an asyncflow schema behind it (e.g. ``public``): before
    the tenant's first ``migrate()`` its version is 0, and that read leaves ``migrate()`` to make every
    table in the tenant's schema."""
    from sqlalchemy.ext.asyncio import create_async_engine

    async with isolated_pg_engine(postgres_url) as behind, isolated_pg_engine(postgres_url) as tenant:
        async with af.SQLAlchemyWorkflowRepo(behind) as repo:
            await repo.migrate()
        async with behind.connect() as conn, tenant.connect() as other:
            names = [(await c.exec_driver_sql("SELECT current_schema()")).scalar() for c in (conn, other)]
        path = f'"{names[1]}", "{names[0]}"'
        both = create_async_engine(
            postgres_url, connect_args={"server_settings": {"search_path": path}}, pool_size=1
        )
        try:
            async with af.SQLAlchemyWorkflowRepo(both) as repo:
                assert await repo.schema_version() == 0  # not the version of the schema behind it
                await repo.migrate()  # on the same (only) connection
                assert await repo.schema_version() == af.SCHEMA_VERSION
            async with tenant.connect() as conn:
                made = set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))
                versions = (await conn.exec_driver_sql("SELECT count(*) FROM asyncflow_schema")).scalar()
            assert made == set(af.metadata.tables) and versions == af.SCHEMA_VERSION
        finally:
            await both.dispose()


async def _adopt(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:  # tables made by another tool from af.metadata
        await conn.run_sync(af.metadata.create_all)
    async with af.SQLAlchemyWorkflowRepo(engine) as repo:
        await repo.migrate()  # adds no column twice (workflow_instance.unique_key exists already)
        async with engine.connect() as conn:
            versions = (await conn.exec_driver_sql("SELECT version FROM asyncflow_schema")).scalars().all()
            shape = await conn.run_sync(_shape)
    assert sorted(versions) == list(range(1, af.SCHEMA_VERSION + 1))
    assert shape == _metadata_shape(engine.dialect.name)


async def test_sqlite_adopts_tables_made_from_metadata(sqlite_url: str) -> None:
    async with af.SQLAlchemyWorkflowRepo(sqlite_url) as owner:
        await _adopt(owner.engine)


@pytest.mark.postgres
async def test_postgres_adopts_tables_made_from_metadata(postgres_url: str) -> None:
    async with isolated_pg_engine(postgres_url) as engine:
        await _adopt(engine)


def _definitions(sync_conn: Any) -> dict[str, Any]:
    """Every table's columns (type, nullability, default), indexes (columns, uniqueness, the partial
    index's predicate) and foreign keys (with their options), as the database reports them."""
    found = inspect(sync_conn)

    def where(index: dict[str, Any]) -> str | None:
        options = index.get("dialect_options", {})
        predicate = options.get("postgresql_where", options.get("sqlite_where"))
        return None if predicate is None else " ".join(str(predicate).split())

    def foreign_keys(table: str) -> list[Any]:
        if sync_conn.dialect.name == "sqlite":  # SQLite's own account: the reflection of older
            # SQLAlchemy 2.0 releases misses an ON DELETE written on the clause's second line
            rows = sync_conn.exec_driver_sql(f'PRAGMA foreign_key_list("{table}")').all()
            return sorted(
                (row[2], (row[3],), row[5], row[6]) for row in rows
            )  # table, from, on update/delete
        return sorted(
            (fk["referred_table"], tuple(fk["constrained_columns"]), sorted(fk["options"].items()))
            for fk in found.get_foreign_keys(table)
        )

    def storage(table: str) -> list[str] | None:
        """PostgreSQL's storage parameters of the table (``pg_class.reloptions``, e.g. fillfactor)."""
        if sync_conn.dialect.name == "sqlite":
            return None
        found_options = sync_conn.execute(
            text("SELECT reloptions FROM pg_class WHERE oid = to_regclass(:table)"), {"table": table}
        ).scalar_one()
        return sorted(found_options or [])

    return {
        table: (
            sorted(
                (c["name"], repr(c["type"]), c["nullable"], c["default"]) for c in found.get_columns(table)
            ),
            sorted(
                (ix["name"], tuple(ix["column_names"]), bool(ix["unique"]), where(ix))
                for ix in found.get_indexes(table)
            ),
            foreign_keys(table),
            storage(table),
        )
        for table in sorted(found.get_table_names())
    }


async def _migrated_and_created(migrated: AsyncEngine, created: AsyncEngine) -> dict[str, Any]:
    async with af.SQLAlchemyWorkflowRepo(migrated) as repo:
        await repo.migrate()
    async with created.begin() as conn:
        await conn.run_sync(af.metadata.create_all)
    async with migrated.connect() as one, created.connect() as other:
        definitions = await one.run_sync(_definitions)
        assert definitions == await other.run_sync(_definitions)
    return definitions


async def test_sqlite_migrations_define_what_metadata_creates(tmp_path: Any) -> None:
    """Migrations 1..SCHEMA_VERSION and ``af.metadata`` agree on every type, default, index predicate
    and foreign key, not only on names."""
    async with (
        af.SQLAlchemyWorkflowRepo(f"sqlite:///{tmp_path / 'migrated.db'}") as one,
        af.SQLAlchemyWorkflowRepo(f"sqlite:///{tmp_path / 'created.db'}") as other,
    ):
        await _migrated_and_created(one.engine, other.engine)


@pytest.mark.postgres
async def test_postgres_migrations_define_what_metadata_creates(postgres_url: str) -> None:
    """... and on the storage parameters: both databases have migration 9's fillfactor."""
    async with isolated_pg_engine(postgres_url) as one, isolated_pg_engine(postgres_url) as other:
        definitions = await _migrated_and_created(one, other)
    fillfactor = [f"fillfactor={af.store.tables.FILLFACTOR}"]
    assert definitions["workflow_instance"][3] == fillfactor
    assert definitions["task_instance"][3] == fillfactor
    assert definitions["asyncflow_schema"][3] == []


_RELOPTIONS = (
    "SELECT relname, reloptions FROM pg_class "
    "WHERE oid IN (to_regclass('workflow_instance'), to_regclass('task_instance')) ORDER BY relname"
)


@pytest.mark.postgres
async def test_postgres_migration_9_sets_fillfactor_on_a_version_8_database(postgres_url: str) -> None:
    """A database at version 8 (tables at the default fillfactor, a row in them) gets the fillfactor
    from migration 9 and keeps its row."""
    async with isolated_pg_engine(postgres_url) as engine, af.SQLAlchemyWorkflowRepo(engine) as repo:
        await repo.migrate()
        async with engine.begin() as conn:  # back to version 8: its schema has no storage parameter
            await conn.exec_driver_sql("ALTER TABLE workflow_instance RESET (fillfactor)")
            await conn.exec_driver_sql("ALTER TABLE task_instance RESET (fillfactor)")
            await conn.exec_driver_sql("DELETE FROM asyncflow_schema WHERE version >= 9")
            await conn.exec_driver_sql(
                "INSERT INTO workflow_instance (workflow_type, business_id, status, created_at, "
                "updated_at) VALUES ('t', 'b', 'init', 0, 0)"
            )
            before = (await conn.exec_driver_sql(_RELOPTIONS)).all()
        await repo.migrate()
        async with engine.connect() as conn:
            after = (await conn.exec_driver_sql(_RELOPTIONS)).all()
            rows = (await conn.exec_driver_sql("SELECT count(*) FROM workflow_instance")).scalar()
            versions = (await conn.exec_driver_sql("SELECT max(version) FROM asyncflow_schema")).scalar()
    fillfactor = [f"fillfactor={af.store.tables.FILLFACTOR}"]
    assert [tuple(row) for row in before] == [("task_instance", None), ("workflow_instance", None)]
    assert [tuple(row) for row in after] == [("task_instance", fillfactor), ("workflow_instance", fillfactor)]
    assert (rows, versions) == (1, af.SCHEMA_VERSION)


async def _refuses_a_newer_database(engine: AsyncEngine) -> None:
    async with af.SQLAlchemyWorkflowRepo(engine) as repo:
        await repo.migrate()
        async with engine.begin() as conn:
            await conn.exec_driver_sql(
                f"INSERT INTO asyncflow_schema (version, applied_at) VALUES ({af.SCHEMA_VERSION + 1}, 0)"
            )
        with pytest.raises(StoreError, match="newer than this asyncflow"):
            await repo.migrate()


async def test_sqlite_refuses_a_database_of_a_newer_asyncflow(sqlite_url: str) -> None:
    async with af.SQLAlchemyWorkflowRepo(sqlite_url) as owner:
        await _refuses_a_newer_database(owner.engine)


@pytest.mark.postgres
async def test_postgres_refuses_a_database_of_a_newer_asyncflow(postgres_url: str) -> None:
    async with isolated_pg_engine(postgres_url) as engine:
        await _refuses_a_newer_database(engine)


async def _a_failing_version_leaves_nothing(
    engine: AsyncEngine, schema: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 2 fails after its first statement: version 1 stays applied, version 2 left nothing
    behind (its transaction rolled back); the real migrations then finish the database."""
    failing = Migration(
        2,
        "fails half-way",
        ("CREATE TABLE asyncflow_probe_rollback (a INTEGER)", "SELECT * FROM no_such_table"),
    )
    async with af.SQLAlchemyWorkflowRepo(engine) as repo:
        with monkeypatch.context() as patched:
            patched.setattr(schema, "MIGRATIONS", (schema.MIGRATIONS[0], failing, *schema.MIGRATIONS[2:]))
            with pytest.raises(StoreError):
                await repo.migrate()
        async with engine.connect() as conn:
            versions = (await conn.exec_driver_sql("SELECT version FROM asyncflow_schema")).scalars().all()
            tables = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
        assert versions == [1]
        assert "asyncflow_probe_rollback" not in tables
        await repo.migrate()
    async with engine.connect() as conn:
        versions = (await conn.exec_driver_sql("SELECT version FROM asyncflow_schema")).scalars().all()
        assert sorted(versions) == list(range(1, af.SCHEMA_VERSION + 1))
        assert await conn.run_sync(_shape) == _metadata_shape(engine.dialect.name)


async def test_sqlite_a_failing_version_is_rolled_back(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with af.SQLAlchemyWorkflowRepo(sqlite_url) as owner:
        await _a_failing_version_leaves_nothing(owner.engine, sqlite_schema, monkeypatch)


@pytest.mark.postgres
async def test_postgres_a_failing_version_is_rolled_back(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with isolated_pg_engine(postgres_url) as engine:
        await _a_failing_version_leaves_nothing(engine, pg_schema, monkeypatch)


@pytest.mark.postgres
async def test_postgres_migrate_with_nothing_to_do_needs_no_right_to_create(postgres_url: str) -> None:
    """Least privilege: an application role that may use the tables but create nothing runs
    ``migrate()`` at start-up, as docs/storage.md suggests ("idempotent and cheap when there is nothing
    to do"). On a database at this version whose functions are this version's it succeeds, without DDL.
    A function that is not this version's (dropped, another body, other settings) is work: the role's
    ``migrate()`` refuses it, and the owner's re-installs it."""
    role = f"app_{uuid.uuid4().hex[:12]}"
    async with isolated_pg_engine(postgres_url) as owner:
        async with af.SQLAlchemyWorkflowRepo(owner) as repo:
            await repo.migrate()
        async with owner.begin() as conn:
            schema = (await conn.execute(text("SELECT current_schema()"))).scalar_one()
            await conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
            await conn.execute(text(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"'))
            await conn.execute(
                text(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"')
            )
            await conn.execute(text(f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA "{schema}" TO "{role}"'))
        url = make_url(postgres_url).set(username=role, password=None)
        app = create_async_engine(url, connect_args={"server_settings": {"search_path": schema}})
        changes = (
            "DROP FUNCTION asyncflow_claim_v1",
            STEP_FUNCTION.replace("-- One step of asyncflow's engine", "-- An older step"),
            "ALTER FUNCTION asyncflow_claim_v1 RESET enable_sort",
        )
        try:
            async with af.SQLAlchemyWorkflowRepo(app) as app_repo, af.SQLAlchemyWorkflowRepo(owner) as repo:
                await app_repo.migrate()  # nothing to do
                assert await app_repo.schema_version() == af.SCHEMA_VERSION
                for change in changes:
                    async with owner.begin() as conn:
                        await conn.exec_driver_sql(change)
                    with pytest.raises(StoreError, match=r"permission denied|must be owner"):
                        await app_repo.migrate()
                    await repo.migrate()  # the owner re-installs it
                    await app_repo.migrate()  # nothing to do again
                async with app.connect() as conn:
                    here = "pronamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())"
                    source = (
                        await conn.exec_driver_sql(
                            f"SELECT prosrc FROM pg_proc WHERE proname = 'asyncflow_step_v1' AND {here}"
                        )
                    ).scalar_one()
                    settings = (
                        await conn.exec_driver_sql(
                            f"SELECT proconfig FROM pg_proc WHERE proname = 'asyncflow_claim_v1' AND {here}"
                        )
                    ).scalar_one()
            assert source == STEP_FUNCTION.split("$asyncflow$")[1]
            assert "enable_sort=off" in settings
        finally:
            await app.dispose()
            async with owner.begin() as conn:
                await conn.execute(text(f'DROP OWNED BY "{role}"'))
                await conn.execute(text(f'DROP ROLE "{role}"'))


_STEP_BODY = (
    "SELECT prosrc, xmin::text FROM pg_proc WHERE proname = 'asyncflow_step_v1' "
    "AND pronamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())"
)


@pytest.mark.postgres
async def test_postgres_an_older_release_keeps_the_newer_release_s_functions(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Rolling deploy at one schema version: a newer release (definitions revision + 1, another step
    function) migrated; this release's ``migrate()`` (an old process restarting) keeps the newer
    function, with a warning, instead of putting its own back; the newer release's next
    ``migrate()`` then has nothing to replace either."""
    newer_step = STEP_FUNCTION.replace("-- One step of asyncflow's engine", "-- A newer step")
    newer_release = {"REVISION": definitions.REVISION + 1, "REPAIR": (newer_step, *pg_schema.REPAIR[1:])}

    def as_newer_release(patched: pytest.MonkeyPatch) -> None:
        patched.setattr(definitions, "REVISION", newer_release["REVISION"])
        patched.setattr(pg_schema, "REPAIR", newer_release["REPAIR"])

    async with isolated_pg_engine(postgres_url) as engine, af.SQLAlchemyWorkflowRepo(engine) as repo:
        await repo.migrate()
        with monkeypatch.context() as patched:
            as_newer_release(patched)
            await repo.migrate()
        async with engine.connect() as conn:
            installed = (await conn.exec_driver_sql(_STEP_BODY)).one()
        assert installed[0] == newer_step.split("$asyncflow$")[1]
        with caplog.at_level(logging.WARNING, logger="asyncflow.store"):
            await repo.migrate()  # this release again
        async with engine.connect() as conn:
            assert (await conn.exec_driver_sql(_STEP_BODY)).one() == installed
        assert "newer asyncflow" in caplog.text
        with monkeypatch.context() as patched:
            as_newer_release(patched)
            await repo.migrate()
        async with engine.connect() as conn:
            assert (await conn.exec_driver_sql(_STEP_BODY)).one() == installed  # not even re-created


async def _refused_inside_a_transaction(repo: Any) -> None:
    """``migrate()`` inside ``transaction()`` raises ``InvalidStateError`` before it touches anything:
    its DDL would join the caller's transaction, commit (and show to other connections) only with
    it, and hold the schema's advisory lock and the table locks until then (another process's
    ``migrate()`` waited the whole time)."""
    async with repo.transaction():
        with pytest.raises(InvalidStateError, match=r"inside transaction\(\)"):
            await repo.migrate()
        with pytest.raises(InvalidStateError, match=r"inside transaction\(\)"):
            await repo.create_schema()


async def test_memory_migrate_is_refused_inside_a_transaction() -> None:
    await _refused_inside_a_transaction(af.MemoryWorkflowRepo())


async def test_sqlite_migrate_is_refused_inside_a_transaction(sqlite_url: str) -> None:
    async with af.SQLAlchemyWorkflowRepo(sqlite_url) as repo:
        await _refused_inside_a_transaction(repo)
        assert await repo.schema_version() == 0


@pytest.mark.postgres
async def test_postgres_migrate_is_refused_inside_a_transaction(postgres_url: str) -> None:
    async with isolated_pg_engine(postgres_url) as engine, af.SQLAlchemyWorkflowRepo(engine) as repo:
        await _refused_inside_a_transaction(repo)
        assert await repo.schema_version() == 0
        async with af.SQLAlchemyWorkflowRepo(engine) as other, asyncio.timeout(30):
            await other.migrate()  # outside: as before
        assert await repo.schema_version() == af.SCHEMA_VERSION
