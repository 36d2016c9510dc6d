"""``dtclient``: what users run — signup, login, status, ls, ssh, config, logout, device.

Every prompt (password, code, host-CA trust) reads a line from standard input when it
is not a terminal, in the order asked, so scripts and tests can drive it. Every
failure ends in one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import getpass
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, overload

import typer

from bastion.protocol import console
from bastion.protocol.console import Format
from bastion.protocol.errors import (
    AccessDenied,
    AuthenticationFailed,
    ConnectionFailed,
    DTError,
    NotLoggedIn,
    PostureDenied,
    TPMError,
    UsageError,
)
from client import host_key
from client.profile import (
    DeviceState,
    Home,
    Profile,
    config_node_names,
    jump_alias,
    split_hostport,
    ssh_config,
    status_lines,
    status_view,
)

# What only a connection needs (asyncssh, cryptography, asyncio, the TPM binding) is
# imported where it is used, so --help, --version, status and config start quickly;
# tests/test_cli_conventions.py checks that `dtclient --version` loads none of it.
if TYPE_CHECKING:
    from bastion.protocol import wire
    from client.api import ApiSession, Credentials, HostTrust

app = console.cli_app(
    help="dt-bastion client: log in, see where you can go, and SSH there from a trusted device."
)
device_app = typer.Typer(
    help="Enroll this device and show what it reports.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(device_app, name="device")

ProxyOpt = Annotated[
    str, typer.Option("--proxy", help="The bastion, HOST:PORT (port 3022 if omitted).")
]
LoginProxyOpt = Annotated[
    str | None,
    typer.Option(
        "--proxy",
        help="The bastion, HOST:PORT (port 3022 if omitted); remembered in the cluster's "
        "profile, so later logins need neither --proxy nor --user.",
    ),
]
ClusterOpt = Annotated[
    str | None,
    typer.Option(
        "--cluster",
        envvar="DT_CLUSTER",
        help="Use this cluster's profile (default: the current one; see dtclient status).",
    ),
]
PinOpt = Annotated[
    str | None,
    typer.Option(
        "--ca-pin", help="Expected host CA fingerprint (SHA256:...), from `dtadmin ca export`."
    ),
]
TpmOpt = Annotated[
    str | None,
    typer.Option(
        "--tpm",
        help="TPM TCTI, e.g. swtpm:host=127.0.0.1,port=2321 or /dev/tpmrm0 (default: "
        "DT_TPM_TCTI, else the one saved at enrollment, else /dev/tpmrm0).",
    ),
]
FormatOpt = Annotated[Format, typer.Option("--format", help="Output format.")]
TokenFileOpt = Annotated[
    str | None,
    typer.Option(
        "--token-file",
        metavar="PATH",
        help="Read the token from this file, or from standard input with '-' "
        "(on a terminal: asked for, not shown). Safer than --token.",
    ),
]


# -- prompts ------------------------------------------------------------------------------


def ask(prompt: str, *, secret: bool = False) -> str:
    """Ask a person, or read the next line of stdin when it is not a terminal."""
    if sys.stdin.isatty():
        with console.prompting():
            return getpass.getpass(prompt) if secret else input(prompt)
    sys.stderr.write(prompt + "\n")
    sys.stderr.flush()
    line = sys.stdin.readline()
    if not line:
        raise UsageError(f"no answer on standard input for: {prompt.strip()}")
    return line.rstrip("\r\n")


ARGV_WARNING = (
    "warning: --token puts the token on the command line, where any local user can "
    "read it (ps, /proc/PID/cmdline) while dtclient runs; use --token-file PATH, "
    "--token-file - (standard input), or leave both out to be asked for it"
)


@overload
def read_token(
    value: str | None, path: str | None, prompt: str, *, required: Literal[True]
) -> str: ...
@overload
def read_token(
    value: str | None, path: str | None, prompt: str, *, required: bool
) -> str | None: ...
def read_token(value: str | None, path: str | None, prompt: str, *, required: bool) -> str | None:
    """A token from a file, standard input or a prompt; from argv only with a warning.

    With neither option, a ``required`` token is asked for (without echo); an optional
    one is None. ``--token-file -`` reads one line of standard input (the prompts that
    follow read the next lines), or asks when that is a terminal.
    """
    if value is not None and path is not None:
        raise UsageError("give --token or --token-file, not both")
    if value is not None:
        console.note(ARGV_WARNING)
        token = value.strip()
    elif path == "-" or (path is None and required):
        token = ask(prompt, secret=True).strip()
    elif path is not None:
        try:
            token = Path(path).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise UsageError(f"cannot read the token file {path}: {reason}") from None
    else:
        return None
    if not token:
        raise UsageError("the token is empty: paste the token your admin gave you")
    return token


def confirm_ca(fingerprint: str) -> bool:
    console.note(f"The bastion's host CA is {fingerprint}.")
    answer = ask("Trust this cluster's host CA? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def _trust(home: Home, pin: str | None) -> HostTrust:
    """An explicit pin is always checked, even against a CA trusted before."""
    from client.api import HostTrust, parse_pin

    pin = parse_pin(pin)
    trusted = () if pin else home.trusted_host_cas()
    return HostTrust(trusted=trusted, pin=pin, confirm=confirm_ca)


def _run(coro: Any) -> Any:
    import asyncio

    return asyncio.run(coro)


# -- signup ---------------------------------------------------------------------------------


@app.command()
def signup(
    proxy: ProxyOpt,
    token_file: TokenFileOpt = None,
    ca_pin: PinOpt = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            help="The token itself. Avoid: other local users can read a command line; "
            "without --token or --token-file you are asked for it.",
        ),
    ] = None,
) -> None:
    """Set your password and one-time-code app, with the token from `dtadmin users add`.

    dtclient asks for the token (it is not shown as you type), or reads it from
    --token-file. Example: dtclient signup --proxy bastion.example.com:3022
    """
    home = _choose_profile(Home.open(), proxy, None)
    host, port = split_hostport(proxy)
    secret = read_token(token, token_file, "Signup token (not shown as you type): ", required=True)
    _run(_signup(home, host, port, secret, _trust(home, ca_pin)))


async def _signup(home: Home, host: str, port: int, token: str, trust: HostTrust) -> None:
    from bastion.protocol import wire
    from bastion.protocol.errors import AuthenticationFailed
    from bastion.protocol.tokens import check_token_format
    from client.api import Credentials, open_session

    check_token_format(token)
    with console.spinner(f"Connecting to {host}:{port}"):
        session = await open_session(
            host, port, Credentials("-dt-signup", signup_token=token), trust
        )
    try:
        info = await session.call(wire.SignupBegin(token=token), wire.SignupInfo)
        console.say(f"Signing up as {info.user}.")
        _show_totp(info.totp_uri)
        password = _new_password(info.min_password_length)
        for attempt in range(3):  # a mistyped code is asked again; the QR code stands
            code = ask("One-time code from your app, to confirm: ")
            try:
                await session.call(
                    wire.SignupFinish(token=token, password=password, totp_code=code.strip()),
                    wire.Ok,
                )
                break
            except AuthenticationFailed as exc:
                if attempt == 2:
                    raise
                console.note(f"{exc.message}; type the code your app shows now")
    finally:
        await session.close()
    cluster = session.welcome.cluster
    home.select(cluster)
    home.trust_host_cas(tuple(trust.accepted) or trust.trusted, cluster)
    home.save_profile(
        Profile(
            proxy=f"{host}:{port}",
            user=info.user,
            cluster=cluster,
            host_ca_keys=tuple(trust.accepted) or trust.trusted,
            ca_pin=trust.pin or "",
        )
    )
    console.say(
        f"Signed up. Now run: dtclient login (remembered: --proxy {host}:{port} "
        f"--user {info.user}, cluster {cluster})"
    )


def _new_password(minimum: int) -> str:
    """A new password, refused here when shorter than the bastion's rule (which it
    told us up front, and still enforces), before any code is asked."""
    for _ in range(3):
        password = ask(f"New password (at least {minimum} characters): ", secret=True)
        if len(password) < minimum:
            console.note(f"too short: {len(password)} characters, at least {minimum} needed")
            continue
        if password != ask("Repeat the password: ", secret=True):
            console.note("the two passwords differ; type them again")
            continue
        return password
    raise UsageError(f"no acceptable password given (at least {minimum} characters, typed twice)")


def _show_totp(uri: str) -> None:
    console.say("Add this account to your authenticator app (scan the code or use the URI):")
    console.say(uri)
    try:
        import qrcode

        qr = qrcode.QRCode(border=1)
        qr.add_data(uri)
        if sys.stdout.isatty():
            qr.print_ascii(invert=True)
    except Exception:  # nosec B110  # a QR code is a convenience; the URI above is enough
        pass


# -- login --------------------------------------------------------------------------------------


@app.command()
def login(
    proxy: LoginProxyOpt = None,
    user: Annotated[
        str | None,
        typer.Option("--user", help="Your dt-bastion user name (remembered in the profile)."),
    ] = None,
    cluster: ClusterOpt = None,
    ca_pin: PinOpt = None,
    ttl: Annotated[
        str | None,
        typer.Option("--ttl", help="Certificate lifetime, e.g. 1h (capped by your roles)."),
    ] = None,
    tpm: TpmOpt = None,
    password: Annotated[
        bool,
        typer.Option(
            "--password", help="Ask for password and code even if a certificate is valid."
        ),
    ] = False,
    bot_token: Annotated[
        str | None,
        typer.Option(
            "--bot-token",
            metavar="PATH",
            help="Log in as a bot with the token in this file ('-': standard input), "
            "from `dtadmin bots token` (CI jobs; no password, code or device).",
        ),
    ] = None,
) -> None:
    """Log in with password and one-time code; get a fresh key and certificate.

    The first time, give --proxy and --user; they are kept in the cluster's profile
    (~/.dt/clusters/NAME), so afterwards a plain `dtclient login` does. Several
    clusters live side by side: choose one with --cluster NAME or DT_CLUSTER (the
    last one logged in to is current). The bastion's host CA is checked (--ca-pin,
    or a prompt the first time) before the password and code are asked.

    If this device is enrolled, the certificate also carries the device extensions
    (your TPM answers a fresh challenge). While your certificate is still valid,
    login renews through it instead (never beyond its expiry), e.g. right after
    `dtclient device enroll`; if the bastion refuses it, you are asked for password
    and code. Example: dtclient login --proxy bastion.example.com:3022 --user alice
    """
    from bastion.protocol.durations import parse_duration

    home = _choose_profile(Home.open(cluster=cluster), proxy, cluster)
    saved_proxy, saved_user = _saved(home, "proxy"), _saved(home, "user")
    if proxy is None and saved_proxy is None:
        raise UsageError(
            "no profile to log in with: give --proxy HOST:PORT and --user NAME "
            "(after that, dtclient login remembers them)"
        )
    host, port = split_hostport(proxy or saved_proxy or "")
    user = user or (saved_user if saved_proxy == f"{host}:{port}" else None)
    if not user:
        raise UsageError(f"give --user NAME: no profile for {host}:{port} names one")
    from client.api import Credentials

    ttl_seconds = parse_duration(ttl) if ttl else None
    if bot_token is not None:
        from client.bot import bot_credentials, refused

        creds = bot_credentials(read_token(None, bot_token, "Bot token: ", required=True), user)
        try:
            profile = _run(_login(home, host, port, creds, _trust(home, ca_pin), ttl_seconds, None))
        except AuthenticationFailed as exc:
            raise AuthenticationFailed(refused(exc.message)) from None
        _print_status(home, profile)
        return
    renewal = None if password or ca_pin else _renewal(home, f"{host}:{port}", user)
    fresh = Credentials(user, ask=lambda: _ask_secrets(user))
    if renewal is not None:
        creds, trust = renewal
        console.note("Renewing with your current certificate (use --password to log in afresh).")
        try:
            profile = _run(_login(home, host, port, creds, trust, ttl_seconds, tpm))
        except (AuthenticationFailed, AccessDenied) as exc:
            if isinstance(exc, PostureDenied):
                raise  # the device's boot, not the certificate: a password changes nothing
            console.note(f"renewal refused: {exc.message}")
            console.note("Log in with your password and one-time code instead.")
            profile = _run(_login(home, host, port, fresh, _trust(home, None), ttl_seconds, tpm))
    else:
        profile = _run(_login(home, host, port, fresh, _trust(home, ca_pin), ttl_seconds, tpm))
    _print_status(home, profile)


def _choose_profile(home: Home, proxy: str | None, cluster: str | None) -> Home:
    """The profile of the bastion at ``--proxy``: the one that names it, else a new one
    (its cluster learned at login); without ``--proxy``, the chosen or current one."""
    if proxy is not None and cluster is None and "DT_CLUSTER" not in os.environ:
        host, port = split_hostport(proxy)
        known = home.find_proxy(f"{host}:{port}")
        if known is not None:
            home.select(known)
        elif home.cluster is not None and _saved(home, "proxy") != f"{host}:{port}":
            home.cluster = None  # a bastion not seen before: a new profile
    return home


def _saved(home: Home, field: str) -> str | None:
    try:
        value = getattr(home.load_profile(), field)
    except DTError:
        return None
    return str(value) if value else None


def _ask_secrets(user: str) -> tuple[str, str]:
    """Asked when the bastion's prompt arrives: after its host CA was accepted."""
    secret = ask(f"Password for {user}: ", secret=True)
    code = ask("One-time code: ")
    return secret, code.strip()


