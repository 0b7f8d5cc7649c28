"""create_workflow(session=): the insert joins the caller's SQLAlchemy transaction (AsyncSession or
AsyncConnection) on SQLite and PostgreSQL: committed together, rolled back together, invisible to
drivers until the commit; a PostgreSQL driver is woken by the commit's NOTIFY; bad sessions write
nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import BigInteger, Integer, String, event, make_url, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import asyncflow as af
from asyncflow.driver import WorkflowDriver
from asyncflow.errors import ParamInvalidError
from asyncflow.store.memory import MemoryWorkflowRepo
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from tests.conftest import POSTGRES_URL_ENV, isolated_pg_engine
from tests.integration.start_helpers import fake_service, one_node_registry


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "app_order"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    reference: Mapped[str] = mapped_column(String(40))
    workflow_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


@pytest.fixture(params=["sqlite", "postgres"])
async def sql_repo(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[SQLAlchemyWorkflowRepo]:
    if request.param == "sqlite":
        repo = SQLAlchemyWorkflowRepo(f"sqlite+aiosqlite:///{tmp_path}/app.db")
        try:
            await _prepare(repo)
            yield repo
        finally:
            await repo.aclose()
        return
    import os

    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set")
    async with isolated_pg_engine(url) as engine:
        repo = SQLAlchemyWorkflowRepo(engine)
        try:
            await _prepare(repo)
            yield repo
        finally:
            await repo.aclose()


async def _prepare(repo: SQLAlchemyWorkflowRepo) -> None:
    await repo.migrate()
    async with repo.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)


async def _orders(repo: SQLAlchemyWorkflowRepo) -> list[str]:
    async with repo.engine.connect() as conn:
        return list((await conn.execute(select(Order.reference))).scalars())


async def test_the_order_and_its_workflow_commit_together(sql_repo: SQLAlchemyWorkflowRepo) -> None:
    service, _ = fake_service(sql_repo, one_node_registry("order"))
    sessions = async_sessionmaker(sql_repo.engine, expire_on_commit=False)
    async with sessions() as session, session.begin():
        order = Order(reference="A-1")
        session.add(order)
        await session.flush()
        inst = await service.create_workflow(
            "order", f"order-{order.id}", session=session, context={"o": order.id}
        )
        order.workflow_id = inst.id
        # not committed: the repo's own connections (drivers') do not see it
        assert await sql_repo.get_workflow_instance(inst.id) is None
        assert await sql_repo.next_due_at() is None
    assert await _orders(sql_repo) == ["A-1"]
    assert (await service.get_workflow_instance(inst.id)).business_id == f"order-{order.id}"
    await WorkflowDriver(service, poll_interval=0.05).run_until_idle()
    assert (await service.get_workflow_instance(inst.id)).status == "completed"


async def test_a_rollback_undoes_both(sql_repo: SQLAlchemyWorkflowRepo) -> None:
    service, _ = fake_service(sql_repo, one_node_registry("order"))
    with pytest.raises(RuntimeError, match="payment refused"):
        async with AsyncSession(sql_repo.engine) as session, session.begin():
            session.add(Order(reference="B-1"))
            made = await service.create_workflow("order", "B-1", session=session, unique="always")
            raise RuntimeError("payment refused")
    assert await _orders(sql_repo) == []
    assert await service.count_workflow_instances() == 0
    with pytest.raises(af.InstanceNotFoundError):
        await service.get_workflow_instance(made.id)
    # the unique key is free again: the rolled-back instance never existed
    await service.create_workflow("order", "B-1", unique="always", on_duplicate="raise")
    assert await service.count_workflow_instances() == 1


async def test_an_async_connection_in_a_transaction_works_too(sql_repo: SQLAlchemyWorkflowRepo) -> None:
    service, _ = fake_service(sql_repo, one_node_registry("order"))
    async with sql_repo.engine.connect() as conn:
        async with conn.begin():
            first = await service.create_workflow("order", "C-1", session=conn, unique="active")
            same = await service.create_workflow("order", "C-1", session=conn, unique="active")
            assert same.id == first.id
        assert conn.in_transaction() is False
    assert await service.count_workflow_instances() == 1


async def test_bad_sessions_raise_and_write_nothing(sql_repo: SQLAlchemyWorkflowRepo, tmp_path: Any) -> None:
    service, _ = fake_service(sql_repo, one_node_registry("order"))
    async with AsyncSession(sql_repo.engine) as session:
        with pytest.raises(ParamInvalidError, match="no open transaction"):
            await service.create_workflow("order", "x", session=session)
        async with session.begin():
            with pytest.raises(ParamInvalidError, match="run=True"):
                await service.create_workflow("order", "x", session=session, run=True)
    async with sql_repo.engine.connect() as conn:
        with pytest.raises(ParamInvalidError, match="no open transaction"):
            await service.create_workflow("order", "x", session=conn)
    with pytest.raises(ParamInvalidError, match="AsyncSession or AsyncConnection"):
        await service.create_workflow("order", "x", session=object())
    other = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/other.db")
    try:
        async with other.connect() as conn, conn.begin():
            with pytest.raises(ParamInvalidError, match="another database"):
                await service.create_workflow("order", "x", session=conn)
    finally:
        await other.dispose()
    assert await service.count_workflow_instances() == 0


async def test_a_sqlite_file_named_relative_or_absolute_is_one_database(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller's engine and the repo's may name one SQLite file differently (relative to the working
    directory, or absolute): the same database, so the create joins the caller's transaction."""
    monkeypatch.chdir(tmp_path)
    repo = SQLAlchemyWorkflowRepo("sqlite+aiosqlite:///app.db")
    caller = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/app.db")
    try:
        await _prepare(repo)
        service, _ = fake_service(repo, one_node_registry("order"))
        async with AsyncSession(caller) as session, session.begin():
            session.add(Order(reference="R-1"))
            await service.create_workflow("order", "R-1", session=session)
        assert await _orders(repo) == ["R-1"]
        assert await service.count_workflow_instances() == 1
    finally:
        await caller.dispose()
        await repo.aclose()


