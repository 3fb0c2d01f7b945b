"""The statistics drift is measured with, and the verdicts drawn from them: the population
stability index (PSI) over bins fixed by the reference's quantiles, or over categories;
shares, percentiles, relative change; and centroids of embeddings with their cosine distance
(Arize's embedding drift measure).

PSI = sum over bins of (current - reference) * ln(current / reference), with each share
floored at `EPSILON` so that an empty bin on either side stays finite. Rules of thumb: under
0.1 stable, 0.1 to 0.25 a moderate shift, above 0.25 a significant one.

The `*_finding` functions turn a feature's reference and current values into a finding: ok,
warn or fail against the (warn, fail) limits given, with the numbers in its details.

Two samples of one distribution, of n and m values over B bins, differ by chance alone by a
PSI of about (B - 1)(1/n + 1/m): 10 bins over 50 requests a window would alarm on noise. So
the reference's bins are merged, at comparison time, down to `noise_bounded_bins`, which
keeps that expected noise under 0.05; and a PSI under `chance_psi`, what chance alone exceeds
once in a thousand times (PSI / (1/n + 1/m) is close to a chi-square of B - 1 degrees of
freedom), is no alarm whatever the thresholds. Rates are compared the same way
(`proportion_z`, a two-proportion z test).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from appliance.checks.findings import Finding, Status, ok

__all__ = [
    "EPSILON",
    "Z999",
    "bin_shares",
    "categorical_psi",
    "centroid",
    "centroid_finding",
    "change_finding",
    "chance_psi",
    "cosine_distance",
    "feedback_findings",
    "histogram",
    "level",
    "merge_bins",
    "mix",
    "mix_finding",
    "noise_bounded_bins",
    "numeric_finding",
    "percentile",
    "proportion_z",
    "psi",
    "psi_of_values",
    "quantile_edges",
    "relative_change",
]

EPSILON = 1e-4
Z999 = 3.09  # the standard normal's 99.9th percentile


def quantile_edges(values: Sequence[float], bins: int = 10) -> list[float]:
    """Interior bin edges at the reference's quantiles 1/bins .. (bins-1)/bins, each an
    observed value, without repeats (ties, as token counts have, merge bins). A top edge at
    the reference's maximum leaves the bin above it empty there: values beyond the
    reference's range then count as drift."""
    if not values:
        return []
    ordered = sorted(values)
    n = len(ordered)
    edges: list[float] = []
    for k in range(1, bins):
        edge = float(ordered[min(n - 1, max(0, math.ceil(k * n / bins) - 1))])
        if not edges or edge > edges[-1]:
            edges.append(edge)
    return edges


def bin_shares(values: Iterable[float], edges: Sequence[float]) -> list[float]:
    """The share of `values` in each of the `len(edges) + 1` bins (-inf, e0], (e0, e1], ... (en, inf)."""
    counts = [0] * (len(edges) + 1)
    total = 0
    for v in values:
        counts[bisect.bisect_left(edges, v)] += 1
        total += 1
    return [c / total for c in counts] if total else [0.0] * len(counts)


def noise_bounded_bins(n: int, m: int, most: int) -> int:
    """The most bins (at least 2, at most `most`) whose expected chance PSI between samples of
    n and m values, (bins - 1)(1/n + 1/m), stays under 0.05."""
    if n < 1 or m < 1:
        return 2
    return max(2, min(most, 1 + int(0.05 / (1 / n + 1 / m))))


def chance_psi(bins: int, n: int, m: int, z: float = Z999) -> float:
    """The PSI two samples of one distribution (n and m values, over `bins` bins) exceed by
    chance once in a thousand: the chi-square quantile (Wilson-Hilferty) times 1/n + 1/m."""
    if bins < 2 or n < 1 or m < 1:
        return 0.0
    k = bins - 1
    quantile = k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3
    return quantile * (1 / n + 1 / m)


def proportion_z(p1: float, n1: int, p2: float, n2: int) -> float:
    """The two-proportion z statistic of rates p1 (of n1) and p2 (of n2); 0 when both are 0 or 1."""
    if n1 < 1 or n2 < 1:
        return 0.0
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return 0.0 if spread == 0 else (p2 - p1) / spread


