"""The chain itself: canonical encoding, hashes that link 1..N, secrets scrubbed, checkpoints
every N records and every T seconds, the signing key, and many concurrent appenders mixed with
failing jobs in the same group commit."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from appliance.audit import (
    GENESIS_HASH,
    Actor,
    AuditError,
    AuditLog,
    Signer,
    admin_body,
    cli_actor,
    load_or_create_signing_key,
    verify,
)
from appliance.audit.canonical import canonical_bytes, canonical_json
from appliance.audit.chain import record_encoding, record_hash
from appliance.audit.signing import KEY_FILE, PUBLIC_KEY_FILE, load_pinned_public_key, verify_signature
from appliance.config import load_settings
from appliance.errors import AuditUnavailable, InvalidRequest
from appliance.store import Store

from . import connect, fill, open_log, request_body


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- canonical encoding ------------------------------------------------------------------------
def test_canonical_encoding_is_sorted_compact_utf8_and_independent_of_key_order() -> None:
    a = {"b": 1, "a": {"z": [1, 2, {"y": None, "x": True}], "é": "naïve 日本 🙂"}}
    b = {"a": {"é": "naïve 日本 🙂", "z": [1, 2, {"x": True, "y": None}]}, "b": 1}
    assert canonical_json(a) == canonical_json(b)
    assert canonical_json(a) == '{"a":{"z":[1,2,{"x":true,"y":null}],"é":"naïve 日本 🙂"},"b":1}'
    assert canonical_bytes(a) == canonical_json(a).encode("utf-8")
    assert canonical_json({"q": 'say "hi"\n\\'}) == '{"q":"say \\"hi\\"\\n\\\\"}'


def test_canonical_floats_use_repr_and_differ_from_ints() -> None:
    assert canonical_json({"v": [0.1, 1e-07, 1712345678.123456, -0.0, 2.5e300, 1.0, 1]}) == (
        '{"v":[0.1,1e-07,1712345678.123456,-0.0,2.5e+300,1.0,1]}'
    )
    for value in (0.1, 1 / 3, 1712345678.1234567, 5e-324):
        assert json.loads(canonical_json(value)) == value  # round-trips exactly


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, {"k": [math.nan]}, {1: "int key"}, {"s": {1, 2}}, b"bytes", "\ud800"])
def test_canonical_refuses_ambiguous_values(bad: object) -> None:
    with pytest.raises(ValueError):
        canonical_bytes(bad)


def test_record_encoding_matches_the_generic_encoding() -> None:
    body = {"z": 1, "a": "é"}
    full = {"idx": 7, "ts": 1.5, "kind": "admin", "key_id": None, "team_id": "t", "body": body}
    assert record_encoding(7, 1.5, "admin", None, "t", canonical_json(body)) == canonical_bytes(full)


# -- the chain ---------------------------------------------------------------------------------
def test_records_are_numbered_from_one_and_each_hash_chains_to_the_previous(tmp_path: Path) -> None:
    store, log = open_log(tmp_path)
    with store:
        assert [log.append_sync("request", request_body(i), key_id="k", team_id="t") for i in range(3)] == [1, 2, 3]
        assert fill(log, 7) == list(range(4, 11))
        rows = store.query("SELECT idx, ts, kind, key_id, team_id, body, prev_hash, hash FROM audit ORDER BY idx")
    prev = GENESIS_HASH
    for n, row in enumerate(rows, start=1):
        assert row["idx"] == n and row["prev_hash"] == prev
        record = {"idx": n, "ts": row["ts"], "kind": row["kind"], "key_id": row["key_id"], "team_id": row["team_id"], "body": json.loads(row["body"])}
        encoded = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        assert row["hash"] == hashlib.sha256(bytes.fromhex(prev) + encoded).hexdigest()
        prev = row["hash"]
    assert record_hash(GENESIS_HASH, 1, rows[0]["ts"], "request", "k", "t", rows[0]["body"]) == rows[0]["hash"]


def test_append_refuses_bad_records_before_they_reach_the_writer(tmp_path: Path) -> None:
    store, log = open_log(tmp_path)
    with store:
        with pytest.raises(ValueError, match="NaN"):
            log.append_fn("request", {"cost": math.nan}, key_id=None, team_id=None)
        with pytest.raises(ValueError, match="kind"):
            log.append_fn("login", {}, key_id=None, team_id=None)
        with pytest.raises(ValueError):
            log.append_fn("admin", {"when": object()}, key_id=None, team_id=None)
        assert store.query_one("SELECT COUNT(*) FROM audit")[0] == 0


def test_secrets_are_scrubbed_from_every_string_in_the_body(tmp_path: Path) -> None:
    key = "apl_0123456789ab_Zm9vYmFy-_x_QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"
    store, log = open_log(tmp_path)
    with store:
        body = admin_body(
            Actor({"key_id": "0123456789ab", "key_name": "ops", "role": "admin"}),
            "keys.create",
            "0123456789ab",
            after={"name": "ops", "note": f"the key is {key}.", "secret": "s3cret", "tags": [key, {"deep": f"x{key}"}]},
        )
        body["prompt"] = {"full": f"my key: {key} and my upstream key sk-proj-ABCDEFGHIJKLMNOPQRST"}
        log.append_sync("admin", dict(body), key_id="0123456789ab", team_id="default")
        stored = store.query_one("SELECT body FROM audit")["body"]
        assert "apl_0123456789ab_" not in stored and "Zm9vYmFy" not in stored and "s3cret" not in stored
        assert "sk-proj-ABCD" not in stored
        after = json.loads(stored)["after"]
        assert after["note"] == "the key is [API_KEY]." and after["tags"] == ["[API_KEY]", {"deep": "x[API_KEY]"}]
        assert after["secret"] == "[REDACTED]" and after["name"] == "ops"
        assert verify(connect(tmp_path / "appliance.db"), public_key=log.signer.public_key_hex).ok



_PLANTED = [
    ("value", "apl_0123456789ab_Zm9vYmFyQUJDREVGR0hJSktM"),
    ("value", "sk-proj-ABCDEFGHIJKLMNOPQRST"),
    ("value", "AKIAABCDEFGHIJKLMNOP"),
    ("value", "ghp_" + "a" * 30),
    ("value", "xoxb-1234567890ab"),
    ("key", "sk-live-ABCDEFGHIJKLMNOPQRST"),
    ("field", "secret"),
    ("field", "Password"),
    ("field", "API_KEY"),
    ("field", "api_\u212aey"),  # KELVIN SIGN: lower() makes it "api_key"
    ("field", "authorization"),
]


@pytest.mark.parametrize(("where", "planted"), _PLANTED)
def test_a_record_is_scrubbed_wherever_a_secret_sits_in_it(tmp_path: Path, where: str, planted: str) -> None:
    """The body is encoded once and only scrubbed when it may hold a secret: that shortcut must
    never let one through, at any depth, as a value, a key or a secret-named field."""
    planted = planted.encode().decode("unicode_escape") if "\\u" in planted else planted
    store, log = open_log(tmp_path)
    with store:
        for depth in range(3):
            inner: object = {planted: "x"} if where == "key" else {planted: "hunter2"} if where == "field" else f"note {planted}."
            for _ in range(depth):
                inner = {"route": "auto", "tries": ["a", inner]}
            body = {"request_id": f"r{depth}", "status": 200, "detail": inner}
            log.append_sync("request", body, key_id="0123456789ab", team_id="default")
        stored = [row["body"] for row in store.query("SELECT body FROM audit ORDER BY idx")]
    for text in stored:
        assert "hunter2" not in text and (where == "field" or planted not in text)  # a field keeps its name
        assert ("[REDACTED]" if where == "field" else "[API_KEY]") in text
    plain = {"request_id": "r9", "model": "m", "route_trail": "auto>score=0.4>m", "user": "night shift"}
    store, log = open_log(tmp_path / "plain")
    with store:
        log.append_sync("request", dict(plain), key_id="k", team_id="t")
        assert json.loads(store.query_one("SELECT body FROM audit")["body"]) == plain  # nothing to scrub: kept as is

def test_admin_body_helpers() -> None:
    actor = cli_actor()
    assert actor.info["kind"] == "cli" and actor.info["user"]
    assert admin_body(actor, "models.add", "m", after={"sha256": "x"}) == {
        "request_id": None,
        "actor": actor.info,
        "action": "models.add",
        "target": "m",
        "before": None,
        "after": {"sha256": "x"},
        "client": None,
    }


def test_a_write_combined_with_the_append_commits_atomically(tmp_path: Path) -> None:
    store, log = open_log(tmp_path)
    with store:
        audit_fn = log.append_fn("request", request_body(1), key_id="k", team_id="default")

        def usage_fn(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO usage (request_id, ts, day, key_id, team_id) VALUES ('req-1', 1, '2024-01-01', 'k', 'default')")

        assert store.write_sync(lambda conn: (usage_fn(conn), audit_fn(conn)))[1] == 1

        def failing(conn: sqlite3.Connection) -> None:
            usage_fn(conn)
            log.append_fn("request", request_body(2), key_id="k", team_id="default")(conn)
            raise RuntimeError("metering refused")

        with pytest.raises(RuntimeError):
            store.write_sync(failing)
        assert store.query_one("SELECT COUNT(*) FROM usage")[0] == 1
        assert log.append_sync("request", request_body(3), key_id="k", team_id="default") == 2


def test_query_filters_and_pages(tmp_path: Path) -> None:
    store, log = open_log(tmp_path)
    with store:
        fill(log, 12, start_ts=1000.0)
        log.append_sync("admin", admin_body(cli_actor(), "keys.revoke", "k1"), key_id=None, team_id=None)
        assert [r.idx for r in log.query(limit=5)] == [1, 2, 3, 4, 5]
        assert [r.idx for r in log.query(limit=5, after_idx=5)] == [6, 7, 8, 9, 10]
        assert [r.idx for r in log.query(key_id="0123456789ab")] == [2, 4, 6, 8, 10, 12]
        assert [r.idx for r in log.query(team_id="research")] == [1, 4, 7, 10]
        assert [r.idx for r in log.query(since=1003.0, until=1006.0)] == [4, 5, 6]
        admin = log.query(kind="admin")
        assert [r.idx for r in admin] == [13] and admin[0].body["action"] == "keys.revoke"
        assert admin[0].to_dict()["ts"].endswith("+00:00")
        with pytest.raises(InvalidRequest):
            log.query(limit=0)
        with pytest.raises(InvalidRequest):
            log.query(kind="other")


def test_an_append_that_cannot_be_committed_fails_closed(tmp_path: Path) -> None:
    store, log = open_log(tmp_path)
    with store:
        log.append_sync("request", request_body(0), key_id="k", team_id="t")
    with pytest.raises(AuditUnavailable, match="could not be written"):
        log.append_sync("request", request_body(1), key_id="k", team_id="t")  # the store is closed


# -- checkpoints -------------------------------------------------------------------------------
def test_a_checkpoint_is_written_with_every_nth_record(tmp_path: Path) -> None:
    store, log = open_log(tmp_path, every=5)
    with store:
        fill(log, 7)
        for _ in range(5):
            log.append_sync("request", request_body(0), key_id="k", team_id="t")
        rows = store.query("SELECT record_idx, record_hash, ts, signature, public_key FROM audit_checkpoints ORDER BY idx")
        assert [r["record_idx"] for r in rows] == [5, 10]
        for row in rows:
            assert row["record_hash"] == store.query_one("SELECT hash FROM audit WHERE idx = ?", (row["record_idx"],))["hash"]
            message = canonical_bytes({"index": row["record_idx"], "hash": row["record_hash"], "time": row["ts"]})
            assert verify_signature(load_pinned_public_key(tmp_path / "keys"), message, row["signature"])  # type: ignore[arg-type]
        latest = log.latest_checkpoint()
        assert latest is not None and latest.index == 10 and latest.public_key == log.signer.public_key_hex


async def test_a_checkpoint_is_due_after_the_interval_when_records_were_added(tmp_path: Path) -> None:
    clock = FakeClock(1000.0)
    store, log = open_log(tmp_path, every=1000, seconds=10.0, clock=clock)
    with store:
        assert await log.checkpoint_if_due() is None  # empty log
        for _ in range(3):
            await log.append("request", request_body(0), key_id="k", team_id="t")
        clock.now = 1005.0
        assert await log.checkpoint_if_due() is None  # 5 s after the first record
        clock.now = 1011.0
        first = await log.checkpoint_if_due()
        assert first is not None and (first.index, first.time) == (3, 1011.0)
        clock.now = 1030.0
        assert await log.checkpoint_if_due() is None  # nothing new
        await log.append("request", request_body(0), key_id="k", team_id="t")
        clock.now = 1035.0
        second = await log.checkpoint_if_due()
        assert second is not None and second.index == 4  # 24 s after the last checkpoint
        await log.append("request", request_body(0), key_id="k", team_id="t")
        assert await log.checkpoint_if_due() is None  # 0 s after the last checkpoint
        forced = await log.checkpoint_if_due(force=True)
        assert forced is not None and forced.index == 5
        assert log.checkpoint_if_due_sync(force=True) is None  # already covered
        again = await log.checkpoint()  # always signs the tail, for off-box export
        assert again is not None and again.index == 5 and again.id != forced.id
        assert verify(connect(tmp_path / "appliance.db"), public_key=log.signer.public_key_hex).checkpoints_checked == 4


async def test_periodic_checkpoints_survive_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    failures = iter([True, True])

    def flaky_clock() -> float:
        if next(failures, False):
            raise OSError("clock unavailable")
        return time.time()

    store, log = open_log(tmp_path, seconds=0.02)
    with store:
        await log.append("request", request_body(0), key_id="k", team_id="t")
        log.clock = flaky_clock
        task = asyncio.create_task(log.run_periodic_checkpoints(poll_seconds=0.01))
        try:
            for _ in range(200):
                await asyncio.sleep(0.01)
                if log.latest_checkpoint() is not None:
                    break
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        latest = log.latest_checkpoint()
        assert latest is not None and latest.index == 1
        assert "periodic audit checkpoint failed" in caplog.text


async def test_concurrent_appends_mixed_with_failing_jobs_keep_the_chain_whole(tmp_path: Path) -> None:
    store, log = open_log(tmp_path, every=7)

    async def failing(i: int) -> None:
        fn = log.append_fn("request", request_body(i), key_id="k", team_id="t")

        def job(conn: sqlite3.Connection) -> None:
            fn(conn)
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            await store.write(job)

    async def append(i: int) -> int:
        return await log.append("request", request_body(i), key_id=f"k{i % 5}", team_id="t")

    with store:
        jobs = [append(i) for i in range(200)] + [failing(i) for i in range(20)]
        jobs = jobs[::2] + jobs[1::2]  # interleave the failures with the appends
        results = await asyncio.gather(*jobs)
        assert sorted(r for r in results if r is not None) == list(range(1, 201))
        assert [r[0] for r in store.query("SELECT idx FROM audit ORDER BY idx")] == list(range(1, 201))
        assert store.commits < 200  # they really were grouped
        report = verify(connect(tmp_path / "appliance.db"), public_key=log.signer.public_key_hex)
        assert report.ok, report.problem
        assert (report.records_checked, report.checkpoints_checked) == (200, 200 // 7)


# -- signing key -------------------------------------------------------------------------------
def test_signing_key_is_created_once_owner_only_with_a_pinned_public_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    signer = load_or_create_signing_key(keys)
    assert stat.S_IMODE(os.stat(keys / KEY_FILE).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o700
    assert load_pinned_public_key(keys) == signer.public_key_hex == (keys / PUBLIC_KEY_FILE).read_text().strip()
    assert load_or_create_signing_key(keys).public_key_hex == signer.public_key_hex
    (keys / PUBLIC_KEY_FILE).unlink()  # a lost public key is re-derived from the private key
    assert load_or_create_signing_key(keys).public_key_hex == signer.public_key_hex
    assert load_pinned_public_key(keys) == signer.public_key_hex


def test_a_replaced_or_damaged_signing_key_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    load_or_create_signing_key(keys)
    (keys / KEY_FILE).write_bytes(Signer.generate().private_pem())
    with pytest.raises(AuditError, match="does not match the pinned public key"):
        load_or_create_signing_key(keys)
    (keys / KEY_FILE).write_text("not a key")
    with pytest.raises(AuditError, match="damaged"):
        load_or_create_signing_key(keys)


def test_from_settings_uses_the_data_directory_and_audit_settings(tmp_path: Path) -> None:
    (tmp_path / "appliance.toml").write_text("[audit]\ncheckpoint_every_records = 3\ncheckpoint_every_seconds = 5.5\n")
    settings = load_settings(tmp_path, env={})
    settings.paths.ensure()
    with Store(settings.paths.database) as store:
        log = AuditLog.from_settings(store, settings)
        assert (log.checkpoint_every_records, log.checkpoint_every_seconds) == (3, 5.5)
        assert log.signer.public_key_hex == load_pinned_public_key(settings.paths.keys)
