"""Database URLs: which ones are accepted, and how one is shown.

No psycopg here: dtadmin imports this on every run, SQLite or not.
"""

from __future__ import annotations

import urllib.parse

from bastion.protocol.errors import StateError

SCHEMES = ("postgresql", "postgres")
# libpq parameters that are secrets: the password, and the passphrase of the TLS key.
SECRET_PARAMS = ("password", "sslpassword")


def safe_url(url: str | None) -> str:
    """``url`` without anything secret, for messages, logs and audit rows: the
    scheme, host, port and database name only (never the user, a password or the
    parameters, which may name a password file)."""
    if not url:
        return "(none)"
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        query = urllib.parse.parse_qs(parts.query)
    except ValueError:
        return "postgresql://(unparsable URL)"
    if not host and query.get("host"):
        host = query["host"][0]
    if not port and query.get("port"):
        port = f":{query['port'][0]}"
    return f"postgresql://{host or 'localhost'}{port}{parts.path or '/'}"


def check_url(url: str) -> None:
    """Refuse what is not a postgresql:// URL, and one that carries a password:
    process listings, logs and config files show a URL; libpq reads the password from
    a password file instead."""
    try:
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parts.query)
        password = parts.password
    except ValueError as exc:
        raise StateError(f"the database URL is not valid: {exc}") from None
    if parts.scheme not in SCHEMES:
        raise StateError(
            "database must be a postgresql:// URL (leave it unset for SQLite in the "
            "state directory)"
        )
    if password or any(key.lower() in SECRET_PARAMS for key in query):
        raise password_refused(url)


def password_refused(url: str) -> StateError:
    return StateError(
        "the database URL carries a password; take it out and give it to libpq in a "
        "password file instead (PGPASSFILE, ~/.pgpass, or a passfile= parameter, "
        "e.g. a systemd credential: passfile=$CREDENTIALS_DIRECTORY/pgpass), so it "
        "never shows in a process listing or a log; a TLS key's passphrase "
        f"(sslpassword) likewise stays out of it ({safe_url(url)})"
    )