def _renewal(home: Home, proxy: str, user: str) -> tuple[Credentials, HostTrust] | None:
    """Credentials from a certificate still valid for a minute, for the same bastion and user."""
    from client.api import Credentials, HostTrust
    from client.sshlib import asyncssh

    try:
        profile = home.load_profile()
        cert = home.load_cert()
        if profile.proxy != proxy or profile.user != user or not cert.valid_at(time.time() + 60):
            return None
        key = asyncssh.read_private_key(str(home.key_path))
        certificate = asyncssh.read_certificate(str(home.cert_path))
    except (DTError, OSError, ValueError, asyncssh.Error):
        return None
    creds = Credentials("dt", client_key=key, certificate=certificate)
    return creds, HostTrust(trusted=profile.host_ca_keys)


async def _login(
    home: Home,
    host: str,
    port: int,
    creds: Credentials,
    trust: HostTrust,
    ttl: int | None,
    tcti: str | None,
) -> Profile:
    from client import agent
    from client.api import open_session
    from client.sshlib import asyncssh

    with console.spinner(f"Logging in to {host}:{port}"):
        session = await open_session(host, port, creds, trust)
    try:
        cluster = session.welcome.cluster
        user = session.welcome.user or creds.user
        if home.cluster is None or _saved(home, "cluster") not in (None, cluster):
            home.select(cluster)
        if creds.bot_token is not None:
            from client.bot import check_bot_name

            check_bot_name(creds, session.welcome.user)
        key = asyncssh.generate_private_key("ssh-ed25519", comment=agent.key_comment(cluster, user))
        public_line = key.export_public_key("openssh").decode().strip()
        issued = await _request_cert(session, home, cluster, public_line, ttl, tcti)
    finally:
        await session.close()
    host_cas = tuple(issued.host_ca_keys)
    profile = Profile(
        proxy=f"{host}:{port}",
        user=user,
        cluster=cluster,
        roles=tuple(issued.roles),
        logins=tuple(issued.logins),
        host_ca_keys=host_cas,
        ca_pin=trust.pin or home_pin(home),
        device_warning=issued.device_warning,
    )
    previous = agent.public_blobs(home.public_key_path, home.cert_path)
    home.save_credentials(key.export_private_key("openssh"), public_line, issued.certificate)
    home.save_profile(profile)
    home.trust_host_cas(host_cas, cluster)
    await agent.replace(cluster, previous, home.key_path, home.cert_path)
    if issued.device_warning:
        console.note(issued.device_warning)
    _attestation_agent(home, issued, tcti)
    return profile


