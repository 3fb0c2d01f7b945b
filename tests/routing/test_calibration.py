"""A site recalibrates the `auto` threshold on its own golden set: the CLI on the database
(the server's admin API is tested live in test_routing_live.py), audited, in force at once
for `routes explain`, and bad golden sets refused without changing anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.routing.classifier import DifficultyClassifier, load_examples
from appliance.routing.scoring import rescale
from tests.conftest import MODEL_NAME, init_data_dir, run_cli


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Path:
    path = tmp_path_factory.mktemp("calibration")
    init_data_dir(path, model_path)
    run_cli("routes", "set", "auto", "--strategy", "auto", "--candidate", MODEL_NAME, data_dir=path)
    return path


def golden(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "golden.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def site_rows() -> list[dict]:
    """40 easy and 40 hard prompts of the packaged train split, as a site's own labelled requests."""
    train = [e for e in load_examples() if e.split == "train"]
    rows: list[dict] = []
    for label in ("easy", "hard"):
        rows += [{"prompt": e.prompt, "label": e.label} for e in train if e.label == label][:40]
    return rows


def calibration(data_dir: Path) -> dict:
    return json.loads(run_cli("routes", "calibrate", "--json", data_dir=data_dir).stdout)


def admin_actions(data_dir: Path) -> list[str]:
    out = run_cli("audit", "export", data_dir=data_dir).stdout
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [r["body"].get("action") for r in records if r["kind"] == "admin"]


def test_the_packaged_threshold_is_in_force_until_a_site_calibrates(data_dir: Path) -> None:
    out = calibration(data_dir)
    assert out["calibrated"] is False
    assert out["threshold"] == out["packaged_threshold"] == DifficultyClassifier.load().threshold


def test_calibrate_fits_audits_and_takes_effect(data_dir: Path, tmp_path: Path) -> None:
    fitted = json.loads(run_cli("routes", "calibrate", "--file", str(golden(tmp_path, site_rows())), "--json",
                                data_dir=data_dir).stdout)
    assert fitted["calibrated"] is True and fitted["examples"] == 80
    assert fitted["accuracy"] >= 0.85 and 0 < fitted["threshold"] < 1
    assert "router.calibrate" in admin_actions(data_dir)

    prompt = "Write a haiku about autumn."
    raw = DifficultyClassifier.load().score(prompt)
    explained = json.loads(run_cli("routes", "explain", "--model", "auto", "--prompt", prompt, "--json",
                                   data_dir=data_dir).stdout)
    assert explained["score"] == pytest.approx(rescale(raw, fitted["threshold"]), abs=1e-4)

    run_cli("routes", "calibrate", "--reset", data_dir=data_dir)
    assert calibration(data_dir)["calibrated"] is False
    assert "router.reset_calibration" in admin_actions(data_dir)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json\n", "not JSON"),
        ('["a list"]\n', "JSON object"),
        ("".join(json.dumps({"prompt": f"hi {i}", "label": "easy"}) + "\n" for i in range(30)), "10 hard"),
        ('{"prompt": "hi", "label": "easy"}\n', "at least 10"),
        ("".join(json.dumps({"prompt": f"hi {i}", "label": "medium"}) + "\n" for i in range(30)), "easy or hard"),
        ("".join(json.dumps({"prompt": f"q {i}", "label": "easy" if i > 9 else "hard"}) + "\n" for i in range(511)),
         "at most 500"),
        ('{"prompt": "' + "x" * 8001 + '", "label": "easy"}\n', "at most 8,000 characters"),
    ],
)
def test_a_bad_golden_set_is_refused_and_changes_nothing(data_dir: Path, tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    before = admin_actions(data_dir)
    out = run_cli("routes", "calibrate", "--file", str(path), data_dir=data_dir, check=False)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert calibration(data_dir)["calibrated"] is False
    assert admin_actions(data_dir) == before


def test_a_corrupt_calibration_file_falls_back_to_the_packaged_threshold(data_dir: Path) -> None:
    path = data_dir / "router-calibration.json"
    path.write_text("{broken")
    try:
        out = calibration(data_dir)
        assert out["calibrated"] is False and "not valid JSON" in out["error"]
        explained = run_cli("routes", "explain", "--model", "auto", "--prompt", "hello", "--json", data_dir=data_dir)
        assert "score" in json.loads(explained.stdout)
    finally:
        path.unlink()
