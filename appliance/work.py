"""Worker threads for the control plane's CPU work off the event loop (rendering and
tokenising prompts, compiling grammars, redacting and encoding audit records), at a lower
CPU priority than the decode thread: on a 2-core box a 4 MB prompt being tokenised would
otherwise take a core from llama.cpp's threads, and every stream would stall with it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
NICENESS = 10  # Linux gives a nice-10 thread about a tenth of a core a nice-0 thread wants
# Work on less text than this runs on the loop: it takes tens of microseconds, less than the
# hop to a worker thread and back (and a nice-10 thread waits for the CPU under load).
INLINE_CHARS = 8192


def _lower_priority() -> None:
    try:  # PRIO_PROCESS with a thread id sets that thread's nice value on Linux
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)
    except (AttributeError, OSError) as exc:  # another OS, or not permitted: run at normal priority
        log.debug("worker thread keeps its priority: %s", exc)


class WorkPool:
    def __init__(self, workers: int | None = None) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers or min(8, (os.cpu_count() or 1) + 2),
            thread_name_prefix="control-work",
            initializer=_lower_priority,
        )

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def run_for(self, chars: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn` on the loop when it works on fewer than `INLINE_CHARS` characters, else `run`."""
        if chars < INLINE_CHARS:
            return fn(*args, **kwargs)
        return await self.run(fn, *args, **kwargs)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
