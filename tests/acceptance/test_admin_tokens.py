"""The last admin token cannot be revoked, and a new one can be minted from the data folder.

Revoking a tenant's last valid admin token would lock every administrator out
for good (no token could create another, and a restart does not recover). The
API refuses it with 409; ``taskfleet server mint-admin-token`` is the documented
way back in: it works on the database directly and writes DATA_DIR/admin-token.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

from tests.conftest import Server, wait_until


def tokens(server: Server, token: str | None = None) -> list[dict]:
    with server.api(token) as api:
        r = api.get("/tokens")
    assert r.status_code == 200, r.text
    return r.json()


def audit(server: Server, token: str | None = None) -> list[dict]:
    with server.api(token) as api:
        r = api.get("/audit", params={"limit": 1000, "outcome": "ok"})  # refusals: audited too
    assert r.status_code == 200, r.text
    return r.json()


def new_token(server: Server, role: str, **kw: object) -> dict:
    with server.api() as api:
        r = api.post("/tokens", json={"kind": "admin", "name": role, "role": role, **kw})
    assert r.status_code == 201, r.text
    return r.json()


def test_revoking_the_last_valid_admin_token_is_409_and_changes_nothing(server):
    (boot,) = tokens(server)
    new_token(server, "operator")  # not an admin: does not count
    short = new_token(server, "admin", expires_in=0.5)  # an admin, but soon expired
    expires_at = next(t["expires_at"] for t in tokens(server) if t["id"] == short["id"])
    wait_until(lambda: time.time() > expires_at + 0.05, 5, "the short token to expire")
    with server.api(short["token"]) as api:
        assert api.get("/whoami").status_code == 401
    before_tokens, before_audit = tokens(server), audit(server)
    with server.api() as api:
        r = api.delete(f"/tokens/{boot['id']}")
    assert r.status_code == 409, r.text
    assert "last valid admin token" in r.json()["error"]
    assert "mint-admin-token" in r.json()["error"]
    assert tokens(server) == before_tokens
    assert audit(server) == before_audit
    with server.api() as api:
        assert api.get("/whoami").json()["role"] == "admin"  # still works


def test_revoking_an_admin_token_while_another_admin_exists_is_204(server):
    (boot,) = tokens(server)
    second = new_token(server, "admin")
    with server.api(second["token"]) as api:
        r = api.delete(f"/tokens/{boot['id']}")
        assert r.status_code == 204, r.text
        # Now the second is the last one: revoking it, even by itself, is refused.
        r = api.delete(f"/tokens/{second['id']}")
        assert r.status_code == 409, r.text
        assert api.get("/whoami").status_code == 200
    with server.api() as api:
        assert api.get("/whoami").status_code == 401  # the bootstrap token is revoked
    revoked = {t["id"]: t["revoked"] for t in tokens(server, second["token"])}
    assert revoked == {boot["id"]: True, second["id"]: False}


def mint(server: Server) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "taskfleet",
            "server",
            "mint-admin-token",
            "--data-dir",
            str(server.data_dir),
            "--database",
            server.database_url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_mint_admin_token_from_the_data_folder_works_online_and_offline(server):
    token_file = server.data_dir / "admin-token"
    old = server.admin_token
    out = mint(server)  # while the server runs
    assert out.returncode == 0, out.stdout + out.stderr
    assert str(token_file) in out.stdout
    minted = token_file.read_text().strip()
    assert minted.startswith("tfa_") and minted != old
    assert minted not in out.stdout + out.stderr  # written to the file, never printed
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    with server.api(minted) as api:
        me = api.get("/whoami")
        assert me.status_code == 200, me.text
        assert me.json()["role"] == "admin"
    (entry,) = [a for a in audit(server, minted) if a["action"] == "token.mint"]
    assert entry["actor"].startswith("server-cli:")
    assert entry["detail"]["id"] == me.json()["token_id"]

    # Offline: the server is down, the command needs only the data folder and database.
    server.proc.stop()
    out = mint(server)
    assert out.returncode == 0, out.stdout + out.stderr
    offline = token_file.read_text().strip()
    assert offline not in (minted, old)
    server.restart()
    for tok in (old, minted, offline):  # minting revokes nothing
        with server.api(tok) as api:
            assert api.get("/whoami").json()["role"] == "admin"
