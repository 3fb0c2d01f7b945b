"""The difficulty scorer the `auto` strategy uses: the packaged classifier, with the
threshold a site calibrated on its own data (`appliance routes calibrate`), if any.

Scores are rescaled so that the threshold sits at 0.5, piecewise linearly: a candidate with
`max_difficulty = 0.5` takes what the classifier calls easy, whichever threshold (packaged
or calibrated) is in force, and a route's numbers keep their meaning after a recalibration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.config import Settings


def calibration_path(settings: Settings) -> Path:
    return settings.paths.root / "router-calibration.json"


def rescale(score: float, threshold: float) -> float:
    """`score` with `threshold` mapped to 0.5 (0 and 1 stay where they are)."""
    t = min(max(threshold, 1e-6), 1 - 1e-6)
    return 0.5 * score / t if score < t else 0.5 + 0.5 * (score - t) / (1 - t)


class DifficultyScorer:
    """The classifier's score, rescaled around the threshold in force."""

    def __init__(self, classifier: Any, threshold: float, *, calibrated: bool) -> None:
        self.classifier = classifier
        self.threshold = threshold
        self.calibrated = calibrated

    def score(self, text: str, *, max_tokens: int | None = None, json_mode: bool = False) -> float:
        return rescale(self.classifier.score(text, max_tokens=max_tokens, json_mode=json_mode), self.threshold)

    def explain(self, text: str, *, max_tokens: int | None = None, json_mode: bool = False) -> list[tuple[str, float]]:
        return list(self.classifier.explain(text, max_tokens=max_tokens, json_mode=json_mode))


def difficulty_scorer(settings: Settings) -> DifficultyScorer:
    """Built on first use by an auto route (loading the classifier takes about 26 ms). A
    calibration file that cannot be read is logged and the packaged threshold used."""
    import logging

    from appliance.routing.classifier import DifficultyClassifier, load_calibration

    classifier = DifficultyClassifier.load()
    try:
        calibration = load_calibration(calibration_path(settings))
    except ValueError as exc:
        logging.getLogger(__name__).error("ignoring the router calibration: %s", exc)
        calibration = None
    if calibration is None:
        return DifficultyScorer(classifier, classifier.threshold, calibrated=False)
    return DifficultyScorer(classifier, calibration.threshold, calibrated=True)
