"""One generation request as the decode thread sees it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ._drafts import PromptLookup
from ._prefix_cache import Slot
from ._sampler import Sampler
from ._text import TextAssembler


class Sequence:
    """One generation request as the decode thread sees it.

    The event loop creates it and reads `queue`; everything else is the decode thread's,
    except `cancelled`, which the event loop sets.
    """

    __slots__ = (
        "request_id",
        "tokens",
        "max_tokens",
        "sampler",
        "text",
        "loop",
        "queue",
        "cancelled",
        "state",
        "enqueued_at",
        "admitted_at",
        "slot",
        "n_past",
        "started",
        "cached_tokens",
        "pending",
        "out_index",
        "chunk",
        "completion_tokens",
        "compute_seconds",
        "energy_joules",
        "outbox",
        "emitted",
        "lookup",
        "drafts",
        "guess",
        "hit_rate",
    )

    def __init__(
        self,
        *,
        tokens: list[int],
        max_tokens: int,
        sampler: Sampler,
        stops: tuple[str, ...],
        loop: asyncio.AbstractEventLoop,
        request_id: str = "",
    ) -> None:
        self.request_id = request_id
        self.tokens = tokens
        self.max_tokens = max_tokens
        self.sampler: Sampler | None = sampler
        self.text = TextAssembler(stops)
        self.loop = loop
        self.queue: asyncio.Queue[list[Any] | BaseException] = asyncio.Queue()
        self.cancelled = False
        self.state = "new"  # new -> waiting -> active -> done
        self.enqueued_at = time.monotonic()
        self.admitted_at = 0.0
        self.slot: Slot | None = None
        self.n_past = 0  # prompt/completion tokens whose KV is in the slot
        self.started = False  # prefill began (prefix reuse decided)
        self.cached_tokens = 0
        self.pending = -1  # sampled token not yet decoded
        self.out_index = -1  # batch row whose logits this sequence samples from
        self.chunk = 0  # prompt tokens this sequence put in the current batch
        self.completion_tokens = 0
        self.compute_seconds = 0.0
        self.energy_joules = 0.0
        self.outbox: list[Any] = []
        self.emitted = False
        self.lookup: PromptLookup | None = None  # built at the first decode step when drafting is on
        self.drafts: list[int] = []  # draft tokens in the rows after `pending` this step
        self.guess = -1  # the depth-1 guess, drafted or not (to measure how often guesses are right)
        self.hit_rate = -1.0  # how often this sequence's depth-1 guesses are right (-1: not seen yet)


def slot_order(seq: Sequence) -> int:
    return seq.slot.seq_id
