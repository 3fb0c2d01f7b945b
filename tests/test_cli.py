"""The `appliance` command line, run as a real subprocess against a real data directory."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from tests.conftest import MODEL_NAME, init_data_dir, run_cli


def test_init_is_idempotent_and_shows_the_admin_key_once(tmp_path: Path, model_path: Path) -> None:
    first = run_cli("init", "--model", str(model_path), "--model-name", MODEL_NAME, data_dir=tmp_path)
    assert "apl_" in first.stdout and "shown once" in first.stdout
    db_before = sqlite3.connect(tmp_path / "appliance.db").execute("SELECT id, key_hash FROM api_keys").fetchall()
    config_before = (tmp_path / "appliance.toml").read_text()
    second = run_cli("init", "--model", str(model_path), "--model-name", MODEL_NAME, data_dir=tmp_path)
    assert "apl_" not in second.stdout and "already initialised" in second.stdout
    assert (
        sqlite3.connect(tmp_path / "appliance.db").execute("SELECT id, key_hash FROM api_keys").fetchall() == db_before
    )
    assert (tmp_path / "appliance.toml").read_text() == config_before
    models = json.loads(run_cli("models", "list", "--json", data_dir=tmp_path).stdout)
    assert [m["name"] for m in models] == [MODEL_NAME]
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "backups").stat().st_mode & 0o777 == 0o700  # whole copies of the database


def test_models_add_list_remove(tmp_path: Path, model_path: Path) -> None:
    run_cli("init", data_dir=tmp_path)
    added = json.loads(run_cli("models", "add", str(model_path), "--name", "tiny", "--json", data_dir=tmp_path).stdout)
    assert added["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert added["architecture"] == "llama" and added["quantization"] == "Q4_1"
    assert added["context_length"] == 8192 and added["has_chat_template"] is True
    assert added["parameter_count"] > 100_000_000
    assert (
        Path(added["path"]).parent == (tmp_path / "models").resolve()
        or Path(added["path"]).parent == tmp_path / "models"
    )
    listing = run_cli("models", "list", data_dir=tmp_path).stdout
    assert "tiny" in listing and "Q4_1" in listing
    assert "on CPU: q4_0_offsets" in listing and "first serve" not in listing  # built at registration
    dup = run_cli("models", "add", str(model_path), "--name", "tiny", data_dir=tmp_path, check=False)
    assert dup.returncode == 1 and "already registered" in dup.stderr
    # On this CPU the Q4_1 file is served split into Q4_0 codes and offsets, built once at registration.
    weights = added["weights"]
    assert weights["encoding"] == "q4_0_offsets" and weights["source_sha256"] == added["sha256"]
    assert Path(weights["adapter_path"]).stat().st_size > 0
    encoded = Path(weights["path"])
    assert encoded.parent == (tmp_path / "models" / "encoded").resolve() and encoded.stat().st_size > 0
    (tmp_path / "appliance.toml").write_text(
        (tmp_path / "appliance.toml").read_text() + '\n[[models]]\nname = "tiny"\nweights = "q8_0"\n'
    )
    listed = json.loads(run_cli("models", "list", "--json", data_dir=tmp_path).stdout)
    assert [m["cpu_weights"] for m in listed] == ["q8_0 (built at first serve)"]
    twin = json.loads(run_cli("models", "add", str(model_path), "--name", "twin", "--json", data_dir=tmp_path).stdout)
    assert twin["weights"]["sha256"] == weights["sha256"]  # same file, same cached encoding
    run_cli("models", "remove", "tiny", data_dir=tmp_path)
    assert encoded.exists()  # still serves "twin"
    run_cli("models", "remove", "twin", data_dir=tmp_path)
    assert json.loads(run_cli("models", "list", "--json", data_dir=tmp_path).stdout) == []
    assert not list((tmp_path / "models").glob("*.gguf"))
    assert not list((tmp_path / "models" / "encoded").iterdir())


def test_bad_model_files_get_a_clear_error_and_leave_nothing(tmp_path: Path, model_path: Path) -> None:
    run_cli("init", data_dir=tmp_path)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(model_path.read_bytes()[:50_000_000])
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    for path, expected in [(truncated, "past end of file"), (not_gguf, "GGUF"), (tmp_path / "missing.gguf", "")]:
        proc = run_cli("models", "add", str(path), data_dir=tmp_path, check=False)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
        assert expected in proc.stderr
    assert json.loads(run_cli("models", "list", "--json", data_dir=tmp_path).stdout) == []
    assert list((tmp_path / "models").iterdir()) == []


def test_key_lifecycle_on_the_cli(tmp_path: Path, model_path: Path) -> None:
    init_data_dir(tmp_path, model_path)
    created = json.loads(
        run_cli(
            "keys",
            "create",
            "--name",
            "payroll-bot",
            "--role",
            "user",
            "--expires",
            "2099-01-01",
            "--json",
            data_dir=tmp_path,
        ).stdout
    )
    assert created["key"].startswith(f"apl_{created['id']}_")
    assert created["expires_at"].startswith("2099-01-01")
    listing = run_cli("keys", "list", data_dir=tmp_path).stdout
    assert "payroll-bot" in listing and created["key"] not in listing
    assert created["key"].split("_", 2)[2] not in run_cli("keys", "list", "--json", data_dir=tmp_path).stdout
    run_cli("keys", "revoke", created["id"], data_dir=tmp_path)
    listed = {k["id"]: k for k in json.loads(run_cli("keys", "list", "--json", data_dir=tmp_path).stdout)}
    assert listed[created["id"]]["status"] == "revoked"
    bad_role = run_cli("keys", "create", "--name", "x", "--role", "root", data_dir=tmp_path, check=False)
    assert bad_role.returncode == 1 and "role must be one of" in bad_role.stderr
    bad_date = run_cli("keys", "create", "--name", "x", "--expires", "soon", data_dir=tmp_path, check=False)
    assert bad_date.returncode == 1 and "not a date" in bad_date.stderr
    missing = run_cli("keys", "revoke", "ffffffffffff", data_dir=tmp_path, check=False)
    assert missing.returncode == 1 and "No key" in missing.stderr


def test_bad_config_is_reported_by_every_command(tmp_path: Path) -> None:
    run_cli("init", data_dir=tmp_path)
    (tmp_path / "appliance.toml").write_text("[server]\nport = 'x'\n")
    proc = run_cli("keys", "list", data_dir=tmp_path, check=False)
    assert proc.returncode == 1
    assert "server.port: expected int, got str" in proc.stderr and "Traceback" not in proc.stderr