async def test_a_memory_repo_refuses_a_session(tmp_path: Any) -> None:
    service, _ = fake_service(MemoryWorkflowRepo(), one_node_registry("order"))
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/m.db")
    try:
        async with engine.connect() as conn, conn.begin():
            with pytest.raises(ParamInvalidError, match="SQL repo"):
                await service.create_workflow("order", "x", session=conn)
    finally:
        await engine.dispose()
    assert await service.count_workflow_instances() == 0


@pytest.mark.postgres
async def test_a_listening_driver_is_woken_by_the_caller_s_commit(postgres_url: str) -> None:
    async with isolated_pg_engine(postgres_url) as engine:
        repo = SQLAlchemyWorkflowRepo(engine)
        await _prepare(repo)
        ran: list[int] = []
        service = af.WorkflowService(repo, af.LocalWorkflowLock(), one_node_registry("order", ran=ran))
        other = af.WorkflowService(repo, af.LocalWorkflowLock(), one_node_registry("order"))
        try:
            async with WorkflowDriver(service, poll_interval=60.0) as driver:  # polls once a minute
                deadline = time.monotonic() + 10
                while not driver.listening:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                async with AsyncSession(engine) as session, session.begin():
                    # another service object: no in-process wake-up reaches the driver
                    inst = await other.create_workflow("order", "D-1", session=session)
                    await asyncio.sleep(0.3)
                    assert ran == []  # not committed yet
                deadline = time.monotonic() + 10
                while ran != [inst.id]:
                    assert time.monotonic() < deadline, "the commit's NOTIFY did not wake the driver"
                    await asyncio.sleep(0.01)
        finally:
            await repo.aclose()


class _Told:
    """What a service tells about creates: its observers' ``instance_created`` and its due listeners."""

    def __init__(self, service: af.WorkflowService) -> None:
        self.created: list[int] = []
        self.due: list[int] = []
        service.add_observer(self)
        service.add_due_listener(self.due.append)

    def instance_created(self, instance: af.WorkflowInstance) -> None:
        self.created.append(instance.id)

    async def settled(self, expected: list[int] | None = None) -> tuple[list[int], list[int]]:
        """Both lists once the loop has run what was scheduled on it (a few iterations), or, with
        ``expected``, once both are that (at most 5 s: a connection's commit is looked at each ms)."""
        deadline = time.monotonic() + 5
        for _ in range(10):
            await asyncio.sleep(0)
        while expected is not None and (self.created, self.due) != (expected, expected):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.001)
        return self.created, self.due