def merge_bins(edges: Sequence[float], shares: Sequence[float], bins: int) -> tuple[list[float], list[float]]:
    """Merge adjacent bins down to at most `bins`, keeping the edges whose running share is
    nearest the reference's own 1/bins quantiles."""
    if len(shares) <= bins:
        return list(edges), list(shares)
    running = list(itertools.accumulate(shares))[: len(edges)]
    chosen: list[int] = []
    for k in range(1, bins):
        nearest = min(range(len(running)), key=lambda j: (abs(running[j] - k / bins), j))
        if not chosen or nearest > chosen[-1]:
            chosen.append(nearest)
    bounds = [-1, *chosen, len(shares) - 1]
    merged = [sum(shares[a + 1 : b + 1]) for a, b in itertools.pairwise(bounds)]
    return [edges[i] for i in chosen], merged


def psi(reference: Sequence[float], current: Sequence[float], epsilon: float = EPSILON) -> float:
    """PSI of two share vectors over the same bins."""
    if len(reference) != len(current):
        raise ValueError("reference and current must have the same bins")
    total = 0.0
    for r, c in zip(reference, current, strict=True):
        r, c = max(r, epsilon), max(c, epsilon)
        total += (c - r) * math.log(c / r)
    return total


def psi_of_values(reference: Sequence[float], current: Sequence[float], bins: int = 10) -> float:
    """PSI of two samples, binned at the reference's quantiles."""
    edges = quantile_edges(reference, bins)
    return psi(bin_shares(reference, edges), bin_shares(current, edges))


def histogram(values: Sequence[float], bins: int) -> dict[str, Any]:
    """A sample's summary for later PSI: its quantile edges and shares, count, mean, p50, p95."""
    edges = quantile_edges(values, bins)
    return {
        "edges": edges,
        "shares": bin_shares(values, edges),
        "count": len(values),
        "mean": sum(values) / len(values) if values else 0.0,
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
    }


def mix(values: Iterable[str]) -> dict[str, float]:
    """Each category's share."""
    counts = Counter(values)
    total = sum(counts.values())
    return {k: counts[k] / total for k in sorted(counts)} if total else {}


def categorical_psi(reference: Mapping[str, float], current: Mapping[str, float], epsilon: float = EPSILON) -> float:
    """PSI over the union of the categories of two mixes (a new category counts from epsilon)."""
    keys = sorted(set(reference) | set(current))
    return psi([reference.get(k, 0.0) for k in keys], [current.get(k, 0.0) for k in keys], epsilon)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linearly interpolated; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (pos - low))


def relative_change(reference: float, current: float, floor: float) -> float:
    """(current - reference) / reference, with the reference floored at `floor` so that a
    change from zero is measured rather than infinite."""
    return (current - reference) / max(abs(reference), floor)


def centroid(vectors: Sequence[Sequence[float]]) -> list[float]:
    """The mean vector."""
    if not vectors:
        raise ValueError("no vectors")
    dims = len(vectors[0])
    sums = [0.0] * dims
    for vector in vectors:
        if len(vector) != dims:
            raise ValueError("vectors of different dimensions")
        for i, x in enumerate(vector):
            sums[i] += x
    return [s / len(vectors) for s in sums]


def cosine_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """1 - cosine similarity; 1.0 when either vector is zero."""
    if len(a) != len(b):
        raise ValueError("vectors of different dimensions")
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return 1.0 if norm == 0 else 1.0 - dot / norm


# -- verdicts -------------------------------------------------------------------------------
def level(value: float, warn: float, fail: float) -> Status:
    return "fail" if value >= fail else "warn" if value >= warn else "ok"


def _psi_level(value: float, chance: float, limits: tuple[float, float]) -> Status:
    return "ok" if value < chance else level(value, *limits)


def numeric_finding(
    name: str,
    ref: dict[str, Any],
    values: list[float],
    bins: int,
    limits: tuple[float, float],
    counts: dict[str, int],
    *,
    min_shift: float = 0.0,
) -> Finding:
    """A numeric feature: PSI over the reference's `histogram`, its bins merged down to
    `noise_bounded_bins` (at most `bins`); no alarm under `chance_psi`, nor while the mean, the
    median and the p95 all moved by less than `min_shift` of the reference's. PSI sees any
    change of shape, and token counts are few distinct values: prompts of 39 or 40 tokens that
    become 40 or 41 fill a bin the reference left empty, a PSI over 2 for a 1% change."""
    current = histogram(values, bins)
    edges, ref_shares = merge_bins(ref["edges"], ref["shares"], noise_bounded_bins(ref["count"], len(values), bins))
    shares = bin_shares(values, edges)
    value, chance = psi(ref_shares, shares), chance_psi(len(shares), ref["count"], len(values))
    keep = ("mean", "p50", "p95")
    shift = max(abs(current[k] - ref[k]) / max(abs(ref[k]), 1.0) for k in keep)
    return Finding(
        "ok" if shift < min_shift else _psi_level(value, chance, limits),
        f"{name}: PSI {value:.3f} (mean {ref['mean']:.1f} -> {current['mean']:.1f})",
        name,
        {
            "psi": round(value, 4),
            "chance_psi": round(chance, 4),
            "shift": round(shift, 4),
            "reference": {k: ref[k] for k in keep},
            "current": {k: current[k] for k in keep},
            "edges": edges,
            "reference_shares": ref_shares,
            "current_shares": shares,
            **counts,
        },
    )


