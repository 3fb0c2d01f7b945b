"""Export: JSONL from which an outsider recomputes the chain with nothing but hashlib and json,
CSV, the since/until window, and checkpoint files with clear errors when malformed."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from datetime import datetime
from pathlib import Path

import pytest

from appliance.audit import AuditError, export_checkpoint, export_records, load_checkpoint, verify
from appliance.audit.export import CSV_COLUMNS

from . import connect, fill, open_log, request_body

T0 = 1_714_000_000.0


def recompute_chain(lines: list[str]) -> str:
    """An external verifier: only the standard library, no appliance code. Returns the last hash."""
    prev = None
    for line in lines:
        rec = json.loads(line)
        if prev is not None:
            assert rec["prev_hash"] == prev
        record = {k: rec[k] for k in ("body", "idx", "key_id", "kind", "team_id")} | {"ts": rec["ts_epoch"]}
        encoded = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
        assert hashlib.sha256(bytes.fromhex(rec["prev_hash"]) + encoded).hexdigest() == rec["hash"], rec["idx"]
        assert datetime.fromisoformat(rec["ts"]).timestamp() == pytest.approx(rec["ts_epoch"], abs=1e-6)
        prev = rec["hash"]
    assert prev is not None
    return prev


@pytest.fixture
def db(tmp_path: Path) -> Path:
    store, log = open_log(tmp_path, every=5)
    with store:
        fill(log, 20, start_ts=T0 + 0.123456789)
        log.append_sync("request", request_body(99, user="zoë", prompt={"full": "日本語 \"quoted\"\n"}), key_id=None, team_id=None)
    return tmp_path / "appliance.db"


def test_the_chain_can_be_recomputed_from_the_jsonl_export_alone(db: Path) -> None:
    lines = list(export_records(connect(db), since=None, fmt="jsonl"))
    assert len(lines) == 21 and all(line.endswith("\n") and line.count("\n") == 1 for line in lines)
    first = json.loads(lines[0])
    assert first["prev_hash"] == "0" * 64 and first["idx"] == 1
    assert set(first) == {"idx", "ts", "ts_epoch", "kind", "key_id", "team_id", "body", "prev_hash", "hash"}
    assert first["ts"] == "2024-04-24T23:06:40.123457+00:00"
    assert json.loads(lines[-1])["body"]["prompt"] == {"full": "日本語 \"quoted\"\n"}
    last = connect(db).execute("SELECT hash FROM audit ORDER BY idx DESC LIMIT 1").fetchone()[0]
    assert recompute_chain(lines) == last


def test_an_export_since_a_date_starts_mid_chain_and_still_recomputes(db: Path) -> None:
    lines = list(export_records(connect(db), since=T0 + 10, until=T0 + 15, fmt="jsonl"))
    assert [json.loads(line)["idx"] for line in lines] == [11, 12, 13, 14, 15]
    before = connect(db).execute("SELECT hash FROM audit WHERE idx = 10").fetchone()[0]
    assert json.loads(lines[0])["prev_hash"] == before
    assert recompute_chain(lines) == connect(db).execute("SELECT hash FROM audit WHERE idx = 15").fetchone()[0]


def test_a_tampered_export_fails_recomputation(db: Path) -> None:
    lines = list(export_records(connect(db), since=None, fmt="jsonl"))
    rec = json.loads(lines[4])
    rec["body"]["status"] = 500
    lines[4] = json.dumps(rec) + "\n"
    with pytest.raises(AssertionError):
        recompute_chain(lines)


def test_csv_export_has_a_header_and_the_body_as_json_text(db: Path) -> None:
    text = "".join(export_records(connect(db), since=T0 + 18, until=T0 + 20, fmt="csv"))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == CSV_COLUMNS
    assert [int(r["idx"]) for r in rows] == [19, 20]
    rows = list(csv.DictReader(io.StringIO("".join(export_records(connect(db), since=T0 + 18.5, fmt="csv")))))
    assert [int(r["idx"]) for r in rows] == [20, 21]  # record 21 has the current time
    last = rows[-1]
    assert json.loads(last["body"])["user"] == "zoë" and last["key_id"] == "" and last["kind"] == "request"
    assert float(last["ts_epoch"]) > T0 and last["ts"].endswith("+00:00")


def test_an_unknown_format_is_refused(db: Path) -> None:
    with pytest.raises(ValueError, match="jsonl"):
        list(export_records(connect(db), since=None, fmt="xml"))  # type: ignore[arg-type]


def test_a_checkpoint_round_trips_through_its_file(tmp_path: Path, db: Path) -> None:
    store, log = open_log(tmp_path, every=5)
    with store:
        checkpoint = log.latest_checkpoint()
    assert checkpoint is not None and checkpoint.index == 20
    path = tmp_path / "cp.json"
    path.write_text(export_checkpoint(checkpoint))
    assert set(json.loads(path.read_text())) == {"index", "hash", "time", "signature", "public_key"}
    loaded = load_checkpoint(path)
    assert loaded.to_dict() == checkpoint.to_dict()
    assert verify(connect(db), public_key=loaded.public_key, checkpoint=loaded).ok


GOOD = {"index": 3, "hash": "a" * 64, "time": 1.5, "signature": "b" * 128, "public_key": "c" * 64}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "invalid JSON at line 1, column 1"),
        (b"{not json", "invalid JSON"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
        (b"[1, 2]", "expected a JSON object"),
        (json.dumps({"index": 3}).encode(), "missing hash, time, signature, public_key"),
        (json.dumps(GOOD | {"index": True}).encode(), "index must be a positive integer"),
        (json.dumps(GOOD | {"index": 0}).encode(), "index must be a positive integer"),
        (json.dumps(GOOD | {"time": "yesterday"}).encode(), "time must be a number"),
        (json.dumps(GOOD | {"hash": "xyz"}).encode(), "hash must be 64 hex characters"),
        (json.dumps(GOOD | {"signature": "ab"}).encode(), "signature must be 128 hex characters"),
        (json.dumps(GOOD | {"public_key": None}).encode(), "public_key must be 64 hex characters"),
        (b" " * 70_000, "larger than"),
    ],
)
def test_a_malformed_checkpoint_file_is_a_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "cp.json"
    path.write_bytes(content)
    with pytest.raises(AuditError) as info:
        load_checkpoint(path)
    assert message in info.value.message and str(path) in info.value.message


def test_a_missing_checkpoint_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="cannot read the checkpoint file: No such file"):
        load_checkpoint(tmp_path / "absent.json")
    with pytest.raises(AuditError, match="cannot read"):
        load_checkpoint(tmp_path)  # a directory
