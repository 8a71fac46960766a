"""cancel_and_wait ends a task even when its first cancel is swallowed; supervised
restarts a crashed task, gives up on one that keeps crashing, lets cancellation through."""

from __future__ import annotations

import asyncio

from publisher.health import Health
from publisher.supervisor import describe_crash, supervised
from rediswire.tasks import cancel_and_wait, run_until
from tests.integration.conftest import eventually


async def test_a_swallowed_cancel_is_repeated() -> None:
    swallowed, started = asyncio.Event(), asyncio.Event()

    async def stubborn() -> None:
        started.set()
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed.is_set():
                    raise
                swallowed.set()  # as a library that loses the CancelledError would

    task = asyncio.create_task(stubborn())
    await started.wait()  # a task cancelled before it ran has nothing to swallow
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
            stop.set()  # running: now ask for the stop
            await asyncio.sleep(60)
        finally:
            finished.set()

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


# --- supervised ----------------------------------------------------------------------------


def _health(**policy) -> Health:
    policy = {"restart_backoff": (0.01, 0.02), "settle": 0.05, **policy}
    return Health(**policy)


async def test_a_crashed_task_is_restarted_on_the_same_objects_and_degrades_until_settled() -> None:
    health = _health()
    state = {"runs": 0}
    running = asyncio.Event()

    async def work() -> None:
        state["runs"] += 1
        if state["runs"] == 1:
            raise RuntimeError("injected")
        running.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(supervised("worker", work, health))
    try:
        await asyncio.wait_for(running.wait(), 5)
        assert state["runs"] == 2 and health.restarts == {"worker": 1} and health.task_restarts == 1
        assert health.degraded and "task worker" in health.reason
        assert "RuntimeError: injected" in health.reason
        await eventually(lambda: not health.degraded)  # the new run lasted ``settle``
        assert not health.fatal.is_set()
    finally:
        await cancel_and_wait(task)


async def test_a_task_that_keeps_crashing_makes_the_publisher_give_up() -> None:
    health = _health(max_restarts=3, restart_window=60.0)
    runs = 0

    async def broken() -> None:
        nonlocal runs
        runs += 1
        raise ValueError(f"bad {runs}")

    await asyncio.wait_for(supervised("broken", broken, health), 5)  # returns once it gives up
    assert runs == 4 and health.restarts == {"broken": 3}
    assert health.fatal.is_set()
    assert "broken" in health.fatal_reason and "4 times" in health.fatal_reason
    assert "ValueError: bad 4" in health.fatal_reason


async def test_crashes_spread_wider_than_the_window_never_give_up() -> None:
    health = _health(max_restarts=1, restart_window=0.001)
    runs = 0

    async def sometimes() -> None:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.01)  # each crash is older than the window by the next
        if runs < 5:
            raise RuntimeError("again")
        await asyncio.Event().wait()

    task = asyncio.create_task(supervised("sometimes", sometimes, health))
    try:
        await eventually(lambda: runs == 5)
        assert health.restarts == {"sometimes": 4} and not health.fatal.is_set()
    finally:
        await cancel_and_wait(task)


async def test_returning_early_is_a_crash_unless_done_says_so() -> None:
    health = _health(max_restarts=2)
    runs = 0

    async def returns() -> None:
        nonlocal runs
        runs += 1

    await asyncio.wait_for(supervised("quitter", returns, health), 5)
    assert runs == 3 and health.fatal.is_set() and "returned" in health.fatal_reason

    finished = _health()
    stopping = False

    async def stops() -> None:
        nonlocal stopping
        stopping = True

    await asyncio.wait_for(supervised("stopper", stops, finished, done=lambda: stopping), 5)
    assert finished.restarts == {} and not finished.degraded and not finished.fatal.is_set()


async def test_cancellation_goes_through_and_counts_for_nothing() -> None:
    health = _health()
    started, cleaned = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    task = asyncio.create_task(supervised("worker", work, health))
    await asyncio.wait_for(started.wait(), 5)
    await cancel_and_wait(task)
    assert task.cancelled() and cleaned.is_set()
    assert health.restarts == {} and not health.degraded and not health.fatal.is_set()


async def test_a_cancel_during_the_wait_before_a_restart_ends_it() -> None:
    health = _health(restart_backoff=(30.0, 30.0))
    crashed = asyncio.Event()

    async def work() -> None:
        crashed.set()
        raise RuntimeError("once")

    task = asyncio.create_task(supervised("worker", work, health))
    await asyncio.wait_for(crashed.wait(), 5)
    await asyncio.wait_for(cancel_and_wait(task), 5)
    assert task.cancelled() and health.restarts == {"worker": 1}


def test_a_crash_inside_a_task_group_is_named_by_its_one_exception() -> None:
    group = ExceptionGroup("unhandled errors in a TaskGroup", [KeyError("lane")])
    assert describe_crash(group) == "KeyError: 'lane'"
    assert describe_crash(RuntimeError()) == "RuntimeError"
