"""Per-sequence llama.cpp sampler chains, and the GBNF grammars behind response_format."""

from __future__ import annotations

import ctypes
import json
import math
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from ._native import Model
from .engine import SamplingParams
from .errors import GrammarDeadEnd, InvalidGenerationRequest

#: GBNF for "any JSON object" (OpenAI `response_format: {"type": "json_object"}`).
JSON_OBJECT_GRAMMAR: str = JSON_GBNF

_PENALTY_LAST_N = 64

# The converter spells repetitions out, so `{"minItems": 10**9}` would build gigabytes of GBNF.
# No answer that fits a context window needs more than this many repetitions of anything.
MAX_SCHEMA_REPEAT = 100_000
MAX_GRAMMAR_BYTES = 256 * 1024
_REPEAT_KEYS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties")

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


def json_schema_to_grammar(schema: dict[str, Any]) -> str:
    """GBNF that only admits JSON documents matching `schema` (OpenAI `json_schema` response format)."""
    _check_repeats(schema)
    try:
        grammar = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises bare ValueError/KeyError/TypeError on bad schemas
        raise InvalidGenerationRequest(f"unsupported JSON schema: {exc}") from exc
    if len(grammar) > MAX_GRAMMAR_BYTES:
        raise InvalidGenerationRequest(
            f"JSON schema is too complex to enforce ({len(grammar)} bytes of grammar, limit {MAX_GRAMMAR_BYTES})"
        )
    return grammar


def _check_repeats(node: Any) -> None:
    """Refuse repetition counts the converter would expand into an unbounded grammar."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key in _REPEAT_KEYS:
                value = item.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool) and value > MAX_SCHEMA_REPEAT:
                    raise InvalidGenerationRequest(f"JSON schema {key} {value} exceeds {MAX_SCHEMA_REPEAT}")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def validate(params: SamplingParams) -> None:
    """Reject values llama.cpp would misbehave on, before anything is queued."""
    checks = (
        (math.isfinite(params.temperature) and params.temperature >= 0, "temperature must be >= 0"),
        (math.isfinite(params.top_p) and 0 <= params.top_p <= 1, "top_p must be in [0, 1]"),
        (params.top_k >= 0, "top_k must be >= 0"),
        (math.isfinite(params.min_p) and 0 <= params.min_p <= 1, "min_p must be in [0, 1]"),
        (math.isfinite(params.repeat_penalty) and params.repeat_penalty > 0, "repeat_penalty must be > 0"),
        (math.isfinite(params.presence_penalty) and -2 <= params.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
        (math.isfinite(params.frequency_penalty) and -2 <= params.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
    )
    for ok, message in checks:
        if not ok:
            raise InvalidGenerationRequest(message)


class Sampler:
    """One sequence's sampling: an optional grammar, then a llama.cpp sampler chain.

    Without a grammar, `sample` is llama.cpp's own `llama_sampler_sample`. With one, it runs the
    same steps itself so that it can look between them: llama.cpp accepts whatever token the
    chain selects, and accepting a token the grammar rejected throws a C++ exception through
    the C API, which terminates the process. That happens whenever the grammar admits nothing
    the vocabulary can spell, and a staff app can ask for such a grammar with a JSON schema.
    Here a dead end raises `GrammarDeadEnd` instead, and only that sequence fails.

    Greedy sequences first try the chain alone and ask the grammar about that one token (as
    llama.cpp's own common sampler does): the grammar only masks, so a global argmax it allows
    is also the argmax of the masked logits, the same token at a fraction of the cost of
    matching the grammar against the whole vocabulary. Otherwise, and for any other sampling,
    the grammar masks the vocabulary first.
    """

    __slots__ = ("chain", "grammar", "greedy", "_n_vocab", "_ids", "_cur", "_view", "_array", "_one", "_one_array")

    def __init__(self, chain: int, grammar: int | None, n_vocab: int, *, greedy: bool = False) -> None:
        self.chain = chain
        self.grammar = grammar
        self.greedy = greedy
        self._n_vocab = n_vocab
        if grammar is not None:
            self._ids = np.arange(n_vocab, dtype=np.int32)
            self._cur = (llama_cpp.llama_token_data * n_vocab)()
            self._view = np.frombuffer(self._cur, dtype=_TOKEN_DATA)
            self._array = llama_cpp.llama_token_data_array(self._cur, n_vocab, -1, False)
            self._one = (llama_cpp.llama_token_data * 1)()
            self._one_array = llama_cpp.llama_token_data_array(self._one, 1, -1, False)

    def sample(self, ctx: Any, index: int) -> int:
        """The next token from the logits of batch row `index`; the samplers accept it."""
        if self.grammar is None:
            return llama_cpp.llama_sampler_sample(self.chain, ctx, index)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(self._n_vocab,))
        token = self._greedy_guess(logits) if self.greedy else -1
        if token < 0:
            token = self._masked(logits)
        llama_cpp.llama_sampler_accept(self.grammar, token)
        llama_cpp.llama_sampler_accept(self.chain, token)
        return token

    def _fill(self, logits: np.ndarray) -> Any:
        view, array = self._view, self._array
        view["id"] = self._ids
        view["logit"] = logits
        view["p"] = 0.0
        array.data, array.size, array.selected, array.sorted = self._cur, self._n_vocab, -1, False
        return ctypes.byref(array)

    def _selected(self) -> int:
        array = self._array
        if not 0 <= array.selected < array.size:
            raise GrammarDeadEnd("the sampler selected no token")
        return int(array.data[array.selected].id)

    def _greedy_guess(self, logits: np.ndarray) -> int:
        """The chain's pick if the grammar allows it, else -1."""
        llama_cpp.llama_sampler_apply(self.chain, self._fill(logits))
        token = self._selected()
        one, array = self._one[0], self._one_array
        one.id, one.logit, one.p = token, 0.0, 0.0
        array.data, array.size, array.selected, array.sorted = self._one, 1, -1, False
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(array))
        return token if math.isfinite(self._one[0].logit) else -1

    def _masked(self, logits: np.ndarray) -> int:
        arg = self._fill(logits)
        llama_cpp.llama_sampler_apply(self.grammar, arg)
        if not np.isfinite(self._view["logit"]).any():
            raise GrammarDeadEnd("the response format admits no text this model can produce at this point")
        llama_cpp.llama_sampler_apply(self.chain, arg)
        return self._selected()

    def free(self) -> None:
        if self.grammar is not None:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None
        if self.chain:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = 0


