"""Tokens, password hashes and TOTP codes."""

from __future__ import annotations

import pytest

from bastion import credentials as c
from bastion.protocol.errors import AuthenticationFailed, TokenInvalid, UsageError


def test_tokens_are_random_and_stored_hashed():
    a, b = c.new_token(), c.new_token()
    assert a != b and c.check_token_format(a) == a
    assert c.token_matches(a, c.token_hash(a)) and not c.token_matches(b, c.token_hash(a))
    assert a not in c.token_hash(a)


@pytest.mark.parametrize("bad", ["", "short", "x" * 43 + "!", None, 5])
def test_malformed_tokens_are_named(bad):
    with pytest.raises(TokenInvalid, match="does not look like a token"):
        c.check_token_format(bad)


def test_truncated_token_is_called_out():
    with pytest.raises(TokenInvalid, match="cut off"):
        c.check_token_format(c.new_token()[:-3])


def test_passwords():
    h = c.hash_password("correct horse battery")
    assert h.startswith("$argon2id$") and "correct" not in h
    assert c.verify_password(h, "correct horse battery")
    assert not c.verify_password(h, "wrong")
    assert not c.verify_password("not-a-hash", "x") and not c.verify_password(None, "x")
    assert not c.needs_rehash(h)


@pytest.mark.parametrize("bad", ["short", " padded password ", "x" * 2000])
def test_password_policy(bad):
    with pytest.raises(UsageError):
        c.check_password_policy(bad)


def test_totp_window_and_replay():
    secret = c.new_totp_secret()
    now = 1_700_000_000.0
    code = c.totp_now(secret, now)
    step = c.verify_totp(secret, code, now=now)
    assert c.verify_totp(secret, code, now=now + 30) == step  # one step of skew
    with pytest.raises(AuthenticationFailed, match="already used"):
        c.verify_totp(secret, code, now=now, last_used_step=step)
    with pytest.raises(AuthenticationFailed, match="wrong"):
        c.verify_totp(secret, code, now=now + 120)
    for bad in ("12345", "abcdef", "1234567", "١٢٣٤٥٦"):
        with pytest.raises(AuthenticationFailed, match="6 digits"):
            c.verify_totp(secret, bad, now=now)


def test_totp_uri():
    uri = c.totp_uri(c.new_totp_secret(), "alice", "dt-bastion demo")
    assert uri.startswith("otpauth://totp/") and "alice" in uri