async def test_a_create_in_a_session_is_told_only_once_the_caller_commits(
    sql_repo: SQLAlchemyWorkflowRepo,
) -> None:
    """Observers (metrics, audit) and the in-process driver's wake-up hear of a create in the caller's
    transaction once it commits, not before: until then the instance may still never exist."""
    service, _ = fake_service(sql_repo, one_node_registry("order"))
    told = _Told(service)
    async with AsyncSession(sql_repo.engine) as session:
        async with session.begin():
            inst = await service.create_workflow("order", "T-1", session=session)
            assert await told.settled() == ([], [])
        assert await told.settled([inst.id]) == ([inst.id], [inst.id])
        async with session.begin():  # the session's next transaction: told of its own create only
            again = await service.create_workflow("order", "T-2", session=session)
        assert await told.settled([inst.id, again.id]) == ([inst.id, again.id], [inst.id, again.id])


async def test_a_create_the_caller_rolls_back_or_drops_is_never_told(
    sql_repo: SQLAlchemyWorkflowRepo,
) -> None:
    service, _ = fake_service(sql_repo, one_node_registry("order"))
    told = _Told(service)
    with pytest.raises(RuntimeError, match="refused"):
        async with AsyncSession(sql_repo.engine) as session, session.begin():
            await service.create_workflow("order", "U-1", session=session)
            raise RuntimeError("refused")
    async with AsyncSession(sql_repo.engine) as session:  # closed with neither commit nor rollback
        await session.begin()
        await service.create_workflow("order", "U-2", session=session)
        watch = session.sync_session.info["asyncflow_after_commit"]
        assert len(watch.waiting) == 1
    assert watch.waiting == []  # nothing left behind by the close
    async with AsyncSession(sql_repo.engine) as session:  # rolled back, then reused and committed
        await session.begin()
        await service.create_workflow("order", "U-3", session=session)
        await session.rollback()
        async with session.begin():
            session.add(Order(reference="U-4"))
    assert await told.settled() == ([], [])
    assert await service.count_workflow_instances() == 0


async def test_a_create_in_a_savepoint_is_told_only_if_it_survives_to_the_commit(
    sql_repo: SQLAlchemyWorkflowRepo,
) -> None:
    """A savepoint rolled back undoes the create inside it even though the outer transaction commits."""
    service, _ = fake_service(sql_repo, one_node_registry("order"))
    told = _Told(service)
    async with AsyncSession(sql_repo.engine) as session, session.begin():
        with pytest.raises(RuntimeError, match="undo"):
            async with session.begin_nested():
                await service.create_workflow("order", "S-1", session=session)
                raise RuntimeError("undo")
        async with session.begin_nested():  # released: the outer commit decides
            kept = await service.create_workflow("order", "S-2", session=session)
        later = await session.begin_nested()  # a savepoint begun and rolled back after the create
        await later.rollback()
        assert await told.settled() == ([], [])
    assert await told.settled([kept.id]) == ([kept.id], [kept.id])
    assert await service.count_workflow_instances() == 1


async def test_a_create_on_a_caller_s_connection_is_told_on_its_commit_only(
    sql_repo: SQLAlchemyWorkflowRepo,
) -> None:
    service, _ = fake_service(sql_repo, one_node_registry("order"))
    told = _Told(service)
    async with sql_repo.engine.connect() as conn:
        async with conn.begin():
            first = await service.create_workflow("order", "K-1", session=conn)
            nested = await conn.begin_nested()
            await service.create_workflow("order", "K-2", session=conn)
            await nested.rollback()
            async with conn.begin_nested():
                third = await service.create_workflow("order", "K-3", session=conn)
            assert await told.settled() == ([], [])
        assert await told.settled([first.id, third.id]) == ([first.id, third.id], [first.id, third.id])
        async with conn.begin():
            await service.create_workflow("order", "K-4", session=conn)
            await conn.rollback()
        await conn.begin()
        await service.create_workflow("order", "K-5", session=conn)  # closed with the connection
    assert await told.settled() == ([first.id, third.id], [first.id, third.id])
    assert await service.count_workflow_instances() == 2


async def test_a_session_whose_flush_failed_raises_a_typed_error(sql_repo: SQLAlchemyWorkflowRepo) -> None:
    """A session whose transaction an earlier flush error ended (it awaits the caller's rollback) is
    bad input: ParamInvalidError naming the way out, not SQLAlchemy's PendingRollbackError."""
    service, _ = fake_service(sql_repo, one_node_registry("order"))
    async with AsyncSession(sql_repo.engine) as session:
        await session.begin()
        session.add(Order(id=1, reference="F-1"))
        await session.flush()
        session.add(Order(id=1, reference="F-2"))
        with pytest.raises(IntegrityError):
            await session.flush()
        assert session.in_transaction()
        with pytest.raises(ParamInvalidError, match=r"rolled back by an earlier error.*rollback\(\)"):
            await service.create_workflow("order", "F-1", session=session)
        await session.rollback()
    assert await service.count_workflow_instances() == 0


