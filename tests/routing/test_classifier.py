"""The `auto` router's difficulty classifier: its labelled set, its held-out accuracy, hostile
input, a site's calibration, and a refit that reproduces the packaged model."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from appliance.routing.classifier import (
    DEFAULT_DATA,
    DEFAULT_MODEL,
    FEATURES,
    Calibration,
    DifficultyClassifier,
    calibrate,
    evaluate,
    fit,
    is_hard,
    load_calibration,
    load_examples,
    save_calibration,
)


@pytest.fixture(scope="module")
def classifier() -> DifficultyClassifier:
    return DifficultyClassifier.load()


@pytest.fixture(scope="module")
def rows() -> list[dict[str, object]]:
    return [json.loads(line) for line in DEFAULT_DATA.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_packaged_model_meets_the_bar_on_the_held_out_split(classifier: DifficultyClassifier) -> None:
    heldout = [e for e in load_examples() if e.split == "heldout"]
    metrics = evaluate(classifier, heldout)
    print(f"held-out: {json.dumps(metrics)}")
    assert metrics["accuracy"] >= 0.85
    assert metrics["hard_recall"] >= 0.8
    # The model file records what its own fit measured: a stale file would disagree.
    assert classifier.model["metrics"]["heldout"]["accuracy"] == metrics["accuracy"]


def test_the_labelled_set_is_large_balanced_and_split_by_the_hash_rule(rows: list[dict[str, object]]) -> None:
    assert len(rows) >= 240
    prompts = [r["prompt"] for r in rows]
    assert len(set(prompts)) == len(prompts)
    for r in rows:
        assert set(r) <= {"prompt", "label", "topic", "split", "max_tokens", "json_mode"}
        assert isinstance(r["prompt"], str) and r["prompt"] and isinstance(r["topic"], str)
        assert r["label"] in ("easy", "hard")
        heldout = int(hashlib.sha256(r["prompt"].encode()).hexdigest()[:8], 16) % 10 < 3
        assert r["split"] == ("heldout" if heldout else "train"), r["prompt"][:60]
    counts = Counter((r["split"], r["label"]) for r in rows)
    assert all(counts[(split, label)] >= 20 for split in ("train", "heldout") for label in ("easy", "hard"))
    easy = sum(counts[(s, "easy")] for s in ("train", "heldout"))
    assert 0.4 <= easy / len(rows) <= 0.6


def test_length_alone_does_not_separate_the_classes(rows: list[dict[str, object]]) -> None:
    short_hard = [r for r in rows if r["label"] == "hard" and len(str(r["prompt"])) < 60]
    long_easy = [r for r in rows if r["label"] == "easy" and len(str(r["prompt"])) > 400]
    assert len(short_hard) >= 10 and len(long_easy) >= 10


def test_scores_are_probabilities_and_deterministic(classifier: DifficultyClassifier) -> None:
    again = DifficultyClassifier.load()
    for e in load_examples()[::7]:
        s = classifier.score(e.prompt, max_tokens=e.max_tokens, json_mode=e.json_mode)
        assert 0.0 <= s <= 1.0
        assert s == classifier.score(e.prompt, max_tokens=e.max_tokens, json_mode=e.json_mode)
        assert s == again.score(e.prompt, max_tokens=e.max_tokens, json_mode=e.json_mode)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n\t ",
        "日本語で簡単に挨拶してください 😀",
        "\ud800 lone surrogate \udfff",
        "```" * 300_000,
        "((((" * 250_000,
        "a " * 500_000,
        "x" * 1_000_000,
        "SELECT (a, b, c) FROM t WHERE " * 35_000,
        "é漢😀 " * 250_000,
    ],
    ids=["empty", "blank", "unicode", "surrogates", "fences", "parens", "words", "one-token", "sql", "wide"],
)
def test_hostile_and_odd_input_is_scored(classifier: DifficultyClassifier, text: str) -> None:
    for max_tokens, json_mode in ((None, False), (10**400, True), (0, False), (-5, True)):
        assert 0.0 <= classifier.score(text, max_tokens=max_tokens, json_mode=json_mode) <= 1.0
    assert list(classifier.features(text)) == list(FEATURES)


def test_obvious_requests_fall_on_the_right_side(classifier: DifficultyClassifier) -> None:
    cut = classifier.threshold
    assert not is_hard(classifier.score("Hello! How are you?"), cut)
    assert not is_hard(classifier.score("Translate 'good morning' into German."), cut)
    assert is_hard(classifier.score("Prove that there are infinitely many primes congruent to 1 mod 4."), cut)
    assert is_hard(classifier.score("Write a Python program that solves the n-queens problem and explain it."), cut)


def test_a_large_completion_request_leans_hard(classifier: DifficultyClassifier) -> None:
    text = "Tell me about the history of Lisbon."
    assert classifier.score(text, max_tokens=4000) > classifier.score(text, max_tokens=50)


def test_explain_names_the_features_that_pushed_the_score(classifier: DifficultyClassifier) -> None:
    top = classifier.explain("Prove that sqrt(2) is irrational.", top=3)
    assert 1 <= len(top) <= 3
    assert all(name in FEATURES for name, _ in top)
    assert abs(top[0][1]) >= abs(top[-1][1])
    assert dict(classifier.explain("Prove that sqrt(2) is irrational.", top=len(FEATURES)))["math_words"] > 0


def test_a_model_for_other_features_is_refused(tmp_path: Path) -> None:
    model = json.loads(DEFAULT_MODEL.read_text())
    model["features"] = model["features"][:-1]
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))
    with pytest.raises(ValueError, match="refit"):
        DifficultyClassifier.load(path)


# --- calibration ---


class _FixedScores:
    """Stands in for the classifier: each text's score is given."""

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores

    def score(self, text: str, *, max_tokens: int | None = None, json_mode: bool = False) -> float:
        return self.scores[text]


