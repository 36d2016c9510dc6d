"""``dtclient host-key``: the fingerprint of the bastion's host key, as dtclient checked it.

dtclient, OpenSSH and PuTTY trust the bastion through its host certificate, signed by
the host CA pinned at login. Clients that cannot verify host certificates (paramiko,
libssh, Dropbear) see only the key inside it and ask on first use whether to trust
it; this prints what to compare there: the key of a bastion whose certificate this
command has just verified through the pinned CA, never an unchecked one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from bastion.protocol import console
from bastion.protocol.console import Format

if TYPE_CHECKING:
    from client.api import HostTrust

# asyncssh and client.api are imported when the command runs, not when dtclient starts.


def _probe(trust: HostTrust) -> Any:
    """An SSH client that does the key exchange with the host-certificate check and
    then stops: it offers no credential."""
    from client.api import Credentials, _Client

    class Probe(_Client):
        conn: Any = None

        def connection_made(self, conn: Any) -> None:
            self.conn = conn

    return Probe(trust, Credentials(user=""))


async def verified_host_key(host: str, port: int, user: str, trust: HostTrust) -> Any:
    """The bastion's host key, after asyncssh verified its certificate (signed by a
    trusted or pinned CA, valid now, naming ``host``) during key exchange."""
    import asyncssh

    from bastion.protocol.errors import ConnectionFailed
    from client.api import CONNECT_TIMEOUT

    probe = _probe(trust)
    ca_keys = [asyncssh.import_public_key(line) for line in trust.trusted]
    try:
        conn, _ = await asyncssh.create_connection(
            lambda: probe,
            host,
            port,
            username=user,
            known_hosts=([], ca_keys, []),
            agent_path=None,
            config=None,
            connect_timeout=CONNECT_TIMEOUT,
            client_keys=None,
            password_auth=False,
            kbdint_auth=False,
            public_key_auth=False,
            gss_auth=False,
            host_based_auth=False,
        )
        conn.close()  # the bastion let an unauthenticated user in: the key was still checked
    except asyncssh.HostKeyNotVerifiable as exc:
        raise ConnectionFailed(
            trust.refused or f"cannot verify the bastion: {exc.reason}"
        ) from None
    except asyncssh.PermissionDenied:
        pass  # expected: key exchange and the host check are done; no credential was offered
    except asyncssh.DisconnectError as exc:
        raise ConnectionFailed(f"the bastion refused the connection: {exc.reason}") from None
    except (TimeoutError, OSError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ConnectionFailed(f"cannot reach the bastion at {host}:{port}: {reason}") from None
    key = probe.conn.get_server_host_key() if probe.conn is not None else None
    if key is None or (not trust.accepted and not trust.trusted):
        raise ConnectionFailed("the bastion presented no host key that could be checked")
    return key


def host_key(
    proxy: Annotated[
        str | None,
        typer.Option("--proxy", help="The bastion, HOST:PORT (default: the one you logged in to)."),
    ] = None,
    pin: Annotated[
        str | None,
        typer.Option(
            "--ca-pin",
            help="Check the bastion against this host CA fingerprint (SHA256:...) instead "
            "of the one trusted at login.",
        ),
    ] = None,
    cluster: Annotated[
        str | None,
        typer.Option(
            "--cluster",
            envvar="DT_CLUSTER",
            help="Use this cluster's profile (default: the current one; see dtclient status).",
        ),
    ] = None,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.text,
) -> None:
    """Print the bastion's host key fingerprint, checked through the pinned host CA.

    For SSH clients that cannot verify host certificates (paramiko, libssh, Dropbear):
    compare this SHA256 fingerprint with the one their first-use prompt shows, or put
    the printed line in their known_hosts. Admins print the same with
    `dtadmin ca host-key`.

    Example: dtclient host-key
    """
    import asyncio

    from bastion.protocol.certs import fingerprint, load_public_key
    from bastion.protocol.errors import NotLoggedIn
    from client.api import HostTrust, parse_pin
    from client.profile import Home, split_hostport

    home = Home.open(cluster=cluster)
    pin = parse_pin(pin)
    user = "-dt-host-key"
    if proxy is not None and cluster is None:
        known = home.find_proxy(proxy)  # a bastion logged in to before: its CA, its user
        if known is not None:
            home.select(known)
            proxy = None
    if proxy is None:
        profile = home.load_profile()
        proxy, user = profile.proxy, profile.user
    trusted = () if pin else home.trusted_host_cas()
    if not pin and not trusted:
        raise NotLoggedIn(
            "no host CA is trusted yet: log in first, or give the one `dtadmin ca export "
            "--type host` prints with --ca-pin"
        )
    host, port = split_hostport(proxy)
    trust = HostTrust(trusted=trusted, pin=pin, confirm=None)
    key = asyncio.run(verified_host_key(host, port, user, trust))
    line = key.export_public_key("openssh").decode().strip()
    fp = fingerprint(load_public_key(line.encode()))
    if fmt is Format.json:
        console.print_json(
            {
                "bastion": f"{host}:{port}",
                "fingerprint": fp,
                "public_key": line,
                "type": key.algorithm.decode(),
            }
        )
        return
    console.say(f"# host key of the bastion at {host}:{port}, checked through its host CA")
    console.say(fp)
    console.say(line)