def _attestation_agent(home: Home, issued: wire.CertIssued, tcti: str | None) -> None:
    """Where a role asks this device to keep attesting, a fresh agent (with the new
    certificate) answers for it; otherwise none runs."""
    from client import attest_agent

    interval = issued.attest_interval
    if not interval or not _has_device(home.load_cert()):
        if attest_agent.stop(home):
            console.note("Stopped the attestation agent: no role asks this device for it now.")
        return
    log = attest_agent.log_path(home)
    pid = attest_agent.start(home, tcti)
    if pid is None:
        console.note(
            f"warning: the attestation agent did not start (see {log}); your roles ask this "
            f"device for a quote every {interval} s, so its sessions end soon: run dtclient agent"
        )
        return
    console.note(
        f"Continuous attestation: a quote every {interval} s; agent started (pid {pid}, log {log})."
    )


def home_pin(home: Home) -> str:
    try:
        return home.load_profile().ca_pin
    except DTError:
        return ""


async def _request_cert(
    session: ApiSession,
    home: Home,
    cluster: str,
    public_line: str,
    ttl: int | None,
    tcti: str | None,
) -> Any:
    from bastion.protocol import wire

    device = home.load_device()
    if device is not None and device.cluster != cluster:
        device = None  # enrolled with another cluster: no use here
    await session.send(
        wire.CertRequest(public_key=public_line, device=device is not None, ttl_seconds=ttl)
    )
    if device is None:
        return await session.receive(wire.CertIssued)
    answer = await session.receive((wire.DeviceChallenge, wire.CertIssued))
    if isinstance(answer, wire.CertIssued):
        return answer  # device trust is off for this cluster: no ceremony
    chosen = tcti or os.environ.get("DT_TPM_TCTI") or device.tpm or None
    try:
        with console.spinner("Asking this device's TPM to prove it is here"):
            response = _device_response(device, chosen, answer, public_line, home)
    except TPMError as exc:
        return await _without_tpm(session, home, exc)
    return await session.call(response, wire.CertIssued)


