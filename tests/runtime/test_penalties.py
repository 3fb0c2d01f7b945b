"""Repeat, frequency and presence penalties do what llama.cpp documents, over exactly the last
64 generated tokens: a binding with the wrong C signature once left that window to a
register's leftover value, and answers changed from run to run."""

from __future__ import annotations

import ctypes

import llama_cpp
import pytest

from runtime._native import Model
from runtime._sampler import build_sampler
from runtime.engine import SamplingParams
from runtime.errors import InvalidGenerationRequest

A, B, FILLER = 5, 6, 7


@pytest.fixture(scope="module")
def model(model_path: str) -> Model:
    m = Model(model_path)
    yield m
    m.free()


def pick(sampler, logits: dict[int, float]) -> int:
    """What the sampler's chain selects from these candidates (without accepting it)."""
    data = (llama_cpp.llama_token_data * len(logits))()
    for i, (token, logit) in enumerate(logits.items()):
        data[i].id, data[i].logit, data[i].p = token, logit, 0.0
    array = llama_cpp.llama_token_data_array(data, len(logits), -1, False)
    llama_cpp.llama_sampler_apply(sampler.chain, ctypes.byref(array))
    return int(array.data[array.selected].id)


def test_repeat_penalty_covers_exactly_the_last_64_tokens(model: Model) -> None:
    sampler = build_sampler(model, SamplingParams(temperature=0, repeat_penalty=2.0))
    try:
        assert pick(sampler, {A: 10.0, B: 9.0}) == A
        llama_cpp.llama_sampler_accept(sampler.chain, A)
        assert pick(sampler, {A: 10.0, B: 9.0}) == B  # 10 / 2 < 9
        for _ in range(63):
            llama_cpp.llama_sampler_accept(sampler.chain, FILLER)
        assert pick(sampler, {A: 10.0, B: 9.0}) == B  # A is the 64th most recent: still penalised
        llama_cpp.llama_sampler_accept(sampler.chain, FILLER)
        assert pick(sampler, {A: 10.0, B: 9.0}) == A  # out of the window
    finally:
        sampler.free()


def test_frequency_and_presence_penalties_subtract_per_occurrence(model: Model) -> None:
    sampler = build_sampler(model, SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=0.25))
    try:
        assert pick(sampler, {A: 10.0, B: 8.8}) == A
        llama_cpp.llama_sampler_accept(sampler.chain, A)
        assert pick(sampler, {A: 10.0, B: 8.8}) == A  # 10 - 1 x 0.5 - 0.25 = 9.25
        llama_cpp.llama_sampler_accept(sampler.chain, A)
        assert pick(sampler, {A: 10.0, B: 8.8}) == B  # 10 - 2 x 0.5 - 0.25 = 8.75
    finally:
        sampler.free()


def test_out_of_range_penalties_are_refused(model: Model) -> None:
    with pytest.raises(InvalidGenerationRequest, match="frequency_penalty"):
        build_sampler(model, SamplingParams(temperature=0, frequency_penalty=3.0))
