"""The drift statistics on synthetic distributions, against values worked out by hand."""

from __future__ import annotations

import math
import random

import pytest

from appliance.checks.psi import (
    EPSILON,
    bin_shares,
    categorical_psi,
    centroid,
    cosine_distance,
    histogram,
    mix,
    numeric_finding,
    percentile,
    psi,
    psi_of_values,
    quantile_edges,
    relative_change,
)


def test_psi_of_known_shares() -> None:
    # (0.9-0.5)ln(0.9/0.5) + (0.1-0.5)ln(0.1/0.5)
    assert psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(0.4 * math.log(1.8) + 0.4 * math.log(5), rel=1e-12)
    assert psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(0.8789, abs=1e-4)
    assert psi([0.25] * 4, [0.25] * 4) == 0.0
    assert psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(psi([0.9, 0.1], [0.5, 0.5]))  # symmetric


def test_empty_bins_are_smoothed_not_infinite() -> None:
    value = psi([1.0, 0.0], [0.0, 1.0])  # each share floored at EPSILON: 2 (1 - eps) ln(1 / eps)
    assert value == pytest.approx(2 * (1 - EPSILON) * math.log(1 / EPSILON), rel=1e-12)
    assert math.isfinite(value) and value > 10


def test_quantile_edges_and_bins() -> None:
    values = list(range(1, 101))
    assert quantile_edges(values, 10) == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert bin_shares(values, quantile_edges(values, 10)) == [0.1] * 10
    assert quantile_edges([7] * 50, 10) == [7]  # ties merge bins
    assert bin_shares([1, 7, 7, 8, 100], [7]) == [0.6, 0.4]  # (-inf, 7], (7, inf)
    assert quantile_edges([], 10) == []


def test_identical_distributions_have_psi_near_zero_and_shifted_ones_large() -> None:
    rng = random.Random(7)
    reference = [rng.gauss(50, 10) for _ in range(5000)]
    same = [rng.gauss(50, 10) for _ in range(5000)]
    shifted = [rng.gauss(60, 10) for _ in range(5000)]
    assert psi_of_values(reference, reference) == pytest.approx(0.0, abs=1e-12)
    assert psi_of_values(reference, same) < 0.02
    assert psi_of_values(reference, shifted) > 0.5
    # A shift of one standard deviation of a normal: about 1.0 on deciles (the continuous PSI
    # of N(0,1) against N(1,1) is the symmetric KL divergence, d^2 = 1).
    assert psi_of_values(reference, shifted) == pytest.approx(1.0, abs=0.25)


def test_values_beyond_the_reference_range_count_as_drift() -> None:
    reference = [20.0] * 100
    assert psi_of_values(reference, [20.0] * 100) == 0.0
    assert psi_of_values(reference, [400.0] * 100) > 10


def test_categorical_psi_and_mixes() -> None:
    assert mix(["latin", "latin", "cyrillic", "latin"]) == {"cyrillic": 0.25, "latin": 0.75}
    assert categorical_psi({"latin": 1.0}, {"latin": 1.0}) == 0.0
    half = categorical_psi({"latin": 0.5, "cjk": 0.5}, {"latin": 0.9, "cjk": 0.1})
    assert half == pytest.approx(0.8789, abs=1e-4)
    new_category = categorical_psi({"stop": 1.0}, {"stop": 0.5, "length": 0.5})
    assert new_category == pytest.approx((0.5 - 1) * math.log(0.5) + (0.5 - EPSILON) * math.log(0.5 / EPSILON))


def test_percentile_relative_change_and_centroids() -> None:
    assert percentile(list(range(101)), 95) == 95.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([], 95) == 0.0
    assert relative_change(100.0, 150.0, 1.0) == 0.5
    assert relative_change(0.0, 0.02, 0.05) == pytest.approx(0.4)  # from zero: against the floor
    assert centroid([[1.0, 0.0], [0.0, 1.0]]) == [0.5, 0.5]
    assert cosine_distance([1.0, 0.0], [1.0, 0.0]) == pytest.approx(0.0)
    assert cosine_distance([1.0, 0.0], [0.0, 1.0]) == pytest.approx(1.0)
    assert cosine_distance([1.0, 1.0], [1.0, 0.0]) == pytest.approx(1 - 1 / math.sqrt(2))


def test_a_one_token_change_in_lengths_is_no_alarm_and_a_real_shift_still_is() -> None:
    """The false alarm found under load: prompts of 39 or 40 tokens that became 40 or 41 (the
    item numbers grew a digit) gave a PSI over 2 for a 1% longer mean."""
    counts = {"reference_count": 90, "current_count": 200}
    ref = histogram([39.0] * 10 + [40.0] * 80, 10)
    grown = [40.0] * 100 + [41.0] * 100
    noticed = numeric_finding("prompt_tokens", ref, grown, 10, (0.1, 0.25), counts)  # no shift floor: PSI alone
    assert noticed.status == "fail" and noticed.details["psi"] > 2
    gated = numeric_finding("prompt_tokens", ref, grown, 10, (0.1, 0.25), counts, min_shift=0.1)
    assert gated.status == "ok" and gated.details["psi"] > 2 and gated.details["shift"] == pytest.approx(0.025)
    longer = [60.0] * 100 + [61.0] * 100  # half as long again
    assert numeric_finding("prompt_tokens", ref, longer, 10, (0.1, 0.25), counts, min_shift=0.1).status == "fail"
    tail = [40.0] * 180 + [400.0] * 20  # same median, a long tail: the mean and p95 move
    assert numeric_finding("prompt_tokens", ref, tail, 10, (0.1, 0.25), counts, min_shift=0.1).status == "fail"
