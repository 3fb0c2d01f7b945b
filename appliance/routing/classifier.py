"""How hard a request is, offline: the `auto` route's difficulty score, a logistic regression
over cheap text features, so each request can go to the cheapest model that can handle it.

No network and no model: the features are counts over the text (code shapes, maths, reasoning
and constraint words in English, French, German and Spanish, short-task cues), the requested
`max_tokens` and `json_mode`. Pattern features look only at the first and last 8 KB, and the
one regex runs under RE2, so a request costs tens of microseconds and a hostile megabyte a
few milliseconds. The weights are fitted by `python -m appliance.routing.classifier fit` on the
train split of `data/difficulty.jsonl`; a site can move the threshold with `calibrate` on its
own labelled requests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import re2

__all__ = [
    "FEATURES",
    "Calibration",
    "DifficultyClassifier",
    "Example",
    "calibrate",
    "evaluate",
    "extract_features",
    "fit",
    "is_hard",
    "load_calibration",
    "load_examples",
    "save_calibration",
]

DATA = Path(__file__).resolve().parent / "data"
DEFAULT_DATA = DATA / "difficulty.jsonl"
DEFAULT_MODEL = DATA / "difficulty_model.json"
LABELS = ("easy", "hard")

_WINDOW = 8192  # characters read at each end of the text for the pattern features
_ASK = 40  # tokens at each end taken as "the ask": a pasted text's own words are not the task

# Punctuation becomes a space before splitting; "_" stays (identifiers are a code cue).
_PUNCT = str.maketrans({c: " " for c in "!\"#$%&'()*+,-./:;<=>?@[\\]^`{|}~«»¿¡“”‘’„…–—·"})
_DIGITS = b"0123456789"
_CODE_SYMBOLS = (b"{", b"}", b";", b"(", b")", b"=", b"[", b"]", b"<", b">")
_MATH_SYMBOLS = (b"^", b"\\", b"$", b"sqrt", "²".encode(), "√".encode(), b"*", b"=")
# A schema or signature: "customers(id, name, country)". Searched in the UTF-8 bytes, which
# lone surrogates cannot break.
_SCHEMA = re2.compile(rb"[A-Za-z_]\w*\(\s*\w+(?:\s*,\s*\w+)+\s*\)")


def _phrases(text: str) -> frozenset[tuple[str, str]]:
    """Two-word cues from "a b, c d"."""
    return frozenset((a, b) for a, b in (p.split() for p in text.split(",")))


# Word lists, lowercased; a few words from each of French, German and Spanish sit beside the
# English ones. Two-word cues are matched on adjacent tokens.
_REASONING = frozenset(
    "why explain explaining explanation compare comparing comparison analyse analyze analysis evaluate assess "
    "justify reasoning critique critically implications consequences weigh tradeoff tradeoffs pros cons "
    "argue arguments derive deduce walk plan design strategy causes versus vs risks therefore discuss "
    "significant forecast trend "
    "pourquoi expliquer explique expliquez comparer comparez analyser analyse analysez évaluer évalue justifie "
    "justifier compromis conséquences concevoir planifier "
    "warum erkläre erklären erklärt vergleiche vergleichen analysiere bewerte bewerten begründe prüfe "
    "nachteile vorteile funktioniert "
    "explica explique explicar compara comparar analiza analizar evalúa evaluar justifica diseña planifica "
    "causas ventajas desventajas".split()
)
_REASONING_PAIRS = _phrases(
    "step by, by step, trade off, trade offs, walk through, how does, how would, par étape, für schritt, "
    "a paso, por qué, what causes, how do, how can, wie funktioniert, show that, is wrong, it follow"
)
_MATH = frozenset(
    "prove proof proofs derive integral integrate derivative probability theorem lemma equation equations solve "
    "eigenvalue eigenvalues matrix determinant divisible prime primes irrational converge converges diverge "
    "diverges limit lim expected series compute calculate dice combinations permutations factorial modulo "
    "percent compounded interest ways estimate fibonacci "
    "démontrez démontrer prouver prouve intégrale probabilité équation calcul calcule calculez "
    "beweise beweisen wahrscheinlichkeit gleichung berechne primzahlen zinsen "
    "demuestra demostrar probabilidad ecuación calcula combinaciones irracional".split()
)
_CODE = frozenset(
    "def function return class import const let var fn func public private void int struct include printf "
    "println async await lambda null none self this elif useeffect usestate fetch console print main "
    "python javascript typescript java rust golang bash regex api json yaml docker kubernetes git "
    "dockerfile makefile pytest pandas flask django react sql http".split()
)
_ENGINEERING = frozenset(
    "implement implementation refactor debug bug bugs optimise optimize optimisation optimization algorithm "
    "complexity concurrency concurrent thread threads deadlock deadlocks performance scalable architecture "
    "migration schema endpoint endpoints deploy crash fails failing slow leak overflow segfault race "
    "error exception traceback recursive recursion iterative cache unittest tests "
    "implémente implémenter fehler speicherleck implementiere implementa".split()
)
_LEGAL = frozenset(
    "clause clauses contract contracts agreement liability liable indemnify indemnification enforceable "
    "gdpr lawful tenancy landlord tenant deposit redlines party parties jurisdiction statute directors "
    "insolvent compliance obligations "
    "contrat responsabilité vertrag klausel kündigungsklausel mieter haftung contrato cláusula".split()
)
_SQL = frozenset(
    "select join joins having sql query queries schema postgresql postgres mysql sqlite index indexes "
    "consulta requête abfrage tabelle tabla".split()
)
_SQL_UPPER = frozenset("SELECT FROM WHERE JOIN GROUP ORDER HAVING INSERT UPDATE DELETE LIMIT".split())
_CONSTRAINTS = frozenset(
    "must should without exactly ensure handle handling handles every each cover covering including include "
    "respects limits never unless within "
    "doit doivent sans chaque "
    "muss müssen ohne mindestens höchstens jede "
    "debe deben sin cada".split()
)
_CONSTRAINT_PAIRS = _phrases(
    "at least, at most, only if, no more, more than, less than, au moins, al menos, no longer, not mention"
)
_EASY_TASK = frozenset(
    "translate translation traduis traduire traduce traducir übersetze übersetzen spell spelling spelled typos "
    "typo grammar punctuation rephrase rewrite reword reformule formuliere reescribe shorten synonym opposite "
    "plural tense polite politely formal informal friendlier uppercase lowercase capitalize capitalise "
    "alphabetical summarize summarise summary tl dr résume resume zusammen classify sentiment spam positive "
    "negative extract extrae mentioned mention listed rating rhymes rhyme joke title hello hi hey thanks "
    "thank bonjour hola hallo merci gracias danke mean means meaning stand capital colour color bedeutet "
    "veut dire schreibt ok".split()
)
_BREVITY_PAIRS = _phrases(
    "one sentence, one word, one line, few words, yes or, or no, just the, just answer, nothing else, "
    "une phrase, einem satz, una frase, only the, single word, true or, positive or"
)
_WRITE_VERBS = frozenset(
    "write create implement build design draft generate produce develop compose "
    "écris écrivez rédige rédigez crée créez schreibe erstelle entwirf entwickle escribe crea diseña redacta".split()
)
# Prefixes, so plurals and the other languages' spellings match ("programm", "función").
_ARTIFACTS = tuple(
    "program script function funci fonction funktion class essay report story proposal plan api app "
    "component query quer consulta requête test spec schema guide letter runbook makefile dockerfile "
    "docker server crawler parser module library tool article decorator regular cache limiter cahier menu "
    "trainingsplan json database migration threat timetable implementation".split()
)
_FACTOID_START = frozenset(
    "what who which where when is are does do can name quelle quel qui où wann wer wo welche was cuál qué "
    "quién dónde es ist".split()
)
_THEN = frozenset({"then", "puis", "dann", "luego", "después", "afterwards", "finally"})

FEATURES: tuple[str, ...] = (
    "log_chars",
    "log_words",
    "log_lines",
    "question_marks",
    "enumerations",
    "then_words",
    "code_fences",
    "code_words",
    "code_symbols",
    "identifiers",
    "engineering",
    "sql",
    "schema_shape",
    "legal",
    "digit_density",
    "math_notation",
    "math_words",
    "numbers",
    "reasoning",
    "constraints",
    "write_artifact",
    "easy_task",
    "brevity",
    "factoid_start",
    "max_tokens_log",
    "max_tokens_set",
    "json_mode",
)


def _log(n: float) -> float:
    return math.log1p(n)


def _pairs(tokens: Sequence[str], wanted: frozenset[tuple[str, str]]) -> int:
    return sum(1 for pair in zip(tokens, tokens[1:], strict=False) if pair in wanted)


def _count(tokens: Iterable[str], wanted: frozenset[str]) -> int:
    return sum(1 for t in tokens if t in wanted)


def _write_artifact(tokens: Sequence[str]) -> int:
    """'Write a ... program/essay/report': a writing verb with an artefact within six words."""
    found = 0
    for i, token in enumerate(tokens):
        if token in _WRITE_VERBS and any(t.startswith(_ARTIFACTS) for t in tokens[i + 1 : i + 7]):
            found += 1
    return found


def _enumerations(window: str) -> int:
    count = 0
    for line in window.splitlines():
        head = line.lstrip()[:3]
        if head[:1] in ("-", "*", "•") or (head[:1].isdigit() and head[1:2] in (".", ")")):
            count += 1
    return count


def extract_features(text: str, *, max_tokens: int | None = None, json_mode: bool = False) -> list[float]:
    """The feature vector, in `FEATURES` order: linear in the text and bounded past 16 KB."""
    window = text if len(text) <= 2 * _WINDOW else text[:_WINDOW] + "\n" + text[-_WINDOW:]
    data = window.encode("utf-8", "surrogatepass")
    size = max(len(data), 1)
    raw = window.translate(_PUNCT).split()
    tokens = [t.lower() for t in raw]
    ask = tokens if len(tokens) <= 2 * _ASK else tokens[:_ASK] + tokens[-_ASK:]
    words = text.count(" ") + text.count("\n") + 1 if text.strip() else 0
    completion = max_tokens if max_tokens and max_tokens > 0 else 0

    identifiers = sum(1 for t in raw if "_" in t.strip("_") or (t[:1].islower() and not t.islower() and t.isalnum()))
    sql = _count(tokens, _SQL) + _count(raw, _SQL_UPPER)
    stack = window.count("Traceback") + window.count('File "') + window.count("    at ")
    numbers = sum(1 for t in raw if t[:1].isdigit())
    return [
        _log(len(text)),
        _log(words),
        _log(text.count("\n")),
        _log(window.count("?") + window.count("？")),
        _log(_enumerations(window)),
        _log(_count(tokens, _THEN)),
        _log(window.count("```")),
        _log(_count(tokens, _CODE)),
        100.0 * sum(data.count(s) for s in _CODE_SYMBOLS) / size,
        _log(identifiers),
        _log(_count(tokens, _ENGINEERING) + stack),
        _log(sql),
        1.0 if _SCHEMA.search(data) else 0.0,
        _log(_count(tokens, _LEGAL)),
        100.0 * (len(data) - len(data.translate(None, _DIGITS))) / size,
        _log(sum(data.count(s) for s in _MATH_SYMBOLS)),
        _log(_count(tokens, _MATH)),
        _log(numbers),
        _log(_count(ask, _REASONING) + _pairs(ask, _REASONING_PAIRS)),
        _log(_count(tokens, _CONSTRAINTS) + _pairs(tokens, _CONSTRAINT_PAIRS)),
        _log(_write_artifact(ask)),
        _log(_count(ask, _EASY_TASK)),
        _log(_pairs(ask, _BREVITY_PAIRS)),
        1.0 if tokens and tokens[0] in _FACTOID_START else 0.0,
        _log(min(completion, 1 << 20)),
        1.0 if completion else 0.0,
        1.0 if json_mode else 0.0,
    ]


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def is_hard(score: float, threshold: float) -> bool:
    """The `auto` route's decision: at or above the threshold goes to the larger model."""
    return score >= threshold


