"""A database URL carries no secret: libpq's ``sslpassword`` (the passphrase of the
client's TLS key) is refused like ``password``, wherever the URL comes from, since a
URL shows in process listings (``--database``; workers re-exec with the same argv)."""

from __future__ import annotations

import pytest

from bastion.protocol.errors import StateError
from bastion.storage import urls


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://dt@db.example.com/dt?sslpassword=hunter2",
        "postgresql://dt@db.example.com/dt?sslmode=verify-full&SSLPASSWORD=hunter2",
    ],
)
def test_a_url_with_a_tls_key_passphrase_is_refused(url):
    with pytest.raises(StateError) as refused:
        urls.check_url(url)
    assert "hunter2" not in str(refused.value)
    pytest.importorskip("psycopg")
    from bastion.storage import pg_connection

    with pytest.raises(StateError):
        pg_connection.check_url(url)
