"""One thread takes the decode steps of every loaded engine in turn: two models decoding on two
threads would each bring a llama.cpp thread pool to the same cores."""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Protocol

__all__ = ["DecodeThread", "shared_decode_thread"]

log = logging.getLogger(__name__)


class Loop(Protocol):
    """What the thread needs of a `BatchLoop`."""

    def has_work(self) -> bool:
        """Called with `cond` held."""
        ...

    def run_once(self) -> None:
        """One turn, called without `cond`; a loop that shuts down detaches itself."""
        ...


class DecodeThread:
    """One thread and the condition that every attached loop uses as its lock.

    The thread gives each loop with work one turn in rotation (its queued calls, a shared item,
    one decode step), so a busy engine delays another by at most one step, and sleeps on `cond`
    while no loop has work. It starts on the first `attach` and ends when the last loop
    detaches; the next `attach` starts a new one.
    """

    def __init__(self, name: str = "decode") -> None:
        self.name = name
        self.cond = threading.Condition()
        self._loops: deque[Loop] = deque()
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def attach(self, loop: Loop) -> None:
        with self.cond:
            self._loops.append(loop)
            if not self.alive:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self.cond.notify()

    def detach(self, loop: Loop) -> None:
        with self.cond:
            if loop in self._loops:
                self._loops.remove(loop)
            self.cond.notify()

    def _run(self) -> None:
        while (loop := self._next()) is not None:
            try:
                loop.run_once()
            except BaseException:  # pragma: no cover - run_once handles its own failures; the others keep serving
                log.exception("decode turn failed")
                self.detach(loop)

    def _next(self) -> Loop | None:
        """The next loop with work, round robin; None, and the thread ends, once none is attached."""
        with self.cond:
            while self._loops:
                for _ in range(len(self._loops)):
                    loop = self._loops[0]
                    self._loops.rotate(-1)
                    if loop.has_work():
                        return loop
                self.cond.wait()  # submit(), cancel(), call(), stop() and attach() notify
            self._thread = None
            return None


_shared: DecodeThread | None = None
_shared_lock = threading.Lock()


def shared_decode_thread() -> DecodeThread:
    """The process's decode thread, used by every engine not given its own."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = DecodeThread()
        return _shared