async def _without_tpm(session: ApiSession, home: Home, exc: TPMError) -> Any:
    """The enrolled device's TPM did not answer (busy, restarting, unplugged).

    A certificate that still carries this device is kept: nothing new is saved and
    login fails saying why. Without one, a plain certificate is taken, saying the
    device stays enrolled (never "enroll this device")."""
    from bastion.protocol import wire

    try:
        current = home.load_cert()
    except DTError:
        current = None
    now = time.time()
    if current is not None and current.valid_at(now + 60) and _has_device(current):
        until = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(current.valid_before))
        raise TPMError(
            f"this device's TPM could not be reached: {exc.message}. Kept your current "
            f"certificate with the device extensions (valid until {until}); log in again "
            "once the TPM answers (DT_TPM_TCTI or --tpm choose another TCTI)"
        )
    await session.send(wire.Error(code=exc.code, message=exc.message))
    import dataclasses

    issued = await session.receive(wire.CertIssued)
    return dataclasses.replace(
        issued,
        device_warning=f"this device's TPM could not be reached: {exc.message}; this "
        "certificate carries no device extensions. The device stays enrolled: log in "
        "again once the TPM answers",
    )


def _has_device(cert: Any) -> bool:
    from bastion.protocol.certs import DEVICE_EXTENSIONS

    return all(name in cert.extensions for name in DEVICE_EXTENSIONS)


