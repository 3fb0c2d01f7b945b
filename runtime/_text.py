"""Turns sampled token bytes into text that is safe to emit: whole UTF-8 characters, stop strings cut."""

from __future__ import annotations

import codecs


class TextAssembler:
    """Incremental detokeniser for one sequence.

    Token pieces arrive as bytes; an incomplete multi-byte character is buffered until it
    completes. Text that could be the start of a stop string is held back until it either
    becomes a stop (then it is dropped, with everything after it) or cannot be one any more.
    """

    __slots__ = ("_decoder", "_stops", "_max_hold", "_held")

    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stops = tuple(s for s in stops if s)
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._held = ""

    def push(self, piece: bytes) -> tuple[str, bool]:
        """Add one token's bytes; return (text safe to emit now, whether a stop string matched)."""
        text = self._decoder.decode(piece)
        if not self._stops:
            return text, False
        buf = self._held + text
        if not buf:
            return "", False
        cut = -1
        for stop in self._stops:
            at = buf.find(stop)
            if at >= 0 and (cut < 0 or at < cut):
                cut = at
        if cut >= 0:
            self._held = ""
            return buf[:cut], True
        keep = self._stop_prefix_len(buf)
        if keep:
            self._held = buf[-keep:]
            return buf[:-keep], False
        self._held = ""
        return buf, False

    def flush(self) -> str:
        """Return everything still held back (the stream ended without a stop string)."""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text

    def _stop_prefix_len(self, buf: str) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of some stop string."""
        for k in range(min(len(buf), self._max_hold), 0, -1):
            tail = buf[-k:]
            if any(stop.startswith(tail) for stop in self._stops):
                return k
        return 0