class DifficultyClassifier:
    """A fitted model: standardised features, weights, bias and the default threshold."""

    def __init__(self, model: Mapping[str, Any]) -> None:
        names = list(model.get("features", ()))
        if names != list(FEATURES):
            raise ValueError(
                "difficulty model was fitted for other features: refit with `python -m appliance.routing.classifier fit`"
            )
        try:
            self.weights = [float(w) for w in model["weights"]]
            self.mean = [float(m) for m in model["mean"]]
            self.scale = [float(s) for s in model["scale"]]
            self.bias = float(model["bias"])
            self.threshold = float(model["threshold"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"difficulty model is malformed: {exc!r}") from None
        if not len(self.weights) == len(self.mean) == len(self.scale) == len(FEATURES):
            raise ValueError("difficulty model has the wrong number of weights")
        self.model = dict(model)
        # Folding the scaling into the weights leaves one multiply-add per feature per request.
        self._coef = [w / s for w, s in zip(self.weights, self.scale, strict=True)]
        self._offset = self.bias - sum(c * m for c, m in zip(self._coef, self.mean, strict=True))

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> DifficultyClassifier:
        """The model in `path`, by default the packaged `data/difficulty_model.json`."""
        with open(path or DEFAULT_MODEL, encoding="utf-8") as f:
            return cls(json.load(f))

    def score(self, text: str, *, max_tokens: int | None = None, json_mode: bool = False) -> float:
        """Probability that the request is hard, in [0, 1]."""
        x = extract_features(text, max_tokens=max_tokens, json_mode=json_mode)
        return _sigmoid(self._offset + sum(c * v for c, v in zip(self._coef, x, strict=True)))

    def features(self, text: str, *, max_tokens: int | None = None, json_mode: bool = False) -> dict[str, float]:
        return dict(zip(FEATURES, extract_features(text, max_tokens=max_tokens, json_mode=json_mode), strict=True))

    def explain(
        self, text: str, *, max_tokens: int | None = None, json_mode: bool = False, top: int = 5
    ) -> list[tuple[str, float]]:
        """The features that moved the score most from an average request, with their
        contributions to the log-odds (positive: towards hard)."""
        x = extract_features(text, max_tokens=max_tokens, json_mode=json_mode)
        contributions = [
            (name, w * (v - m) / s)
            for name, w, v, m, s in zip(FEATURES, self.weights, x, self.mean, self.scale, strict=True)
        ]
        contributions.sort(key=lambda item: (-abs(item[1]), item[0]))
        return [(name, round(c, 4)) for name, c in contributions[:top] if c != 0.0]


# --- labelled examples, fitting and evaluation ---


@dataclass(frozen=True, slots=True)
class Example:
    prompt: str
    label: str
    split: str = "train"
    max_tokens: int | None = None
    json_mode: bool = False

    def features(self) -> list[float]:
        return extract_features(self.prompt, max_tokens=self.max_tokens, json_mode=self.json_mode)


def load_examples(path: str | os.PathLike[str] = DEFAULT_DATA) -> list[Example]:
    """The labelled lines of a JSONL file: prompt, label, and optionally split, max_tokens, json_mode."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("label") not in LABELS or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{number}: needs a string prompt and a label of easy or hard")
            if not isinstance(row.get("max_tokens", 0), int | None):
                raise ValueError(f"{path}:{number}: max_tokens must be an integer")
            examples.append(
                Example(
                    row["prompt"],
                    row["label"],
                    row.get("split", "train"),
                    row.get("max_tokens"),
                    bool(row.get("json_mode")),
                )
            )
    return examples


# Plain full-batch gradient descent on standardised features: few enough examples and
# features that it converges in well under a second, and the same inputs give the same weights.
_FIT = {"l2": 0.03, "learning_rate": 0.5, "iterations": 3000}


def fit(examples: Iterable[Example]) -> dict[str, Any]:
    """A model dict fitted on `examples` (logistic regression, L2), with the threshold that
    maximises accuracy on them and the accuracy and hard recall it measured there."""
    import numpy as np  # only fitting needs it; scoring is plain Python

    examples = list(examples)
    if not {e.label for e in examples} >= set(LABELS):
        raise ValueError("fitting needs both easy and hard examples")
    x = np.array([e.features() for e in examples], dtype=np.float64)
    y = np.array([e.label == "hard" for e in examples], dtype=np.float64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0  # a feature constant in the data carries no weight
    z = (x - mean) / scale
    w = np.zeros(z.shape[1])
    b = 0.0
    for _ in range(_FIT["iterations"]):
        error = 1.0 / (1.0 + np.exp(-(z @ w + b))) - y
        w -= _FIT["learning_rate"] * (z.T @ error / len(y) + _FIT["l2"] * w)
        b -= _FIT["learning_rate"] * float(error.mean())
    model: dict[str, Any] = {
        "version": 1,
        "features": list(FEATURES),
        "weights": [round(float(v), 6) for v in w],
        "bias": round(b, 6),
        "mean": [round(float(v), 6) for v in mean],
        "scale": [round(float(v), 6) for v in scale],
        "threshold": 0.5,
        "fit": dict(_FIT, examples=len(examples)),
    }
    classifier = DifficultyClassifier(model)
    cal = best_threshold(
        [(classifier.score(e.prompt, max_tokens=e.max_tokens, json_mode=e.json_mode), e.label) for e in examples]
    )
    model["threshold"] = round(cal.threshold, 6)
    return model


def evaluate(
    classifier: DifficultyClassifier, examples: Iterable[Example], threshold: float | None = None
) -> dict[str, float]:
    """Accuracy, hard recall and hard precision of `classifier` on `examples`."""
    cut = classifier.threshold if threshold is None else threshold
    tp = fp = tn = fn = 0
    for e in examples:
        hard = is_hard(classifier.score(e.prompt, max_tokens=e.max_tokens, json_mode=e.json_mode), cut)
        if e.label == "hard":
            tp, fn = tp + hard, fn + (not hard)
        else:
            fp, tn = fp + hard, tn + (not hard)
    total = tp + fp + tn + fn
    return {
        "examples": total,
        "accuracy": round((tp + tn) / total, 4) if total else 0.0,
        "hard_recall": round(tp / (tp + fn), 4) if tp + fn else 0.0,
        "hard_precision": round(tp / (tp + fp), 4) if tp + fp else 0.0,
        "threshold": cut,
    }


# --- a site's own threshold ---


@dataclass(frozen=True, slots=True)
class Calibration:
    """The threshold chosen on a site's labelled requests, and what it achieved there."""

    threshold: float
    accuracy: float
    hard_recall: float
    examples: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "accuracy": self.accuracy,
            "hard_recall": self.hard_recall,
            "examples": self.examples,
        }

    @classmethod
    def from_dict(cls, data: object) -> Calibration:
        """Raises `ValueError` naming what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("calibration must be a JSON object")
        for key in ("threshold", "accuracy", "hard_recall"):
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"calibration {key!r} must be a number between 0 and 1, not {value!r}")
        examples = data.get("examples")
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 0:
            raise ValueError(f"calibration 'examples' must be a non-negative integer, not {examples!r}")
        return cls(float(data["threshold"]), float(data["accuracy"]), float(data["hard_recall"]), examples)


def best_threshold(scored: Iterable[tuple[float, str]]) -> Calibration:
    """Sweep every cut between distinct scores: the most accurate, then the higher hard recall."""
    pairs = sorted(scored)
    if not pairs:
        raise ValueError("calibration needs at least one labelled example")
    if any(label not in LABELS for _, label in pairs):
        raise ValueError("calibration labels must be 'easy' or 'hard'")
    n = len(pairs)
    hard_total = sum(label == "hard" for _, label in pairs)
    # Cut i: scores from pairs[i] on are hard. tn counts easy below the cut, tp hard above it.
    best: tuple[float, float, float] | None = None
    tn = 0
    tp = hard_total
    for i in range(n + 1):
        if i == 0 or i == n or pairs[i - 1][0] != pairs[i][0]:
            threshold = 0.0 if i == 0 else 1.0 if i == n else (pairs[i - 1][0] + pairs[i][0]) / 2
            if not (i == n and pairs[-1][0] >= 1.0):
                accuracy = (tn + tp) / n
                recall = tp / hard_total if hard_total else 1.0
                if best is None or (accuracy, recall) > (best[1], best[2]):
                    best = (threshold, accuracy, recall)
        if i < n:
            if pairs[i][1] == "easy":
                tn += 1
            else:
                tp -= 1
    assert best is not None
    return Calibration(best[0], round(best[1], 4), round(best[2], 4), n)


def calibrate(examples: Iterable[tuple[str, str]], *, classifier: DifficultyClassifier | None = None) -> Calibration:
    """The threshold that is most accurate on a site's own (text, "easy" | "hard") pairs, ties
    going to the higher hard recall (a hard request sent to the small model costs more than
    an easy one sent to the large)."""
    model = classifier or DifficultyClassifier.load()
    return best_threshold((model.score(text), label) for text, label in examples)


def save_calibration(path: str | os.PathLike[str], calibration: Calibration) -> None:
    """Written to a temporary file and renamed, so a reader never sees half a file."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(calibration.to_dict(), f, indent=2)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def load_calibration(path: str | os.PathLike[str]) -> Calibration | None:
    """The saved calibration, or None when there is none. Raises `ValueError` for a file
    that cannot be read as one."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read calibration file {path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"calibration file {path} is not valid JSON: {exc}") from None
    try:
        return Calibration.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"calibration file {path}: {exc}") from None


# --- python -m appliance.routing.classifier fit | evaluate ---


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.routing.classifier", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fit_cmd = commands.add_parser("fit", help="fit on the train split and write the model file")
    fit_cmd.add_argument("--data", type=Path, default=DEFAULT_DATA)
    fit_cmd.add_argument("--out", type=Path, default=DEFAULT_MODEL)
    eval_cmd = commands.add_parser("evaluate", help="accuracy, hard recall and precision on the held-out split")
    eval_cmd.add_argument("--file", type=Path, help="every line of this JSONL file instead of the held-out split")
    eval_cmd.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    args = parser.parse_args(argv)

    if args.command == "fit":
        examples = load_examples(args.data)
        model = fit(e for e in examples if e.split == "train")
        classifier = DifficultyClassifier(model)
        # Measured after the fit, never used by it.
        model["metrics"] = {
            split: evaluate(classifier, [e for e in examples if e.split == split]) for split in ("train", "heldout")
        }
        args.out.write_text(json.dumps(model, indent=1) + "\n", encoding="utf-8")
        print(json.dumps(model["metrics"], indent=2))
    else:
        classifier = DifficultyClassifier.load(args.model)
        examples = load_examples(args.file) if args.file else [e for e in load_examples() if e.split == "heldout"]
        print(json.dumps(evaluate(classifier, examples), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