def build_sampler(model: Model, params: SamplingParams) -> Sampler:
    """A new sampler (caller frees it). Grammar first, then the usual pipeline.

    Penalties (repeat, frequency, presence) first, then greedy at temperature 0, otherwise
    top_k -> top_p -> min_p -> temperature -> dist(seed).
    Raises `InvalidGenerationRequest` when the grammar does not compile.
    """
    validate(params)
    grammar = None
    if params.grammar is not None:
        grammar = llama_cpp.llama_sampler_init_grammar(model.vocab, params.grammar.encode("utf-8"), b"root")
        if not grammar:
            raise InvalidGenerationRequest("grammar does not compile (GBNF with a `root` rule expected)")
    try:
        chain = _build_chain(params, model.n_vocab)
    except BaseException:
        if grammar:
            llama_cpp.llama_sampler_free(grammar)
        raise
    return Sampler(chain, grammar, model.n_vocab, greedy=params.temperature == 0)


def _build_chain(params: SamplingParams, n_vocab: int) -> int:
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    try:
        # OpenAI's presence and frequency penalties are llama.cpp's: each token seen in the last
        # 64 generated has its logit lowered by presence + count x frequency (repeat divides).
        if params.repeat_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
            # The vendored llama.h (0.3.36) takes n_vocab first; a binding without it left the
            # window (penalty_last_n) to whatever was in a register, so answers changed by chance.
            add(
                chain,
                llama_cpp.llama_sampler_init_penalties(
                    n_vocab, _PENALTY_LAST_N, params.repeat_penalty, params.frequency_penalty, params.presence_penalty
                ),
            )
        if params.temperature == 0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        if params.top_k > 0:
            add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            add(chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
        add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
        seed = llama_cpp.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
        if seed == llama_cpp.LLAMA_DEFAULT_SEED and params.seed is not None:
            seed = 0xFFFFFFFE  # an explicit seed must never mean "random"
        add(chain, llama_cpp.llama_sampler_init_dist(seed))
        return chain
    except BaseException:
        llama_cpp.llama_sampler_free(chain)
        raise