def _device_response(
    device: DeviceState,
    tcti: str | None,
    challenge: wire.DeviceChallenge,
    public_line: str,
    home: Home,
) -> wire.DeviceResponse:
    from client import ceremony
    from client.tpm import TPM

    with TPM.open(tcti) as tpm:
        return ceremony.answer_challenge(tpm, home.tpm_dir, challenge, public_line, device)


# -- status, ls, config, ssh, logout -----------------------------------------------------------


def _print_status(home: Home, profile: Profile) -> None:
    view = status_view(profile, home.load_cert())
    for line in status_lines(view):
        console.say(line)


@app.command()
def status(cluster: ClusterOpt = None, fmt: FormatOpt = Format.text) -> None:
    """Show who you are logged in as, your roles and logins, and the certificate's validity.

    With profiles of several clusters, each is listed after the current one (marked *);
    JSON output has them under "profiles".
    """
    home = Home.open(cluster=cluster)
    others = _profile_rows(home)
    try:
        profile = home.load_profile()
        view = status_view(profile, home.load_cert())
    except NotLoggedIn:
        if fmt is Format.text and others:
            _print_profiles(others)
        raise
    from client import attest_agent

    agent_view = attest_agent.read_state(home)
    if fmt is Format.json:
        console.print_json({**view, "attest_agent": agent_view, "profiles": others})
    else:
        for line in status_lines(view):
            console.say(line)
        if agent_view["running"] or agent_view.get("last"):
            console.say(f"  {'Attestation:':<13} agent {attest_agent.describe(agent_view)}")
        if len(others) > 1:
            console.say("")
            _print_profiles(others)
    if view["expired"]:
        raise typer.Exit(1)