def test_calibration_picks_the_most_accurate_cut_ties_to_higher_recall() -> None:
    scored = {"e1": 0.1, "e2": 0.2, "h1": 0.3, "e3": 0.6, "h2": 0.7, "h3": 0.8}
    site = [(text, "hard" if text.startswith("h") else "easy") for text in scored]
    cal = calibrate(site, classifier=_FixedScores(scored))  # type: ignore[arg-type]
    # Cutting at 0.25 or at 0.65 both get 5 of 6 right; 0.25 keeps every hard request.
    assert cal == Calibration(threshold=0.25, accuracy=round(5 / 6, 4), hard_recall=1.0, examples=6)


def test_calibration_on_a_site_set_separates_it(classifier: DifficultyClassifier) -> None:
    site = [
        ("Hi, good afternoon!", "easy"),
        ("What is the capital of Portugal?", "easy"),
        ("Translate 'thank you' into Spanish.", "easy"),
        ("Fix the typos: I recieved you're mesage yesturday.", "easy"),
        ("Is this review positive or negative? 'Great value, fast delivery.'", "easy"),
        ("Prove that the square root of 5 is irrational.", "hard"),
        ("Write a Go HTTP server with graceful shutdown, request timeouts and structured logging.", "hard"),
        ("Compare event sourcing and CRUD for an accounting system and explain the trade-offs.", "hard"),
        ("Given tables orders(id, user_id, total) and users(id, country), write SQL for revenue per country.", "hard"),
        ("Why does my Python script get slower and slower when I append to a pandas DataFrame in a loop?", "hard"),
    ]
    cal = calibrate(site, classifier=classifier)
    scores = {text: classifier.score(text) for text, _ in site}
    assert cal.examples == len(site) and cal.accuracy == 1.0 and cal.hard_recall == 1.0
    assert max(scores[t] for t, label in site if label == "easy") < cal.threshold
    assert min(scores[t] for t, label in site if label == "hard") >= cal.threshold
    assert 0.0 < cal.threshold < 1.0


def test_calibration_refuses_unknown_labels_and_no_examples(classifier: DifficultyClassifier) -> None:
    with pytest.raises(ValueError, match="easy"):
        calibrate([("hello", "medium")], classifier=classifier)
    with pytest.raises(ValueError, match="at least one"):
        calibrate([], classifier=classifier)


def test_calibration_round_trips_through_its_file(tmp_path: Path) -> None:
    path = tmp_path / "router-calibration.json"
    assert load_calibration(path) is None
    cal = Calibration(threshold=0.37, accuracy=0.91, hard_recall=0.95, examples=120)
    save_calibration(path, cal)
    assert load_calibration(path) == cal
    assert Calibration.from_dict(cal.to_dict()) == cal
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe\x00garbage",
        b"[0.4]",
        b'{"threshold": 0.4}',
        b'{"threshold": 1.5, "accuracy": 0.9, "hard_recall": 0.9, "examples": 10}',
        b'{"threshold": "0.4", "accuracy": 0.9, "hard_recall": 0.9, "examples": 10}',
        b'{"threshold": 0.4, "accuracy": 0.9, "hard_recall": 0.9, "examples": -1}',
        b'{"threshold": true, "accuracy": 0.9, "hard_recall": 0.9, "examples": 10}',
        b"",
    ],
)
def test_a_malformed_calibration_file_is_a_value_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "router-calibration.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="calibration"):
        load_calibration(path)


def test_a_calibration_path_that_is_a_directory_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        load_calibration(tmp_path)


# --- fitting ---


def test_fit_is_deterministic_and_reproduces_the_packaged_model(classifier: DifficultyClassifier) -> None:
    examples = load_examples()
    train = [e for e in examples if e.split == "train"]
    heldout = [e for e in examples if e.split == "heldout"]
    model = fit(train)
    assert model == fit(train)
    refit = evaluate(DifficultyClassifier(model), heldout)["accuracy"]
    assert abs(refit - evaluate(classifier, heldout)["accuracy"]) <= 0.02


def test_fit_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both"):
        fit([e for e in load_examples() if e.label == "easy"])


def test_the_fit_and_evaluate_commands(tmp_path: Path, classifier: DifficultyClassifier) -> None:
    out = tmp_path / "model.json"
    command = [sys.executable, "-m", "appliance.routing.classifier"]
    subprocess.run([*command, "fit", "--out", str(out)], check=True, capture_output=True, timeout=120)
    written = json.loads(out.read_text())
    assert written["features"] == list(FEATURES)
    assert set(written["metrics"]) == {"train", "heldout"}
    assert abs(written["metrics"]["heldout"]["accuracy"] - classifier.model["metrics"]["heldout"]["accuracy"]) <= 0.02

    site = tmp_path / "site.jsonl"
    site.write_text(
        json.dumps({"prompt": "Hello there", "label": "easy"})
        + "\n"
        + json.dumps({"prompt": "Prove that sqrt(3) is irrational.", "label": "hard"})
        + "\n"
    )
    done = subprocess.run([*command, "evaluate", "--file", str(site)], check=True, capture_output=True, text=True)
    report = json.loads(done.stdout)
    assert report["examples"] == 2 and report["accuracy"] == 1.0
    assert {"accuracy", "hard_recall", "hard_precision"} <= set(report)
