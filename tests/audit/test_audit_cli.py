"""`appliance audit verify|export|checkpoint`, driven through click's test runner against a real
data directory: exit 0 when intact, 1 with the first bad record when tampered, one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from appliance.audit import Signer
from appliance.audit.cli import audit
from appliance.audit.signing import KEY_FILE, PUBLIC_KEY_FILE

from . import connect, fill, open_log

T0 = 1_714_000_000.0  # 2024-04-24T23:06:40Z


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("APPLIANCE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    store, log = open_log(tmp_path, every=10)
    with store:
        fill(log, 25, start_ts=T0)
    return tmp_path


def run(*args: str) -> Result:
    return CliRunner().invoke(audit, list(args))


def test_verify_an_intact_log(data_dir: Path) -> None:
    result = run("verify", "--data-dir", str(data_dir))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "audit chain ok: 25 records and 2 checkpoints verified"
    report = json.loads(run("verify", "--data-dir", str(data_dir), "--json").stdout)
    assert report["ok"] is True and report["records_checked"] == 25 and report["first_bad_index"] is None


def test_verify_a_tampered_log_names_the_first_bad_record(data_dir: Path) -> None:
    connect(data_dir / "appliance.db").execute("UPDATE audit SET body = json_set(body, '$.status', 500) WHERE idx = 7")
    result = run("verify", "--data-dir", str(data_dir))
    assert result.exit_code == 1
    assert result.stdout.strip() == "audit chain broken at record 7: hash mismatch (record edited)"
    report = json.loads(run("verify", "--data-dir", str(data_dir), "--json").stdout)
    assert report["ok"] is False and report["first_bad_index"] == 7


def test_checkpoint_then_verify_against_it_catches_a_truncated_tail(data_dir: Path) -> None:
    cp_file = data_dir / "offbox.json"
    result = run("checkpoint", "--data-dir", str(data_dir), "--output", str(cp_file))
    assert result.exit_code == 0, result.output
    assert "checkpoint of record 25 written" in result.stderr
    assert json.loads(cp_file.read_text())["index"] == 25
    printed = json.loads(run("checkpoint", "--data-dir", str(data_dir)).stdout)
    assert printed["index"] == 25 and printed["public_key"] == (data_dir / "keys" / PUBLIC_KEY_FILE).read_text().strip()
    assert run("verify", "--data-dir", str(data_dir), "--checkpoint", str(cp_file)).exit_code == 0

    conn = connect(data_dir / "appliance.db")
    conn.execute("DELETE FROM audit WHERE idx >= 24")
    conn.execute("DELETE FROM audit_checkpoints WHERE record_idx >= 24")
    assert run("verify", "--data-dir", str(data_dir)).exit_code == 0  # the box alone cannot tell
    result = run("verify", "--data-dir", str(data_dir), "--checkpoint", str(cp_file))
    assert result.exit_code == 1
    assert result.stdout.strip() == (
        "audit chain broken at record 24: the log ends at record 23 but the exported checkpoint covers record 25 (tail truncated)"
    )


def test_verify_with_a_swapped_key_directory_fails_against_the_offbox_checkpoint(data_dir: Path) -> None:
    cp_file = data_dir / "offbox.json"
    assert run("checkpoint", "--data-dir", str(data_dir), "--output", str(cp_file)).exit_code == 0
    forger = Signer.generate()
    keys = data_dir / "keys"
    (keys / KEY_FILE).write_bytes(forger.private_pem())
    (keys / PUBLIC_KEY_FILE).write_text(forger.public_key_hex + "\n")
    result = run("verify", "--data-dir", str(data_dir), "--checkpoint", str(cp_file))
    assert result.exit_code == 1 and "the signing key was replaced" in result.stdout
    result = run("verify", "--data-dir", str(data_dir))  # the stored checkpoints were signed by the original key
    assert result.exit_code == 1 and "signed by another key" in result.stdout
    # The CLI refuses to sign with a key that does not match the pinned one.
    (keys / PUBLIC_KEY_FILE).write_text(json.loads(cp_file.read_text())["public_key"] + "\n")
    result = run("checkpoint", "--data-dir", str(data_dir))
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and "does not match the pinned public key" in result.stderr


def test_an_explicit_public_key_overrides_the_pinned_one(data_dir: Path) -> None:
    result = run("verify", "--data-dir", str(data_dir), "--public-key", Signer.generate().public_key_hex)
    assert result.exit_code == 1 and "signed by another key" in result.stdout
    result = run("verify", "--data-dir", str(data_dir), "--public-key", "zz")
    assert result.exit_code == 1 and result.stderr.startswith("error: not an Ed25519 public key")


def test_a_malformed_checkpoint_file_is_a_one_line_error(data_dir: Path) -> None:
    bad = data_dir / "bad.json"
    bad.write_text("{oops")
    result = run("verify", "--data-dir", str(data_dir), "--checkpoint", str(bad))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and "invalid JSON" in result.stderr
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    result = run("verify", "--data-dir", str(data_dir), "--checkpoint", str(data_dir / "absent.json"))
    assert result.exit_code == 1 and "cannot read the checkpoint file" in result.stderr


def test_verify_without_a_database_is_a_one_line_error(tmp_path: Path) -> None:
    result = run("verify", "--data-dir", str(tmp_path / "nowhere"))
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and "no database" in result.stderr
    assert not (tmp_path / "nowhere").exists()  # verification creates nothing


def test_checkpoint_of_an_empty_log_is_an_error(tmp_path: Path) -> None:
    result = run("checkpoint", "--data-dir", str(tmp_path))
    assert result.exit_code == 1 and result.stderr == "error: the audit log is empty: there is nothing to checkpoint yet\n"


def test_export_jsonl_to_stdout_and_csv_to_a_file(data_dir: Path) -> None:
    result = run("export", "--data-dir", str(data_dir), "--since", "2024-04-24T23:06:50Z", "--until", str(T0 + 15))
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["idx"] for line in result.stdout.splitlines()] == [11, 12, 13, 14, 15]
    out = data_dir / "export.csv"
    result = run("export", "--data-dir", str(data_dir), "--since", "2024-04-25", "--format", "csv", "--output", str(out))
    assert result.exit_code == 0 and result.stdout == ""
    assert out.read_text().splitlines()[0].startswith("idx,ts,ts_epoch,kind")
    assert len(out.read_text().splitlines()) == 1  # nothing after midnight UTC on the 25th
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    assert run("export", "--data-dir", str(data_dir), "--format", "csv").stdout.count("\n") == 26
    assert "exported 25 records" in run("export", "--data-dir", str(data_dir), "--output", str(data_dir / "all.jsonl")).stderr


def test_export_rejects_a_bad_date(data_dir: Path) -> None:
    result = run("export", "--data-dir", str(data_dir), "--since", "last tuesday")
    assert result.exit_code == 2 and "is not a date" in result.output
