"""Tenant and account names, passwords and roles: what is taken, what is refused and
why (server/tenants.py, server/accounts.py); a session remembers its account."""

from __future__ import annotations

import asyncio

import pytest

from taskfleet.server import accounts, tenants
from taskfleet.server.dashboard.sessions import SessionStore
from taskfleet.server.kernel import ApiError, Principal
from taskfleet.settings import ACCOUNT_PASSWORD_MIN, TENANT_NAME_MAX


@pytest.mark.parametrize("name", ["acme", "a", "acme-eu.2", "A_B", "9lives", "x" * TENANT_NAME_MAX])
def test_good_tenant_names_are_taken(name: str) -> None:
    assert tenants.check_name(name) == name


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("", "required"),
        ("x" * (TENANT_NAME_MAX + 1), f"at most {TENANT_NAME_MAX}"),
        ("a\x00b", "letters, digits"),
        ("a b", "letters, digits"),
        ("-a", "starting with"),
        (".a", "starting with"),
        ("é", "letters, digits"),
        ("a/b", "letters, digits"),
    ],
)
def test_bad_tenant_names_say_why(name: str, words: str) -> None:
    with pytest.raises(ApiError) as info:
        tenants.check_name(name)
    assert info.value.status == 400 and words in info.value.message


def test_only_the_super_admin_manages_tenants() -> None:
    tenants.require_super_admin(Principal(1, 1, "admin", "root", super_admin=True))
    with pytest.raises(ApiError) as info:
        tenants.require_super_admin(Principal(2, 1, "admin", "other"))
    assert info.value.status == 403


def test_account_names_passwords_and_roles() -> None:
    assert accounts.check_name("ann@example.com") == "ann@example.com"
    for bad in ("", "a b", "@ann", "n" * 65):
        with pytest.raises(ApiError):
            accounts.check_name(bad)
    assert accounts.check_password("p" * ACCOUNT_PASSWORD_MIN)
    for bad, words in [
        ("p" * (ACCOUNT_PASSWORD_MIN - 1), "too short"),
        ("p" * 2000, "too long"),
        ("p" * 20 + "\x00", "NUL"),
    ]:
        with pytest.raises(ApiError) as info:
            accounts.check_password(bad)
        assert words in info.value.message
    with pytest.raises(ApiError) as info:
        accounts.check_role("root")
    assert "viewer, operator, admin" in info.value.message


def test_passwords_are_stored_as_argon2id_and_verified() -> None:
    digest = asyncio.run(accounts.hash_password("correct horse battery"))
    assert digest.startswith("$argon2id$")
    assert "correct horse" not in digest
    assert accounts._verify(digest, "correct horse battery")
    assert not accounts._verify(digest, "correct horse battery!")
    assert not accounts._verify("not a hash", "x")


def test_an_accounts_actor_names_the_account() -> None:
    assert Principal(0, 1, "viewer", "ann", account_id=7).actor == "account:7"
    assert Principal(3, 1, "viewer", "t").actor == "token:3"


def test_a_session_remembers_its_account() -> None:
    store = SessionStore(lambda: 0.0, 60)
    s = store.open("", account_id=5)
    got = store.get(s.id)
    assert got is not None and got.account_id == 5 and got.token_hash == ""
    assert store.open("abc").account_id is None
