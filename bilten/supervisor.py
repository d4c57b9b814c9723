"""A small supervisor for the process's background coroutines.

Each worker is ``async def worker(stop: asyncio.Event) -> None``: it loops until ``stop`` is
set. A worker that raises is logged and restarted after a backoff that doubles up to a
ceiling; one that ran long enough before crashing starts again from the shortest backoff.
Shutdown sets ``stop``, waits for the workers to finish their current job, then cancels the
ones that did not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from bilten import metrics

log = logging.getLogger(__name__)

Worker = Callable[[asyncio.Event], Awaitable[None]]

BACKOFF_MIN = 0.1
BACKOFF_MAX = 30.0
HEALTHY_AFTER = 60.0  # seconds of running that reset the backoff


class Supervisor:
    def __init__(self, *, backoff_min: float = BACKOFF_MIN, backoff_max: float = BACKOFF_MAX):
        self.stop_event = asyncio.Event()
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.restarts: dict[str, int] = {}

    def start(self, name: str, worker: Worker) -> None:
        if name in self.tasks:
            raise ValueError(f"worker {name!r} is already running")
        self.restarts[name] = 0
        self.tasks[name] = asyncio.create_task(self._run(name, worker), name=f"worker:{name}")

    async def _run(self, name: str, worker: Worker) -> None:
        backoff = self.backoff_min
        while not self.stop_event.is_set():
            began = time.monotonic()
            try:
                await worker(self.stop_event)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("worker %s crashed; restarting in %.1f s", name, backoff)
            else:
                if self.stop_event.is_set():
                    return
                log.warning(
                    "worker %s returned before shutdown; restarting in %.1f s", name, backoff
                )
            if time.monotonic() - began >= HEALTHY_AFTER:
                backoff = self.backoff_min
            self.restarts[name] += 1
            metrics.WORKER_RESTARTS.labels(name).inc()
            try:
                await asyncio.wait_for(self.stop_event.wait(), backoff)
            except TimeoutError:
                pass
            backoff = min(backoff * 2, self.backoff_max)

    async def stop(self, timeout: float) -> None:
        """Ask every worker to stop, wait up to ``timeout`` seconds, cancel the rest."""
        self.stop_event.set()
        if not self.tasks:
            return
        tasks = list(self.tasks.values())
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            log.warning(
                "worker %s did not stop within %.1f s; cancelling", task.get_name(), timeout
            )
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.clear()