def mix_finding(
    name: str, ref: dict[str, float], cur: dict[str, float], limits: tuple[float, float], counts: dict[str, int]
) -> Finding:
    """A categorical feature: PSI of the mixes; no alarm under `chance_psi`."""
    value = categorical_psi(ref, cur)
    chance = chance_psi(len(set(ref) | set(cur)), counts["reference_count"], counts["current_count"])
    top = max(cur, key=lambda k: cur[k]) if cur else "none"
    return Finding(
        _psi_level(value, chance, limits),
        f"{name}: PSI {value:.3f} (now mostly {top})",
        name,
        {"psi": round(value, 4), "chance_psi": round(chance, 4), "reference": ref, "current": cur, **counts},
    )


def change_finding(
    name: str,
    ref: float,
    cur: float,
    floor: float,
    limits: tuple[float, float],
    counts: dict[str, int],
    *,
    either_way: bool = False,
    z: float | None = None,
) -> Finding:
    """A rate or a level: its `relative_change`, up only unless `either_way`; with `z` (of a
    rate), no alarm within what chance gives."""
    change = relative_change(ref, cur, floor)
    status = level(abs(change) if either_way else change, *limits)
    details = {"change": round(change, 4), "reference": ref, "current": cur, **counts}
    if z is not None:
        details["z"] = round(z, 3)
        status = "ok" if abs(z) < Z999 else status
    return Finding(status, f"{name}: {ref:.4g} -> {cur:.4g} ({change:+.0%})", name, details)


def centroid_finding(ref: dict[str, Any], cur: dict[str, Any], limits: tuple[float, float]) -> Finding:
    """The cosine distance of two centroids (`{"vector", "count", "model"}` or `{"vector": None,
    "reason"}`), when both exist and were embedded by the same model."""
    name = "embedding_centroid"
    counts = {"reference_count": ref.get("count", 0), "current_count": cur.get("count", 0)}
    if not ref.get("vector") or not cur.get("vector"):
        reason = (cur if ref.get("vector") else ref).get("reason") or "not available (prompts not kept)"
        return ok(f"{name}: {reason}", name, available=False, **counts)
    if ref.get("model") != cur.get("model") or len(ref["vector"]) != len(cur["vector"]):
        return ok(
            f"{name}: not comparable (embedded by {cur.get('model')}, the baseline by {ref.get('model')})",
            name,
            available=False,
            **counts,
        )
    distance = cosine_distance(ref["vector"], cur["vector"])
    return Finding(
        level(distance, *limits),
        f"{name}: cosine distance {distance:.4f}",
        name,
        {"change": round(distance, 6), "distance": round(distance, 6), "available": True, **counts},
    )


def feedback_findings(
    ref: dict[str, dict[str, float]], cur: dict[str, dict[str, float]], least: int, limits: tuple[float, float]
) -> list[Finding]:
    """Per model (`{model: {"mean", "count"}}`), the drop of its mean feedback score, when both
    windows have at least `least` ratings."""
    out = []
    for model in sorted(set(ref) | set(cur)):
        name = f"feedback_score:{model}"
        r, c = ref.get(model, {"mean": 0.0, "count": 0}), cur.get(model, {"mean": 0.0, "count": 0})
        counts = {"reference_count": int(r["count"]), "current_count": int(c["count"])}
        if min(r["count"], c["count"]) < least:
            out.append(ok(f"{name}: not enough feedback (at least {least} a window)", name, **counts))
            continue
        change = c["mean"] - r["mean"]
        out.append(
            Finding(
                level(-change, *limits),
                f"{name}: {r['mean']:.2f} -> {c['mean']:.2f}",
                name,
                {"change": round(change, 4), "reference": r["mean"], "current": c["mean"], **counts},
            )
        )
    return out
