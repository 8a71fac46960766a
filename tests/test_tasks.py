"""cancel_and_wait ends a task even when its first cancel is swallowed."""

from __future__ import annotations

import asyncio

from publisher.tasks import cancel_and_wait, run_until


async def test_a_swallowed_cancel_is_repeated() -> None:
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed.is_set():
                    raise
                swallowed.set()  # as a library that loses the CancelledError would

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task, retry=0.05), 5)
    assert swallowed.is_set() and task.cancelled()


async def test_none_and_finished_tasks_are_fine() -> None:
    await cancel_and_wait(None)
    done = asyncio.create_task(asyncio.sleep(0))
    await done
    await cancel_and_wait(done)


async def test_run_until_stops_work_when_asked_and_raises_its_errors() -> None:
    stop = asyncio.Event()
    finished = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            finished.set()

    asyncio.get_running_loop().call_later(0.05, stop.set)
    await asyncio.wait_for(run_until(forever(), stop), 5)
    assert finished.is_set()

    async def broken() -> None:
        raise ValueError("bad")

    try:
        await run_until(broken(), asyncio.Event())
    except ValueError as exc:
        assert str(exc) == "bad"
    else:
        raise AssertionError("the error was lost")
