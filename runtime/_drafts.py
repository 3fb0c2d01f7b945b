"""Speculative decoding by prompt lookup: guessed tokens ride along in a decode step and are
kept only when sampling would have produced them anyway.

Why it can pay: llama.cpp's CPU matrix kernels are shape-sensitive; on the 2-core build
machine 8 sequences of 2 rows cost about 1.15 times 8 single rows. Eight streams that each add
a guessed token can get up to twice the tokens for that price. Answers that copy from their
prompt (corrections, rewrites, extraction) keep about two thirds of their guesses and come out
11-16% faster; free text keeps 25-35%, where a wider step only breaks even.

Why answers cannot change: a sequence samples its first row exactly as without drafts. Only
when the sampled token equals the draft are the draft row's logits (the model's next-token
distribution after that token) sampled next, by the same sampler, consuming the same random
draws; a wrong draft's KV cell is dropped. Every token is thus chosen by the same sampler
from the same logits as without drafts: the same text at temperature 0 and for a given seed.

`DraftPolicy` decides how many guesses each sequence gets per step from what it measures: the
cost of each step shape against undrafted steps, and how often guesses are right.
Where wider steps do not pay (one stream on a CPU, where two rows cost twice one), it drafts
nothing.
"""

from __future__ import annotations

import math
from typing import Any

# Longest n-gram matched: 3 tokens finds repeated phrases; 1 token still guesses a word's usual continuation.
MAX_NGRAM = 3
# Every this many decode steps, the runner-up choice runs (two steps) so its cost estimate keeps up
# with the machine (a shared box drifts by 20% within minutes), if it is within this
# fraction of the best: one stream on a CPU, where two rows cost twice one, never pays it.
EXPLORE_EVERY = 32
EXPLORE_WITHIN = 0.8
_RANK_FOR = 8  # steps a ranking of the choices is reused before it is worked out again
_COST_WEIGHT = 0.2  # EWMA weight of a new step-time sample (undrafted steps, and cost ratios)
_HIT_WEIGHT = 0.02  # EWMA weight of one guess's outcome
# Drafting must promise this much more than not drafting: the estimates are noisy, and a
# step's guesses are worth less than its average when they come in runs.
_MARGIN = 1.1
_DOUBT = 0.3  # a ratio measured m times counts as (1 + _DOUBT / sqrt(m)) times itself
_PRIOR_HIT_RATE = 0.3  # until measured; deeper guesses are only measured when drafted


class PromptLookup:
    """One sequence's tokens so far, indexed so that `propose` is a few dict lookups.

    `_next` maps the 1-, 2- and 3-token n-grams seen so far (an int, a pair, a triple) to the
    token that followed their latest occurrence.
    """

    __slots__ = ("_next", "_tail")

    def __init__(self, tokens: list[int]) -> None:
        self._next: dict[Any, int] = {}
        self._tail: list[int] = []
        for token in tokens:
            self.push(token)

    def push(self, token: int) -> None:
        tail, follows = self._tail, self._next
        n = len(tail)
        if n:
            follows[tail[-1]] = token
            if n >= 2:
                follows[(tail[-2], tail[-1])] = token
                if n >= 3:
                    follows[(tail[-3], tail[-2], tail[-1])] = token
            if n == MAX_NGRAM:
                del tail[0]
        tail.append(token)

    def propose(self, k: int) -> list[int]:
        """`k` guesses for the tokens after the last one pushed, each from the longest n-gram
        that occurred before; where none did, the previous token again."""
        follows = self._next
        tail = list(self._tail)
        out: list[int] = []
        for _ in range(k):
            guess = None
            for n in range(min(MAX_NGRAM, len(tail)), 0, -1):
                guess = follows.get(tuple(tail[-n:]) if n > 1 else tail[-1])
                if guess is not None:
                    break
            if guess is None:
                guess = tail[-1] if tail else 0
            out.append(guess)
            tail.append(guess)
        return out


