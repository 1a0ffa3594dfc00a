"""Reading secrets and checking them: files and environment variables, constant-time matching, bearer headers,
and the flags that go together."""

from __future__ import annotations

from pathlib import Path

import pytest

from specfleet.config import RouterConfig
from specfleet.security import API_KEYS_ENV, INTERNAL_TOKEN_ENV, api_keys, bearer, internal_token, matches


def test_api_keys_come_from_the_file_and_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nalpha\n\n  beta  \n")
    monkeypatch.setenv(API_KEYS_ENV, "gamma, delta,")
    assert api_keys(str(keys)) == {"alpha", "beta", "gamma", "delta"}
    monkeypatch.delenv(API_KEYS_ENV)
    assert api_keys("") == frozenset()


def test_the_internal_token_is_one_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(INTERNAL_TOKEN_ENV, raising=False)
    assert internal_token("") == ""
    monkeypatch.setenv(INTERNAL_TOKEN_ENV, "from-the-environment")
    assert internal_token("") == "from-the-environment"
    two = tmp_path / "token"
    two.write_text("one\ntwo\n")
    with pytest.raises(ValueError, match="must be one line"):
        internal_token(str(two))
    with pytest.raises(ValueError, match="cannot read .*missing"):
        internal_token(str(tmp_path / "missing"))


def test_keys_match_exactly_and_bearer_headers_are_read() -> None:
    assert matches("beta", {"alpha", "beta"}) and not matches("bet", {"alpha", "beta"}) and not matches("x", set())
    assert bearer("Bearer abc") == "abc" and bearer("bearer  abc ") == "abc"
    assert bearer("Basic abc") == "" and bearer(None) == "" and bearer("Bearer") == ""


def test_tls_certificate_and_key_go_together() -> None:
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        RouterConfig(tls_cert="cert.pem")
    assert RouterConfig(tls_cert="cert.pem", tls_key="key.pem").tls_key == "key.pem"


def test_admin_keys_are_api_keys_and_an_open_router_treats_everyone_as_admin(tmp_path: Path, monkeypatch) -> None:
    from specfleet.security import ADMIN_KEYS_ENV, Access

    keys = tmp_path / "keys"
    keys.write_text("alice\n")
    monkeypatch.setenv(ADMIN_KEYS_ENV, "root")
    access = Access.from_files(str(keys), "")
    assert access.keys == {"alice", "root"} and access.admin == {"root"}
    assert access.is_admin("root") and not access.is_admin("alice") and not access.is_admin("")
    assert Access().is_admin("") and Access().is_admin("anyone")  # no keys: callers cannot be told apart
    assert Access.caller("alice") == Access.caller("alice") != Access.caller("bob") and Access.caller("") == ""