def _profile_rows(home: Home) -> list[dict[str, Any]]:
    now = time.time()
    rows = []
    for name, profile, cert in home.profiles():
        rows.append(
            {
                "cluster": profile.cluster if profile else name,
                "folder": name,
                "current": name == home.cluster,
                "proxy": profile.proxy if profile else None,
                "user": profile.user if profile else None,
                "logged_in": cert is not None and cert.valid_at(now),
                "valid_until": console.rfc3339(cert.valid_before) if cert else None,
            }
        )
    return rows


def _print_profiles(rows: list[dict[str, Any]]) -> None:
    console.say("Profiles (* current; choose with --cluster NAME or DT_CLUSTER):")
    for row in rows:
        state = f"valid until {row['valid_until']}" if row["logged_in"] else "logged out"
        if row["valid_until"] and not row["logged_in"]:
            state = "expired"
        who = f"{row['user']}@{row['proxy']}" if row["proxy"] else "(no profile)"
        mark = "*" if row["current"] else " "
        console.say(f"{mark} {row['folder']:<20} {who:<40} {state}")


@app.command(name="ls")
def list_nodes(
    labels: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[KEY=VALUE]...",
            help="Only nodes with these labels (all of them), e.g. env=prod role=db.",
            show_default=False,
        ),
    ] = None,
    fmt: FormatOpt = Format.text,
) -> None:
    """List the nodes you may reach through the bastion, optionally only those with labels.

    Example: dtclient ls env=prod role=db --format json
    """
    from bastion.protocol.labels import matches, parse_filters

    wanted = parse_filters(labels or [])
    home = Home.open()
    profile = home.load_profile()
    nodes = [n for n in _run(_with_cert_session(home, profile, _ls)) if matches(n, wanted)]
    if fmt is Format.json:
        console.print_json(nodes)
        return
    rows = [
        (
            n["name"],
            f"{n['addr']}:{n['port']}",
            ",".join(f"{k}={v}" for k, v in sorted(n["labels"].items())),
        )
        for n in nodes
    ]
    empty = "(no nodes you may reach)"
    if wanted:
        empty = "(no nodes you may reach with " + " ".join(labels or []) + ")"
    console.print_table(["Node", "Address", "Labels"], rows, empty=empty)


async def _ls(session: ApiSession) -> list[dict[str, Any]]:
    from bastion.protocol import wire

    return list((await session.call(wire.ListNodes(), wire.Nodes)).nodes)


async def _with_cert_session(home: Home, profile: Profile, action: Any) -> Any:
    from client.api import Credentials, HostTrust, open_session
    from client.sshlib import asyncssh

    cert = home.load_cert()
    if not cert.valid_at(time.time()):
        raise NotLoggedIn("your certificate has expired (run: dtclient login)")
    key = asyncssh.read_private_key(str(home.key_path))
    certificate = asyncssh.read_certificate(str(home.cert_path))
    trust = HostTrust(trusted=profile.host_ca_keys)
    with console.spinner(f"Asking {profile.proxy}"):
        session = await open_session(
            profile.host,
            profile.port,
            Credentials("dt", client_key=key, certificate=certificate),
            trust,
        )
        try:
            return await action(session)
        finally:
            await session.close()


