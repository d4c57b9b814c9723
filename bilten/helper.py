"""Helper processes: CPU-bound work (mail rendering, signing ticket codes) off the event loop.

A helper is one spawned process (a ``ProcessPoolExecutor`` of one) that dies with this one,
``kill -9`` included, and leaves Ctrl-C to it. Work sent to it must be a module-level function
of plain arguments.

:class:`Helper` is the kind that never fails its caller: until its process has started, and
whenever it has died, the work runs here instead, and a supervised worker starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from bilten import embedded
from bilten.supervisor import Worker

T = TypeVar("T")


def _started(parent: int) -> None:
    """In the helper: never outlive this process (kill -9 included), and leave Ctrl-C in a
    terminal, which signals the whole process group, to the parent that stops it. The helper
    was started with SIGINT blocked (see :func:`start`), so a Ctrl-C during its imports
    waited."""
    embedded.die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _ready() -> bool:
    return True


async def start(warm_up: Callable[..., Any] = _ready, *args: Any) -> ProcessPoolExecutor:
    """A new helper process, running once it has done ``warm_up(*args)`` (its imports: a new
    process takes a moment, better spent now than at the first real job)."""
    executor = ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_started,
        initargs=(os.getpid(),),
    )
    try:
        # The process inherits a blocked SIGINT: a Ctrl-C before its initializer ignores the
        # signal would otherwise interrupt its imports with a traceback.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            done = asyncio.get_running_loop().run_in_executor(executor, warm_up, *args)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        await done
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    return executor


class Helper:
    """A helper process that work may use, and runs without: :meth:`run` gives the same result
    either way. Started and restarted by :meth:`worker`."""

    def __init__(self) -> None:
        self.executor: ProcessPoolExecutor | None = None  # None: the work runs in this process
        self.broken = asyncio.Event()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the helper; here, should there be none or should it die meanwhile
        (``fn`` must be safe to run twice: pure work)."""
        executor = self.executor
        if executor is not None:
            try:
                return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
            except BrokenProcessPool:
                if self.executor is executor:
                    self.executor = None
                    self.broken.set()
        return fn(*args)

    def worker(self) -> Worker:
        """Keeps a helper process running until ``stop``: a new one when it dies."""

        async def run(stop: asyncio.Event) -> None:
            executor = await start()
            self.broken.clear()
            self.executor = executor
            try:
                stopping = asyncio.ensure_future(stop.wait())
                dying = asyncio.ensure_future(self.broken.wait())
                try:
                    await asyncio.wait({stopping, dying}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopping.cancel()
                    dying.cancel()
            finally:
                if self.executor is executor:
                    self.executor = None
                with contextlib.suppress(Exception):
                    executor.shutdown(wait=False, cancel_futures=True)
            if not stop.is_set():
                raise RuntimeError("the helper process died; starting a new one")

        return run
