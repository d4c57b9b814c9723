import asyncio
import itertools

from bilten.supervisor import Supervisor


async def test_crashing_worker_is_restarted_with_growing_backoff():
    runs: list[float] = []
    loop = asyncio.get_running_loop()

    async def flaky(stop: asyncio.Event) -> None:
        runs.append(loop.time())
        if len(runs) < 4:
            raise RuntimeError("crash")
        await stop.wait()

    supervisor = Supervisor(backoff_min=0.02, backoff_max=1)
    supervisor.start("flaky", flaky)
    for _ in range(200):
        if len(runs) >= 4:
            break
        await asyncio.sleep(0.01)
    assert len(runs) == 4
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert gaps[0] >= 0.02 and gaps[1] >= 0.04 and gaps[2] >= 0.08
    assert supervisor.restarts["flaky"] == 3
    await supervisor.stop(timeout=1)
    assert not supervisor.tasks


async def test_stop_waits_for_current_job_then_cancels_stragglers():
    finished = []
    cancelled = []

    async def polite(stop: asyncio.Event) -> None:
        await stop.wait()
        await asyncio.sleep(0.05)  # finishing the job in hand
        finished.append("polite")

    async def stubborn(stop: asyncio.Event) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append("stubborn")
            raise

    supervisor = Supervisor()
    supervisor.start("polite", polite)
    supervisor.start("stubborn", stubborn)
    await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await supervisor.stop(timeout=0.3)
    assert finished == ["polite"]
    assert cancelled == ["stubborn"]
    assert loop.time() - began < 1


async def test_a_worker_returning_early_is_restarted():
    calls = 0

    async def quitter(stop: asyncio.Event) -> None:
        nonlocal calls
        calls += 1
        if calls > 2:
            await stop.wait()

    supervisor = Supervisor(backoff_min=0.01)
    supervisor.start("quitter", quitter)
    await asyncio.sleep(0.2)
    await supervisor.stop(timeout=1)
    assert calls == 3