@app.command()
def config() -> None:
    """Print an ssh_config block for this cluster's jump host and nodes, and nothing else.

    The jump host is dt-CLUSTER; each node you may reach is NAME and NAME.CLUSTER, both
    through the bastion with your dt key and certificate. No other host is matched, so
    git@github.com and the rest of ~/.ssh/config keep working as before. The node names
    come from the bastion (as in `dtclient ls`): run it again when nodes are added.
    Example: dtclient config >> ~/.ssh/config; ssh root@node-1
    """
    home = Home.open()
    profile = home.load_profile()
    try:
        nodes = [n["name"] for n in _run(_with_cert_session(home, profile, _ls))]
    except DTError as exc:
        console.note(
            f"warning: cannot list the nodes ({exc.message}); the block names only the "
            f"jump host: ssh -J {jump_alias(profile.cluster)} LOGIN@NODE"
        )
        nodes = []
    _, skipped = config_node_names(nodes)
    if skipped:
        console.note(f"left out (not usable as an ssh_config Host name): {', '.join(skipped)}")
    console.say(ssh_config(profile, home, nodes))


@app.command(
    options_metavar="",
    context_settings={
        "ignore_unknown_options": True,
        "allow_interspersed_args": False,
        "help_option_names": [],
    },
)
def ssh(
    ctx: typer.Context,
    args: Annotated[
        list[str],
        typer.Argument(
            metavar="[SSH OPTIONS] [LOGIN@]NODE [COMMAND]",
            help="Anything the system ssh takes; NODE is a name from `dtclient ls` "
            "(or NODE.CLUSTER).",
            show_default=False,
        ),
    ],
) -> None:
    """Run the system ssh to NODE through the bastion; the remote exit code comes back.

    ssh's own options pass through as typed (-v, -p PORT, -L ..., -o ...); put `--`
    first if one could be read as dtclient's. Without LOGIN@ (or -l), your first
    login is used. Example: dtclient ssh -v root@node-1 uptime
    """
    from client import ssh_args

    argv = list(args)
    if argv in (["-h"], ["--help"]):
        console.say(ctx.get_help())
        raise typer.Exit(0)
    command = ssh_args.parse(argv)
    home = Home.open()
    profile = home.load_profile()
    if shutil.which("ssh") is None:
        raise UsageError("the OpenSSH client (ssh) is not installed")
    node = command.host.removesuffix("." + jump_alias(profile.cluster)[3:])
    config_path = home.root / "ssh_config"
    from bastion.protocol.files import atomic_write

    atomic_write(config_path, ssh_config(profile, home, [node]).encode(), 0o600)
    extra: list[str] = []
    if command.login is None:
        if not profile.logins:
            raise UsageError("your roles grant no logins; ask an admin")
        extra = ["-l", profile.logins[0]]
    import subprocess  # nosec B404  # runs the system ssh, argv as a list

    ssh_argv = ["ssh", "-F", str(config_path), *extra, *argv]
    # The user's own ssh with their own arguments, as if typed; no shell.
    rc = subprocess.call(ssh_argv)  # nosec B603
    raise typer.Exit(rc)


app.command("host-key")(host_key.host_key)


@app.command(name="agent")
def attest_agent_command(cluster: ClusterOpt = None, tpm: TpmOpt = None) -> None:
    """Answer the bastion's continuous-attestation challenges with this device's TPM.

    Where your roles ask a device to keep attesting during its sessions, `dtclient
    login` starts this in the background and `dtclient logout` stops it; its log is
    agent.log in the cluster's profile folder, and `dtclient status` shows it. Run it
    by hand (it stays in the foreground) only if it stopped: without its answers, the
    device's sessions end once the policy's grace is over.
    """
    from client import attest_agent

    raise typer.Exit(attest_agent.main(Home.open(cluster=cluster), tpm))


