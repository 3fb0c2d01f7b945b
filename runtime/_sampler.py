"""Per-sequence llama.cpp sampler chains, and the GBNF grammars behind response_format."""

from __future__ import annotations

import json
import math
from typing import Any

import llama_cpp
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from ._native import Model, sampler_init_penalties
from .engine import SamplingParams
from .errors import InvalidGenerationRequest

#: GBNF for "any JSON object" (OpenAI `response_format: {"type": "json_object"}`).
JSON_OBJECT_GRAMMAR: str = JSON_GBNF

_PENALTY_LAST_N = 64


def json_schema_to_grammar(schema: dict[str, Any]) -> str:
    """GBNF that only admits JSON documents matching `schema` (OpenAI `json_schema` response format)."""
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises bare ValueError/KeyError/TypeError on bad schemas
        raise InvalidGenerationRequest(f"unsupported JSON schema: {exc}") from exc


def validate(params: SamplingParams) -> None:
    """Reject values llama.cpp would misbehave on, before anything is queued."""
    checks = (
        (math.isfinite(params.temperature) and params.temperature >= 0, "temperature must be >= 0"),
        (math.isfinite(params.top_p) and 0 < params.top_p <= 1, "top_p must be in (0, 1]"),
        (params.top_k >= 0, "top_k must be >= 0"),
        (math.isfinite(params.min_p) and 0 <= params.min_p <= 1, "min_p must be in [0, 1]"),
        (math.isfinite(params.repeat_penalty) and params.repeat_penalty > 0, "repeat_penalty must be > 0"),
    )
    for ok, message in checks:
        if not ok:
            raise InvalidGenerationRequest(message)


def build_chain(model: Model, params: SamplingParams) -> int:
    """A new sampler chain (caller frees it with `free_chain`). Grammar first, then the usual pipeline.

    Temperature 0 is greedy; otherwise penalties -> top_k -> top_p -> min_p -> temperature -> dist(seed).
    Raises `InvalidGenerationRequest` when the grammar does not compile.
    """
    validate(params)
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    try:
        if params.grammar is not None:
            grammar = llama_cpp.llama_sampler_init_grammar(model.vocab, params.grammar.encode("utf-8"), b"root")
            if not grammar:
                raise InvalidGenerationRequest("grammar does not compile (GBNF with a `root` rule expected)")
            add(chain, grammar)
        if params.repeat_penalty != 1.0:
            add(chain, sampler_init_penalties(_PENALTY_LAST_N, params.repeat_penalty, 0.0, 0.0))
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


def free_chain(chain: int | None) -> None:
    if chain:
        llama_cpp.llama_sampler_free(chain)