async def _current_schema(engine: Any) -> str:
    async with engine.connect() as conn:
        return str((await conn.execute(text("SELECT current_schema()"))).scalar_one())


def _engine_on(url: str, schema: str, **url_changes: Any) -> Any:
    """A caller's own engine on ``url`` (changed by ``url_changes``) whose search_path is ``schema``."""
    return create_async_engine(
        make_url(url).set(**url_changes), connect_args={"server_settings": {"search_path": schema}}
    )


@pytest.mark.postgres
async def test_a_session_whose_search_path_finds_no_asyncflow_tables_is_refused(postgres_url: str) -> None:
    """Same URL, another schema (one without asyncflow's tables): refused before anything is written,
    naming both schemas, and the caller's transaction is still usable."""
    async with isolated_pg_engine(postgres_url) as engine, isolated_pg_engine(postgres_url) as bare:
        repo = SQLAlchemyWorkflowRepo(engine)
        await _prepare(repo)
        ours, theirs = await _current_schema(engine), await _current_schema(bare)
        service, _ = fake_service(repo, one_node_registry("order"))
        caller = _engine_on(postgres_url, theirs)
        try:
            async with AsyncSession(caller) as session, session.begin():
                with pytest.raises(ParamInvalidError, match=rf"(?s)schema.*{theirs}.*{ours}"):
                    await service.create_workflow("order", "N-1", session=session)
                assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
            assert await service.count_workflow_instances() == 0
        finally:
            await caller.dispose()
            await repo.aclose()


@pytest.mark.postgres
async def test_a_session_on_another_installs_schema_is_refused(postgres_url: str) -> None:
    """Same URL, the schema of another asyncflow install (its own tables): refused, nothing lands in
    either install."""
    async with isolated_pg_engine(postgres_url) as engine, isolated_pg_engine(postgres_url) as other_engine:
        repo, other = SQLAlchemyWorkflowRepo(engine), SQLAlchemyWorkflowRepo(other_engine)
        await _prepare(repo)
        await _prepare(other)
        ours, theirs = await _current_schema(engine), await _current_schema(other_engine)
        service, _ = fake_service(repo, one_node_registry("order"))
        other_service, _ = fake_service(other, one_node_registry("order"))
        caller = _engine_on(postgres_url, theirs)
        try:
            async with AsyncSession(caller) as session, session.begin():
                with pytest.raises(ParamInvalidError, match=rf"(?s)schema.*{theirs}.*{ours}"):
                    await service.create_workflow("order", "O-1", session=session)
            async with caller.connect() as conn, conn.begin():  # an AsyncConnection: the same
                with pytest.raises(ParamInvalidError, match=rf"(?s)schema.*{theirs}.*{ours}"):
                    await service.create_workflow("order", "O-2", session=conn)
            assert await service.count_workflow_instances() == 0
            assert await other_service.count_workflow_instances() == 0
        finally:
            await caller.dispose()
            await other.aclose()
            await repo.aclose()


@pytest.mark.postgres
async def test_an_engine_of_its_own_on_the_repo_s_schema_joins_and_is_read_once_per_transaction(
    postgres_url: str,
) -> None:
    """The caller's own engine on the repo's schema: accepted. Where it writes is read at the first
    create of each transaction (not each create), and again in the next transaction, whose
    search_path the caller may have changed."""
    async with isolated_pg_engine(postgres_url) as engine, isolated_pg_engine(postgres_url) as other_engine:
        repo, other = SQLAlchemyWorkflowRepo(engine), SQLAlchemyWorkflowRepo(other_engine)
        await _prepare(repo)
        await _prepare(other)
        ours, theirs = await _current_schema(engine), await _current_schema(other_engine)
        service, _ = fake_service(repo, one_node_registry("order"))
        caller = _engine_on(postgres_url, ours)
        try:
            reads = _place_reads(caller)
            async with caller.connect() as conn:
                async with conn.begin():
                    await conn.execute(text("CREATE TABLE app_note (id int)"))
                    await service.create_workflow("order", "J-1", session=conn)
                    await service.create_workflow("order", "J-2", session=conn)
                    assert len(reads) == 1
                async with conn.begin():  # this connection now writes to the other install's schema
                    await conn.execute(text(f'SET search_path TO "{theirs}"'))
                    with pytest.raises(ParamInvalidError, match=rf"(?s)schema.*{theirs}.*{ours}"):
                        await service.create_workflow("order", "J-3", session=conn)
                    await conn.execute(text(f'SET search_path TO "{ours}"'))
            assert len(reads) == 2
            assert await service.count_workflow_instances() == 2
            async with engine.connect() as conn:  # the caller's own table and the instances: one schema
                assert (await conn.execute(text("SELECT count(*) FROM app_note"))).scalar_one() == 0
        finally:
            await caller.dispose()
            await other.aclose()
            await repo.aclose()