@app.command()
def logout(
    cluster: ClusterOpt = None,
    everything: Annotated[
        bool, typer.Option("--all", help="Log out of every cluster's profile.")
    ] = False,
) -> None:
    """Delete your key and certificate, and remove the cluster's keys from ssh-agent.

    The profile's address and user name stay, so `dtclient login` logs in again.
    """
    from client import agent, attest_agent

    home = Home.open(cluster=cluster)
    names = home.cluster_names() if everything else ([home.cluster] if home.cluster else [])
    removed_any = False
    for name in names:
        one = Home(home.root, name)
        stopped = attest_agent.stop(one)
        if stopped:
            console.say(f"Stopped the attestation agent (pid {stopped}).")
        known = agent.public_blobs(one.public_key_path, one.cert_path)
        if agent.agent_configured():
            _run(agent.remove(one.current_cluster() or name, known))
        if one.remove_credentials():
            removed_any = True
            console.say(f"Logged out of {one.current_cluster() or name}.")
    if not removed_any:
        console.say("Not logged in; nothing to remove.")


# -- device ---------------------------------------------------------------------------------------


@device_app.command("enroll")
def device_enroll(
    token_file: TokenFileOpt = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            help="The enrollment token itself. Avoid: other local users can read a "
            "command line; use --token-file (- to paste it at a prompt).",
        ),
    ] = None,
    current_device: Annotated[
        bool,
        typer.Option(
            "--current-device", help="Enroll this device yourself (editor or device-admin role)."
        ),
    ] = False,
    tpm: TpmOpt = None,
    asset_tag: Annotated[
        str | None,
        typer.Option("--asset-tag", help="Enroll under this asset tag instead of the serial."),
    ] = None,
) -> None:
    """Enroll this device: its TPM proves itself to the bastion.

    Log in first (dtclient login), enroll, then log in again so your certificate
    carries the device. With neither a token nor --current-device the bastion tries
    auto-enrollment (the device must match the admin's imported inventory).
    Example, pasting the token from `dtadmin device enroll-token` at the prompt:
    dtclient device enroll --token-file -
    """
    if (token is not None or token_file is not None) and current_device:
        raise UsageError("give a token or --current-device, not both")
    home = Home.open()
    token = read_token(token, token_file, "Enrollment token (not shown): ", required=False)
    profile = home.load_profile()
    device = _run(
        _with_cert_session(
            home, profile, lambda s: _enroll(s, home, tpm, token, current_device, asset_tag)
        )
    )
    home.save_device(
        DeviceState(
            asset_tag=device["asset_tag"],
            credential_id=device["credential_id"],
            cluster=profile.cluster,
            tpm=tpm or os.environ.get("DT_TPM_TCTI", ""),
        )
    )
    console.say(f'Device "{device["asset_tag"]}"/{device["os_type"]} registered and enrolled')
    console.note("Log in again (dtclient login) to get a certificate with the device extensions.")


async def _enroll(
    session: ApiSession,
    home: Home,
    tcti: str | None,
    token: str | None,
    current_device: bool,
    tag: str | None,
) -> dict[str, Any]:
    from client import ceremony
    from client.tpm import TPM

    with (
        TPM.open(tcti) as tpm,
        console.spinner("Enrolling: the TPM answers the bastion's challenge"),
    ):
        return await ceremony.enroll(
            session, tpm, home.tpm_dir, token=token, current_device=current_device, tag_override=tag
        )


@device_app.command("collect")
def device_collect(tpm: TpmOpt = None, fmt: FormatOpt = Format.text) -> None:
    """Show the data this device reports at enrollment."""
    from client.device import collect
    from client.tpm import TPM

    with TPM.open(tpm) as t:
        data = collect(t.endorsement().public_der)
    if fmt is Format.json:
        console.print_json(data)
    else:
        console.print_table(["Field", "Value"], sorted(data.items()))


@device_app.command("asset-tag")
def device_asset_tag(tpm: TpmOpt = None) -> None:
    """Print the asset tag this device enrolls under."""
    from client.device import asset_tag
    from client.tpm import TPM

    try:
        console.say(asset_tag(None))
        return
    except ValueError:
        pass
    with TPM.open(tpm) as t:
        console.say(asset_tag(t.endorsement().public_der))


def main() -> None:
    console.run_cli(app, "dtclient")


__all__ = ["app", "main", "ConnectionFailed"]
