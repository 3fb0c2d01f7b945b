"""What a hostile network sees: the Host allow-list, bounded failed-authentication records
with throttling that never refuses a valid key, client addresses through trusted proxies
only, OPTIONS, TLS, and the local admin socket's peer-credential authentication."""

from __future__ import annotations

import asyncio
import grp
import hashlib
import json
import os
import pwd
import shutil
import socket
import sqlite3
import ssl
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import APPLIANCE, MODEL_NAME, Server, free_port, init_data_dir, run_cli, start_server, stop_server

CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


# -- Host ----------------------------------------------------------------------------------
def test_a_foreign_or_missing_host_is_403_and_health_stays_open(server: Server) -> None:
    auth = {"Authorization": f"Bearer {server.admin_key}"}
    port = server.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
        body = _error(httpx.get(server.url + "/v1/models", headers=auth | {"Host": host}), 403)
        assert body["code"] == "host_not_allowed"
    # no Host at all (HTTP/1.0 style): a raw request, since clients always send one
    with socket.create_connection(("127.0.0.1", int(port))) as s:
        s.sendall(f"GET /v1/models HTTP/1.0\r\nAuthorization: Bearer {server.admin_key}\r\n\r\n".encode())
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 403") and "host_not_allowed" in reply
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST"):
        assert httpx.get(server.url + "/v1/models", headers=auth | {"Host": host}).status_code == 200
    assert httpx.get(server.url + "/healthz", headers={"Host": "evil.example"}).status_code == 200


def test_a_wildcard_bind_without_allowed_hosts_refuses_to_start(tmp_path: Path, model_path: Path) -> None:
    init_data_dir(tmp_path, model_path)
    proc = subprocess.run(
        [*APPLIANCE, "serve", "--data-dir", str(tmp_path), "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")},
    )
    assert proc.returncode == 1
    assert "server.allowed_hosts" in proc.stderr and "0.0.0.0" in proc.stderr


# -- failed authentication -----------------------------------------------------------------
@pytest.fixture
def strict_server(tmp_path: Path, model_path: Path) -> Iterator[Server]:
    """A server with the default failure limit (20 a window) and 3-second windows."""
    key = init_data_dir(tmp_path, model_path)
    (tmp_path / "appliance.toml").write_text("[auth]\nfailure_window_seconds = 3\nfailure_limit = 20\n")
    proc, url, log = start_server(tmp_path)
    user = json.loads(run_cli("keys", "create", "--name", "app", "--json", data_dir=tmp_path).stdout)["key"]
    yield Server(url, tmp_path, key, user, proc, log)
    stop_server(proc)


def _audit_rows(data_dir: Path) -> list[tuple[str, dict]]:
    conn = sqlite3.connect(data_dir / "appliance.db")
    try:
        return [(kind, json.loads(body)) for kind, body in conn.execute("SELECT kind, body FROM audit ORDER BY idx")]
    finally:
        conn.close()


def test_ten_thousand_unauthenticated_requests_add_a_few_records_and_are_throttled(strict_server: Server) -> None:
    before = len(_audit_rows(strict_server.data_dir))
    statuses: list[int] = []

    async def flood() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            async def worker(n: int) -> None:
                for i in range(n):
                    headers = {"Authorization": "Bearer apl_000000000000_wrong"} if i % 2 else {}
                    r = await client.post(strict_server.base_url + "/chat/completions", json=CHAT, headers=headers)
                    statuses.append(r.status_code)
                    if r.status_code == 429:
                        assert int(r.headers["retry-after"]) >= 1

            await asyncio.gather(*(worker(625) for _ in range(16)))

    asyncio.run(flood())
    assert len(statuses) == 10_000
    assert statuses.count(401) >= 20 and statuses.count(429) > 9_000  # past the limit: 429, not 401
    # A valid key from the same address is never refused for the others' failures.
    ok = httpx.post(strict_server.base_url + "/chat/completions", json=CHAT,
                    headers={"Authorization": f"Bearer {strict_server.user_key}"}, timeout=60)
    assert ok.status_code == 200
    time.sleep(4)  # the last window closes and is flushed
    stop_server(strict_server.process)
    rows = _audit_rows(strict_server.data_dir)[before:]
    security = [body for kind, body in rows if kind == "security"]
    assert 1 <= len(security) <= 30, f"{len(security)} security records for 10,000 failures"
    assert len(rows) - len(security) == 1  # plus the one authenticated request
    counted = sum(b["count"] for b in security)
    assert counted == 10_000  # every failure is in the count
    assert {b["reason"] for b in security} == {"missing", "invalid"}
    assert {b["client"] for b in security} == {"127.0.0.1"}
    assert "wrong" not in json.dumps(security)


