"""A streamed export read from a snapshot of the database, off the event loop."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from appliance.store import Store

__all__ = ["export_stream"]


async def export_stream(
    store: Store, lines_of: Callable[[sqlite3.Connection], Iterator[str]], batch: int = 500
) -> AsyncIterator[str]:
    """`lines_of(conn)` in batches read in a worker thread, on a snapshot connection of its own
    that closes at the end, or when the client goes away (the stream is then closed, and this
    generator with it)."""
    snapshot = store.snapshot()
    conn = await asyncio.to_thread(snapshot.__enter__)
    lines = lines_of(conn)
    try:
        while chunk := await asyncio.to_thread(lambda: list(itertools.islice(lines, batch))):
            yield "".join(chunk)
    finally:
        await asyncio.to_thread(_close, lines, snapshot)


def _close(lines: Iterator[str], snapshot: Any) -> None:
    lines.close()  # type: ignore[attr-defined]
    snapshot.__exit__(None, None, None)