class DraftPolicy:
    """How many draft tokens every decoding sequence gets in the next step.

    With `k` drafts a sequence is expected to produce E_k = 1 + a1 + a1*a2 + ... tokens, `a_i`
    being the rate at which a guess at depth i is right given the ones before it were. The step
    costs r(n, k) times one without drafts, measured for each shape (n sequences of k + 1 rows:
    llama.cpp's kernels differ by shape, not only by total rows) against recent undrafted
    steps of n sequences, so that a longer context, which slows both, does not skew the ratio;
    a ratio measured only a few times is taken as dearer than it looked.
    Drafting wins when E_k / r(n, k) beats 1 by `_MARGIN`. A shape not measured yet is tried
    for two steps; every `EXPLORE_EVERY` steps a close runner-up is re-measured, or, every other
    time while drafting, the undrafted step. `fixed` always drafts that many (for tests and benchmarks).
    """

    def __init__(self, max_drafts: int, *, max_rows: int, fixed: int | None = None) -> None:
        if max_drafts < 0 or (fixed is not None and not 0 <= fixed <= max_drafts):
            raise ValueError("need 0 <= fixed <= max_drafts")
        self.max_drafts = max_drafts
        self.max_rows = max_rows
        self.fixed = fixed
        self._base: dict[int, float] = {}  # sequences -> seconds of an undrafted step (EWMA)
        self._base_at: dict[int, int] = {}  # sequences -> self._steps when that was last timed
        self._ratio: dict[tuple[int, int], float] = {}  # (sequences, rows each) -> cost / undrafted cost
        self._samples: dict[tuple[int, int], int] = {}
        self._hit = [_PRIOR_HIT_RATE] * (max_drafts + 1)  # index = depth, from 1
        self._steps = 0
        self._measure = False
        self._held: tuple[int, int] | None = None  # (sequences, drafts) to repeat at the next step
        self._ranked: dict[tuple[int, int], tuple[int, list[int]]] = {}  # (n, limit) -> (step, choices best first)
        self.drafted = 0
        self.kept = 0

    @property
    def enabled(self) -> bool:
        return self.max_drafts > 0

    @property
    def first_hit_rate(self) -> float:
        """How often a depth-1 guess is right, over all sequences lately."""
        return self._hit[1] if self.max_drafts else 0.0

    def choose(self, n: int, room: int, first_hit: float | None = None) -> int:
        """Drafts per sequence for a step of `n` decoding sequences, each with at least `room`
        more tokens to produce after this step's first one; `first_hit` is those sequences' own
        depth-1 hit rate (their mean), when known: a copying answer guesses far better than a story."""
        limit = min(self.max_drafts, room, self.max_rows // max(n, 1) - 1)
        # Steps whose choice a sequence's last tokens forced come at the longest context, the
        # slowest steps of a request: measuring those as "undrafted" would flatter drafting.
        self._measure = room >= self.max_drafts
        if limit <= 0:
            return 0
        if self.fixed is not None:
            return min(self.fixed, limit)
        self._steps += 1
        if self._held is not None and self._held[0] == n and self._held[1] <= limit:
            k, self._held = self._held[1], None  # the second step of a trial: the one that is timed
            return k
        if n not in self._base:
            return self._hold(n, 0)
        for k in range(1, limit + 1):
            if (n, k + 1) not in self._ratio:
                return self._hold(n, k)  # never measured: try it
        first = self.first_hit_rate if first_hit is None else first_hit
        key = (n, limit, round(first * 20))
        cached = self._ranked.get(key)
        if cached is not None and self._steps - cached[0] < _RANK_FOR:
            ranked = cached[1]
        else:
            ranked = sorted(
                range(limit + 1), key=lambda k: self.gain(n, k, first) / (_MARGIN if k else 1.0), reverse=True
            )
            self._ranked[key] = (self._steps, ranked)
        if self._steps % EXPLORE_EVERY == 0:
            if ranked[0] != 0 and (self._steps // EXPLORE_EVERY) % 2:
                # Every ratio is against the undrafted step: while drafting, re-time that one
                # too, or a base from slower minutes (longer contexts) makes drafting look cheap.
                return self._hold(n, 0)
            best, second = (self.gain(n, k, first) for k in ranked[:2])
            if second >= EXPLORE_WITHIN * best:
                return self._hold(n, ranked[1])
        return ranked[0]

    def _hold(self, n: int, k: int) -> int:
        """Run `k` for two steps: only the second step of a new shape is timed (see `record_step`)."""
        self._held = (n, k)
        return k

    def gain(self, n: int, k: int, first_hit: float | None = None) -> float:
        """Expected tokens per second with `k` drafts, relative to none (1.0)."""
        if k == 0:
            return 1.0
        key = (n, k + 1)
        ratio = self._ratio.get(key)
        if not ratio:
            return 0.0
        # Step times are noisy: a ratio seen a few times is taken as dearer than measured.
        doubt = 1.0 + _DOUBT / math.sqrt(self._samples[key])
        return self.expected_tokens(k, first_hit) / (ratio * doubt)

    def expected_tokens(self, k: int, first_hit: float | None = None) -> float:
        """Tokens a sequence is expected to produce in a step with `k` drafts (1 without)."""
        total, chain = 1.0, 1.0
        for depth in range(1, k + 1):
            chain *= first_hit if depth == 1 and first_hit is not None else self._hit[depth]
            total += chain
        return total

    def record_step(self, n: int, rows_each: int, seconds: float) -> None:
        """The time of the step just chosen: `n` sequences with `rows_each` rows each. The loop
        reports only steps shaped like the one before (prompt chunks, a new shape's first step
        and steps that also copied KV are slower for reasons of their own)."""
        if not self._measure:
            return
        if rows_each == 1:
            old = self._base.get(n)
            # A base last timed more than EXPLORE_EVERY steps ago is replaced, not averaged into.
            fresh = self._steps - self._base_at.get(n, self._steps) <= EXPLORE_EVERY
            self._base[n] = seconds if old is None or not fresh else old + _COST_WEIGHT * (seconds - old)
            self._base_at[n] = self._steps
            return
        base = self._base.get(n)
        if not base:
            return
        key = (n, rows_each)
        old = self._ratio.get(key)
        ratio = max(seconds / base, 1.0)  # more rows never cost less: below 1 is the machine's drift
        self._ratio[key] = ratio if old is None else old + _COST_WEIGHT * (ratio - old)
        self._samples[key] = self._samples.get(key, 0) + 1

    def record_guess(self, depth: int, hit: bool) -> None:
        """A guess at `depth` (1 = the token after the pending one), drafted or only compared
        with the sampled token, was right or wrong."""
        if depth <= self.max_drafts:
            self._hit[depth] += _HIT_WEIGHT * (hit - self._hit[depth])

    def record_drafts(self, decoded: int, kept: int) -> None:
        """A sequence's step decoded `decoded` draft rows, of which the first `kept` were right."""
        self.drafted += decoded
        self.kept += kept

    def snapshot(self) -> dict[str, Any]:
        return {
            "max_drafts": self.max_drafts,
            "drafted": self.drafted,
            "kept": self.kept,
            "hit_rate_by_depth": [round(h, 3) for h in self._hit[1:]],
            "step_cost_vs_undrafted": {f"{n}x{r}": round(v, 3) for (n, r), v in sorted(dict(self._ratio).items())},
        }
