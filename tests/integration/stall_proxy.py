"""A TCP proxy in front of PostgreSQL whose replies can be held back: a statement reaches the server
and runs, but its client waits (a slow network), so a test can cut the wait at a chosen statement."""

from __future__ import annotations

import asyncio
import contextlib

from sqlalchemy.engine import make_url


class StallProxy:
    """Forwards 127.0.0.1:<port> to the server of ``url``. After :meth:`hold_replies_after`, the first
    connection that sends ``marker`` gets no more replies (``held`` is set) until :meth:`resume`, from
    its ``later``-th send after the one with the marker on (asyncpg prepares a statement in one round
    trip, then executes it in the next: ``later=1`` holds the reply to the execution)."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self._target = (parsed.host or "127.0.0.1", parsed.port or 5432)
        self._url = parsed
        self._marker: bytes | None = None
        self._later = 0
        self._armed: asyncio.Event | None = None  # the gate of the connection that sent the marker
        self.held = asyncio.Event()
        self._gates: list[asyncio.Event] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> StallProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        self.resume()
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        """The database URL through the proxy."""
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return self._url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)

    def hold_replies_after(self, marker: bytes, *, later: int = 0) -> None:
        self._marker = marker
        self._later = later

    def resume(self) -> None:
        for gate in self._gates:
            gate.set()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(*self._target)
        self._writers += [client_writer, server_writer]
        gate = asyncio.Event()
        gate.set()
        self._gates.append(gate)
        for pump in (
            self._pump(client_reader, server_writer, gate, watch=True),
            self._pump(server_reader, client_writer, gate, watch=False),
        ):
            task = asyncio.create_task(pump)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gate: asyncio.Event, *, watch: bool
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if watch and self._marker is not None and self._marker in data:
                    self._marker = None
                    self._armed = gate
                elif watch and self._armed is gate:
                    self._later -= 1
                if watch and self._armed is gate and self._later <= 0:
                    self._armed = None
                    gate.clear()  # before the statement leaves: its reply is held
                    self.held.set()
                if not watch:
                    await gate.wait()
                writer.write(data)
                await writer.drain()
        writer.close()