def _place_reads(engine: Any) -> list[str]:
    """The statements ``engine`` runs from now on that read where a session writes (``to_regclass``);
    the listener goes with the engine (every test disposes of its engine)."""
    reads: list[str] = []

    def count_reads(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "to_regclass" in statement:
            reads.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", count_reads)
    return reads


def _other_name_of(url: str) -> str:
    """The host of ``url`` under its other loopback name (the same server)."""
    host = make_url(url).host
    names = {"127.0.0.1": "localhost", "localhost": "127.0.0.1"}
    if host not in names:
        pytest.skip(f"the test server's host {host!r} has no other loopback name to try")
    return names[host]


@pytest.mark.postgres
async def test_one_server_named_localhost_or_127_0_0_1_is_one_database(postgres_url: str) -> None:
    """The caller's engine names the repo's server otherwise (``localhost`` for ``127.0.0.1``): what
    the server reports (its database, start time and system identifier) says it is the same one, so
    the create joins the caller's transaction."""
    async with isolated_pg_engine(postgres_url) as engine:
        repo = SQLAlchemyWorkflowRepo(engine)
        await _prepare(repo)
        service, _ = fake_service(repo, one_node_registry("order"))
        caller = _engine_on(postgres_url, await _current_schema(engine), host=_other_name_of(postgres_url))
        try:
            with pytest.raises(RuntimeError, match="undo"):
                async with AsyncSession(caller) as session, session.begin():
                    session.add(Order(reference="L-1"))
                    await service.create_workflow("order", "L-1", session=session)
                    raise RuntimeError("undo")
            async with AsyncSession(caller) as session, session.begin():
                session.add(Order(reference="L-2"))
                await service.create_workflow("order", "L-2", session=session)
            assert await _orders(repo) == ["L-2"]
            assert [i.business_id for i in await service.query_workflow_instances()] == ["L-2"]
        finally:
            await caller.dispose()
            await repo.aclose()


@pytest.mark.postgres
async def test_another_database_of_the_same_server_is_refused(postgres_url: str) -> None:
    """Same server, same search_path, another database (``postgres``): refused, under either name
    of the server."""
    async with isolated_pg_engine(postgres_url) as engine:
        repo = SQLAlchemyWorkflowRepo(engine)
        await _prepare(repo)
        service, _ = fake_service(repo, one_node_registry("order"))
        schema = await _current_schema(engine)
        try:
            for host in (make_url(postgres_url).host, _other_name_of(postgres_url)):
                caller = _engine_on(postgres_url, schema, host=host, database="postgres")
                try:
                    async with caller.connect() as conn, conn.begin():
                        with pytest.raises(ParamInvalidError, match="another database"):
                            await service.create_workflow("order", "P-1", session=conn)
                finally:
                    await caller.dispose()
            assert await service.count_workflow_instances() == 0
        finally:
            await repo.aclose()


@pytest.mark.postgres
async def test_the_repo_s_own_pool_is_not_read(postgres_url: str) -> None:
    """A session on the repo's engine, or on one made from it with execution_options() (the same pool,
    so the same connections and settings), joins without the statement that reads where it writes."""
    async with isolated_pg_engine(postgres_url) as engine:
        repo = SQLAlchemyWorkflowRepo(engine)
        await _prepare(repo)
        service, _ = fake_service(repo, one_node_registry("order"))
        reads = _place_reads(engine)
        try:
            for bind in (engine, engine.execution_options(isolation_level="REPEATABLE READ")):
                async with AsyncSession(bind) as session, session.begin():
                    await service.create_workflow("order", "E-1", session=session)
            assert reads == []
            assert await service.count_workflow_instances() == 2
        finally:
            await repo.aclose()
