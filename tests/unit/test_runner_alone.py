"""A pass's lone branch (no task group): its visibility writes are waited for when it ends normally,
even when the pass runs inside a caller's ``except`` block (``sys.exc_info()`` sees the caller's
exception there: the branch did not raise)."""

from __future__ import annotations

import asyncio

from asyncflow.engine.runner import PassRunner


async def _lone_branch_write_landed(in_except: bool) -> bool:
    runner = PassRunner.__new__(PassRunner)  # only _alone's own state is used
    landed = asyncio.Event()

    async def write() -> None:  # a visibility write started while the pass had no task group
        await asyncio.sleep(0.01)
        landed.set()

    async def drive_here(task_type: str) -> None:  # the lone branch: starts the write, ends normally
        runner._loose = {asyncio.get_running_loop().create_task(write())}

    runner._drive_here = drive_here  # type: ignore[method-assign]
    if in_except:
        try:
            raise KeyError("the caller's own exception, being handled")
        except KeyError:
            await runner._alone("X")
    else:
        await runner._alone("X")
    return landed.is_set()


async def test_a_lone_branch_waits_for_its_writes() -> None:
    assert await _lone_branch_write_landed(in_except=False)


async def test_a_lone_branch_inside_a_callers_except_block_still_waits_for_its_writes() -> None:
    assert await _lone_branch_write_landed(in_except=True)