# -- trusted proxies -----------------------------------------------------------------------
def test_forwarded_addresses_are_believed_only_from_trusted_proxies(tmp_path: Path, model_path: Path) -> None:
    key = init_data_dir(tmp_path, model_path)
    (tmp_path / "appliance.toml").write_text('[server]\ntrusted_proxies = ["127.0.0.1"]\n')
    proc, url, _ = start_server(tmp_path)
    try:
        auth = {"Authorization": f"Bearer {key}"}
        r = httpx.get(url + "/v1/models", headers=auth | {"X-Forwarded-For": "198.51.100.9, 203.0.113.7"})
        rid = r.headers["x-request-id"]
    finally:
        stop_server(proc)
    bodies = [b for _, b in _audit_rows(tmp_path) if b.get("request_id") == rid]
    assert bodies[0]["client"] == "203.0.113.7"  # the hop the trusted proxy saw


def test_forwarded_addresses_from_anyone_else_are_ignored(server: Server) -> None:
    auth = {"Authorization": f"Bearer {server.admin_key}"}
    r = httpx.get(server.url + "/v1/models", headers=auth | {"X-Forwarded-For": "203.0.113.7"})
    rid = r.headers["x-request-id"]
    records = httpx.get(server.url + "/admin/audit", params={"limit": 10_000}, headers=auth).json()["data"]
    (record,) = [x for x in records if x["body"].get("request_id") == rid]
    assert record["body"]["client"] == "127.0.0.1"


# -- OPTIONS -------------------------------------------------------------------------------
def test_options_needs_a_key_and_never_fails(server: Server) -> None:
    for path in ("/v1/models", "/v1/chat/completions", "/admin/keys", "/healthz"):
        r = httpx.options(server.url + path)
        assert r.status_code in (200, 204, 401), (path, r.status_code, r.text)
        with_key = httpx.options(server.url + path, headers={"Authorization": f"Bearer {server.user_key}"})
        assert with_key.status_code in (200, 204), (path, with_key.status_code, with_key.text)
        assert "allow" in with_key.headers
    assert httpx.options(server.url + "/v1/models").status_code == 401


# -- TLS -----------------------------------------------------------------------------------
def test_init_tls_serves_https_with_the_printed_fingerprint(tmp_path: Path, model_path: Path) -> None:
    out = run_cli("init", "--model", str(model_path), "--model-name", MODEL_NAME, "--tls", "--json", data_dir=tmp_path)
    result = json.loads(out.stdout)
    cert = Path(result["tls"]["cert"])
    assert stat.S_IMODE(Path(result["tls"]["key"]).stat().st_mode) == 0o600
    port = free_port()
    proc = subprocess.Popen(
        [*APPLIANCE, "serve", "--data-dir", str(tmp_path), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")},
    )
    url = f"https://127.0.0.1:{port}"
    try:
        context = ssl.create_default_context(cafile=str(cert))
        wait_alive_tls(url, context)
        r = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {result['admin_key']}"}, verify=context)
        assert r.status_code == 200
        der = ssl.PEM_cert_to_DER_cert(cert.read_text())
        assert ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest()) == result["tls"]["fingerprint"]
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the same port is not served
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).raise_for_status()
    finally:
        stop_server(proc)


