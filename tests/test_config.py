"""Settings come from the file, then APPLIANCE_* variables, then CLI flags; bad values name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import load_settings
from appliance.errors import ConfigError
from appliance.paths import default_data_dir


def test_defaults_bind_to_loopback(tmp_path: Path) -> None:
    settings = load_settings(tmp_path, env={})
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 8080
    assert Path(settings.data_dir) == tmp_path.resolve()


def test_data_dir_defaults_per_user_and_env_overrides(tmp_path: Path) -> None:
    assert default_data_dir({"HOME": "/home/x", "XDG_DATA_HOME": "/home/x/.data"}) == Path("/home/x/.data/appliance")
    assert default_data_dir({"APPLIANCE_DATA_DIR": str(tmp_path)}) == tmp_path
    settings = load_settings(None, env={"APPLIANCE_DATA_DIR": str(tmp_path)})
    assert Path(settings.data_dir) == tmp_path.resolve()


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    (tmp_path / "appliance.toml").write_text('[server]\nport = 9001\nhost = "127.0.0.2"\n[runtime]\nslots = 3\n')
    assert load_settings(tmp_path, env={}).server.port == 9001
    env = {"APPLIANCE_SERVER_PORT": "9002"}
    assert load_settings(tmp_path, env=env).server.port == 9002
    assert load_settings(tmp_path, env=env).server.host == "127.0.0.2"
    flagged = load_settings(tmp_path, env=env, overrides={"server": {"port": 9003, "host": None}})
    assert flagged.server.port == 9003
    assert flagged.server.host == "127.0.0.2"
    assert flagged.runtime.slots == 3


@pytest.mark.parametrize(
    ("toml", "env", "expected"),
    [
        ('[server]\nport = "eighty"\n', {}, "server.port: expected int, got str"),
        ("[server]\nport = 70000\n", {}, "server.port: expected int <= 65535"),
        ("[runtime]\nslots = 0\n", {}, "runtime.slots: expected int >= 1"),
        ("[server]\nprot = 1\n", {}, "unknown field prot"),
        ("[nonsense]\na = 1\n", {}, "unknown field nonsense"),
        ("[server\n", {}, "not valid TOML"),
        ("", {"APPLIANCE_SERVER_PORT": "abc"}, "server.port: expected int, got str"),
        ("", {"APPLIANCE_SERVER_PROT": "1"}, "APPLIANCE_SERVER_PROT: unknown setting server.prot"),
        ('[server]\nlog_level = "loud"\n', {}, "server.log_level: expected one of"),
        ('[[models]]\nname = "a"\n[[models]]\nname = "a"\n', {}, "distinct name"),
        ('[runtime]\nweights = "fast"\n', {}, "runtime.weights: invalid enum value 'fast'"),
        ('[[models]]\nname = "a"\nweights = 8\n', {}, "models[0].weights: expected str"),
        ("[runtime]\ndraft_tokens = -1\n", {}, "runtime.draft_tokens: expected int >= 0"),
        ('[[models]]\nname = "a"\ndraft_tokens = 99\n', {}, "models[0].draft_tokens: expected int <= 8"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, toml: str, env: dict[str, str], expected: str) -> None:
    (tmp_path / "appliance.toml").write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path, env=env)
    assert expected in str(info.value)


def test_per_model_overrides(tmp_path: Path) -> None:
    (tmp_path / "appliance.toml").write_text('[[models]]\nname = "m"\nslots = 2\nn_gpu_layers = 10\n')
    settings = load_settings(tmp_path, env={})
    assert settings.model_settings("m").slots == 2
    assert settings.model_settings("m").n_gpu_layers == 10
    assert settings.model_settings("other").slots is None


def test_draft_tokens_default_and_per_model_override(tmp_path: Path) -> None:
    (tmp_path / "appliance.toml").write_text('[runtime]\ndraft_tokens = 2\n[[models]]\nname = "m"\ndraft_tokens = 0\n')
    settings = load_settings(tmp_path, env={})
    assert settings.runtime.draft_tokens == 2
    assert settings.model_settings("m").draft_tokens == 0
    assert load_settings(tmp_path / "fresh", env={}).runtime.draft_tokens == 3