def wait_alive_tls(url: str, context: ssl.SSLContext, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", verify=context, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not come up")


# -- the local admin socket ----------------------------------------------------------------
def _uds(path: Path, method: str, target: str, **kw: object) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://localhost") as c:
        return c.request(method, target, **kw)  # type: ignore[arg-type]


def test_the_admin_socket_trusts_the_local_admin_without_a_key(server: Server) -> None:
    path = server.data_dir / "admin.sock"
    assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o660
    r = _uds(path, "POST", "/admin/keys", json={"name": "via-socket", "role": "user"})
    assert r.status_code == 201, r.text
    record = [
        x for x in httpx.get(server.url + "/admin/audit", params={"kind": "admin", "limit": 10_000},
                             headers={"Authorization": f"Bearer {server.admin_key}"}).json()["data"]
        if x["body"]["target"] == r.json()["id"]
    ]
    assert record[0]["body"]["actor"]["kind"] == "local" and record[0]["body"]["actor"]["uid"] == os.getuid()
    # the same request over TCP needs a key
    assert httpx.post(server.url + "/admin/keys", json={"name": "x"}).status_code == 401


@pytest.mark.skipif(os.getuid() != 0 or not Path("/usr/bin/python3").exists(), reason="needs root, to run a client as nobody")
def test_other_users_cannot_use_the_admin_socket_unless_in_the_admin_group(model_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    data = Path(tempfile.mkdtemp(prefix="appliance-socket-"))  # a path nobody can walk to
    os.chmod(data, 0o755)
    client = (  # the system Python, with a bare socket: nobody cannot read this venv
        "import socket\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.connect({str(data / 'admin.sock')!r})\n"
        "except OSError as exc:\n"
        "    print(type(exc).__name__); raise SystemExit\n"
        "s.sendall(b'GET /admin/keys HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n')\n"
        "print(s.recv(64).split()[1].decode())\n"
    )

    def as_nobody() -> str:
        return subprocess.run(
            ["/usr/bin/python3", "-c", client], capture_output=True, text=True, timeout=30,
            user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
        ).stdout.strip()

    init_data_dir(data, model_path)
    proc, _, _ = start_server(data)
    try:
        assert as_nobody() == "PermissionError"  # the socket is 0660 root:root
    finally:
        stop_server(proc)
    group = grp.getgrgid(nobody.pw_gid).gr_name
    (data / "appliance.toml").write_text(f'[server]\nadmin_group = "{group}"\n')
    proc, _, _ = start_server(data)
    try:
        assert as_nobody() == "200"  # a member of the admin group
    finally:
        stop_server(proc)
        shutil.rmtree(data, ignore_errors=True)


def test_the_cli_changes_the_live_server_through_the_socket(server: Server) -> None:
    made = json.loads(run_cli("keys", "create", "--name", "short-lived", "--json", data_dir=server.data_dir).stdout)
    headers = {"Authorization": f"Bearer {made['key']}"}
    assert httpx.get(server.base_url + "/models", headers=headers).status_code == 200
    run_cli("keys", "revoke", made["id"], data_dir=server.data_dir)
    assert httpx.get(server.base_url + "/models", headers=headers).status_code == 401


def test_the_cli_works_on_the_database_when_no_server_runs(tmp_path: Path, model_path: Path) -> None:
    init_data_dir(tmp_path, model_path)
    made = json.loads(run_cli("keys", "create", "--name", "offline", "--json", data_dir=tmp_path).stdout)
    run_cli("keys", "revoke", made["id"], data_dir=tmp_path)
    actors = [b["actor"] for k, b in _audit_rows(tmp_path) if k == "admin" and b["target"] == made["id"]]
    assert len(actors) == 2 and all(a["kind"] == "cli" for a in actors)
    assert not (tmp_path / "admin.sock").exists()
