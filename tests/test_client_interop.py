"""SSH clients beyond OpenSSH, through the bastion as jump host to a real sshd node.

PuTTY 0.78 (Debian ``putty-tools``): plink with its native "SSH to proxy" (a saved
session whose proxy is another saved session: the bastion) and with
``-proxycmd "plink ... -nc %host:%port"``, logging in with an OpenSSH user certificate
attached to the key by ``puttygen --certificate`` and trusting both hosts' certificates
through the host CA in ``~/.putty/sshhostcas`` (no host-key prompt: ``-batch`` would
abort on one). paramiko, which cannot verify host certificates: key + certificate, the
bastion's plain host key checked against ``dtadmin ca host-key``, a ``direct-tcpip``
channel to the node and a command run there. Ed25519, RSA and ECDSA user keys each.
docs/windows-putty.md is the recipe these follow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.authz.records import Node, User
from bastion.ca.certs import load_public_key
from bastion.cluster import init_cluster
from tests.sshd import LOGIN, bastion_server, sshd_node

pytestmark = pytest.mark.integration

VENV_BIN = Path(sys.executable).parent
KEY_TYPES = {"ed25519": [], "rsa": ["-b", "2048"], "ecdsa": ["-b", "256"]}


class Env:
    def __init__(self, tmp: Path, cluster, node, bastion) -> None:  # type: ignore[no-untyped-def]
        self.tmp, self.cluster, self.node, self.bastion = tmp, cluster, node, bastion
        self.users: dict[str, tuple[Path, Path]] = {}

    def user(self, key_type: str) -> tuple[Path, Path]:
        """alice's key and certificate of ``key_type``, made once per module."""
        if key_type not in self.users:
            d = self.tmp / f"alice-{key_type}"
            d.mkdir()
            key = d / "id"
            subprocess.run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    key_type,
                    *KEY_TYPES[key_type],
                    "-N",
                    "",
                    "-f",
                    str(key),
                ],
                check=True,
            )
            issued = self.cluster.ca.sign_user(
                "alice", load_public_key((d / "id.pub").read_bytes())
            )
            (d / "id-cert.pub").write_text(issued.openssh + "\n")
            self.users[key_type] = (key, d / "id-cert.pub")
        return self.users[key_type]

    def dtadmin(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(VENV_BIN / "dtadmin"), "--state", str(self.cluster.state_dir), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interop")
    cluster = init_cluster(tmp / "state", "interop")
    cluster.store.add_user(User("alice", ("access",), (LOGIN,)))
    with sshd_node(tmp / "node", cluster) as node, bastion_server(tmp / "state") as bastion:
        cluster.store.add_node(Node("node-1", "127.0.0.1", node.port, {"env": "test"}))
        yield Env(tmp, cluster, node, bastion)
    cluster.close()


# -- PuTTY --------------------------------------------------------------------------------------


def _need_putty() -> None:
    if shutil.which("plink") is None or shutil.which("puttygen") is None:
        pytest.skip("PuTTY is not installed (run scripts/setup.sh: putty-tools)")


def putty_home(
    env: Env, name: str, *, trust_ca: bool = True, valid_hosts: str = "127.0.0.1 || node-*"
) -> Path:
    """A HOME whose ~/.putty trusts the cluster's host CA, as docs/windows-putty.md says."""
    home = env.tmp / f"home-{name}"
    (home / ".putty" / "sessions").mkdir(parents=True)
    (home / ".putty" / "sshhostcas").mkdir()
    if trust_ca:
        blob = (env.cluster.state_dir / "ca" / "host_ca.pub").read_text().split()[1]
        # Valid hosts as docs/windows-putty.md writes them: the bastion's name and the
        # nodes' inventory names, not every host.
        (home / ".putty" / "sshhostcas" / "dt-interop").write_text(
            f"PublicKey={blob}\nValidity={valid_hosts}\n"
            "PermitRSASHA1=0\nPermitRSASHA256=1\nPermitRSASHA512=1\n"
        )
    return home


def ppk(env: Env, key_type: str) -> Path:
    """The key with its certificate inside, in PuTTY's format (`puttygen --certificate`)."""
    key, cert = env.user(key_type)
    out = key.with_name("id-cert.ppk")
    if not out.exists():
        subprocess.run(
            ["puttygen", str(key), "--certificate", str(cert), "-o", str(out)],
            check=True,
            capture_output=True,
            timeout=60,
        )
    return out


def plink(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["plink", "-batch", "-no-antispoof", *args],
        env={**os.environ, "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def write_session(home: Path, name: str, **settings: object) -> None:
    lines = "".join(f"{key}={value}\n" for key, value in settings.items())
    (home / ".putty" / "sessions" / name).write_text(lines)


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_plink_native_ssh_proxy_through_the_bastion(env, key_type):
    """PuTTY's own "SSH to proxy and use port forwarding" (ProxyMethod 6): the proxy
    host is the saved session "dt-bastion", so that hop logs in as dt with the same key;
    the node is asked for by its inventory name, as with `ssh -J`."""
    _need_putty()
    home = putty_home(env, f"native-{key_type}")
    key = ppk(env, key_type)
    common = {"Protocol": "ssh", "PublicKeyFile": key, "AuthKI": 0}
    write_session(
        home,
        "dt-bastion",
        HostName="127.0.0.1",
        PortNumber=env.bastion.port,
        UserName="dt",
        **common,
    )
    write_session(
        home,
        "node-1",
        HostName="node-1",
        PortNumber=22,
        UserName=LOGIN,
        ProxyMethod=6,
        ProxyHost="dt-bastion",
        ProxyPort=22,
        **common,
    )
    result = plink(home, "-load", "node-1", "echo", f"native-{key_type}")
    assert result.returncode == 0 and result.stdout.strip() == f"native-{key_type}", result.stderr
    assert "host key is not cached" not in result.stderr.lower()


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_plink_proxycmd_nc_through_the_bastion(env, key_type):
    """``-proxycmd "plink ... -nc %host:%port"``: the older recipe, a second plink as
    the jump; both hosts' certificates are checked through sshhostcas."""
    _need_putty()
    home = putty_home(env, f"nc-{key_type}")
    key = ppk(env, key_type)
    jump = f"plink -batch -i {key} -P {env.bastion.port} -l dt -nc %host:%port 127.0.0.1"
    result = plink(
        home, "-i", str(key), "-proxycmd", jump, f"{LOGIN}@node-1", "echo", f"nc-{key_type}"
    )
    assert result.returncode == 0 and result.stdout.strip() == f"nc-{key_type}", result.stderr


@pytest.mark.parametrize(
    "case", ["no CA", "CA for other hosts"], ids=["no-ca", "ca-for-other-hosts"]
)
def test_plink_without_the_host_ca_stops_at_the_unknown_host_key(env, case):
    """What sshhostcas buys: without it, or with the CA trusted only for other host
    names, -batch refuses the bastion's unknown key."""
    _need_putty()
    home = putty_home(
        env, case.replace(" ", "-"), trust_ca=case != "no CA", valid_hosts="*.example.org"
    )
    result = plink(
        home, "-i", str(ppk(env, "ed25519")), "-P", str(env.bastion.port), "dt@127.0.0.1", "-N"
    )
    assert result.returncode != 0
    assert "host key is not cached" in result.stderr.lower(), result.stderr


# -- paramiko -----------------------------------------------------------------------------------


def _paramiko():  # type: ignore[no-untyped-def]
    return pytest.importorskip(
        "paramiko", reason="paramiko is not installed (pip install -e '.[test]')"
    )


def _host_keys(paramiko, name: str, line: str):  # type: ignore[no-untyped-def]
    keys = paramiko.HostKeys()
    key_type, blob = line.split()[:2]
    keys.add(
        name,
        key_type,
        paramiko.PKey.from_type_string(key_type, __import__("base64").b64decode(blob)),
    )
    return keys


def _client(paramiko, keys):  # type: ignore[no-untyped-def]
    client = paramiko.SSHClient()
    for host, entry in keys.items():
        for key_type, key in entry.items():
            client.get_host_keys().add(host, key_type, key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return client


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_paramiko_jumps_with_a_certificate(env, key_type):
    """paramiko logs in to the bastion as dt with key + certificate, the bastion's
    plain host key known from `dtadmin ca host-key`, opens direct-tcpip to node-1 and
    runs a command there (the node's key checked too)."""
    paramiko = _paramiko()
    key_path, cert_path = env.user(key_type)
    printed = json.loads(env.dtadmin("ca", "host-key", "--format", "json").stdout)
    node_line = (env.node.dir / "ssh_host_ed25519_key.pub").read_text()
    pkey = paramiko.PKey.from_path(key_path)
    pkey.load_certificate(str(cert_path))

    bastion = _client(
        paramiko, _host_keys(paramiko, f"[127.0.0.1]:{env.bastion.port}", printed["public_key"])
    )
    node = _client(paramiko, _host_keys(paramiko, "node-1", node_line))
    try:
        bastion.connect(
            "127.0.0.1",
            env.bastion.port,
            username="dt",
            pkey=pkey,
            look_for_keys=False,
            allow_agent=False,
            timeout=15,
        )
        transport = bastion.get_transport()
        assert transport.get_remote_server_key().fingerprint == printed["fingerprint"]
        channel = transport.open_channel("direct-tcpip", ("node-1", 22), ("127.0.0.1", 0))
        node.connect(
            "node-1",
            22,
            username=LOGIN,
            pkey=pkey,
            sock=channel,
            look_for_keys=False,
            allow_agent=False,
            timeout=15,
        )
        _, stdout, _ = node.exec_command(f"echo paramiko-{key_type}", timeout=15)
        assert stdout.read().decode().strip() == f"paramiko-{key_type}"
        assert stdout.channel.recv_exit_status() == 0
    finally:
        node.close()
        bastion.close()


# -- the plain host-key fingerprint -------------------------------------------------------------


def _dtclient(env: Env, home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "dtclient"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DT_HOME": str(home)},
        stdin=subprocess.DEVNULL,
    )


def test_host_key_fingerprint_is_the_key_clients_see(env):
    """`dtadmin ca host-key` and `dtclient host-key` print what `ssh-keygen -lf` says of
    the bastion's key file and what paramiko (no host certificates) is shown; dtclient
    prints it only after checking the bastion's certificate against the pinned CA."""
    paramiko = _paramiko()
    pub = env.cluster.bastion_host_key_path().with_suffix(".pub")
    keygen = subprocess.run(
        ["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True
    ).stdout.split()
    expected_fp, expected_blob = keygen[1], pub.read_text().split()[1]

    text = env.dtadmin("ca", "host-key")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith("# host key of the bastion of cluster interop")
    assert lines[1] == expected_fp and lines[2].split()[:2] == ["ssh-ed25519", expected_blob]
    as_json = json.loads(env.dtadmin("ca", "host-key", "--format", "json").stdout)
    assert as_json["fingerprint"] == expected_fp and as_json["type"] == "ssh-ed25519"
    assert as_json["public_key"].split()[1] == expected_blob

    with paramiko.Transport(("127.0.0.1", env.bastion.port)) as transport:
        transport.start_client(timeout=15)
        assert transport.get_remote_server_key().fingerprint == expected_fp

    pin = json.loads(env.dtadmin("ca", "export", "--type", "host", "--format", "json").stdout)
    proxy = f"127.0.0.1:{env.bastion.port}"
    home = env.tmp / "dt-home"
    user = _dtclient(env, home, "host-key", "--proxy", proxy, "--ca-pin", pin["fingerprint"])
    assert user.returncode == 0, user.stderr
    assert user.stdout.splitlines()[1:] == [expected_fp, f"ssh-ed25519 {expected_blob}"]
    user_json = json.loads(
        _dtclient(
            env,
            home,
            "host-key",
            "--proxy",
            proxy,
            "--ca-pin",
            pin["fingerprint"],
            "--format",
            "json",
        ).stdout
    )
    assert user_json["fingerprint"] == expected_fp and user_json["bastion"] == proxy


def test_dtclient_host_key_refuses_a_bastion_it_cannot_verify(env):
    """A wrong pin (a man in the middle's CA) or nothing trusted: no fingerprint at all."""
    proxy = f"127.0.0.1:{env.bastion.port}"
    home = env.tmp / "dt-home-refused"
    wrong = _dtclient(env, home, "host-key", "--proxy", proxy, "--ca-pin", "SHA256:" + "A" * 43)
    assert wrong.returncode != 0 and wrong.stdout == ""
    assert "not the pinned SHA256:AAAA" in wrong.stderr and "Traceback" not in wrong.stderr
    nothing = _dtclient(env, home, "host-key", "--proxy", proxy)
    assert nothing.returncode != 0 and nothing.stdout == ""
    assert "no host CA is trusted yet" in nothing.stderr


def test_dtclient_host_key_after_login_checks_through_the_ca_trusted_then(env):
    """The everyday form: after signup and login, `dtclient host-key` with no options
    reaches the bastion of the profile and checks it against the CA trusted at signup."""
    import re
    import time

    from bastion.credentials import totp_now
    from tests.tokens import printed_token

    password = "correct horse battery staple"
    token = printed_token(env.dtadmin("users", "add", "bob", "--roles", "access").stdout)
    pin = json.loads(env.dtadmin("ca", "export", "--type", "host", "--format", "json").stdout)
    proxy = f"127.0.0.1:{env.bastion.port}"
    home = env.tmp / "dt-home-bob"
    signup = subprocess.Popen(
        [str(VENV_BIN / "dtclient"), "signup", "--proxy", proxy, "--ca-pin", pin["fingerprint"]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DT_HOME": str(home)},
    )
    assert signup.stdin and signup.stdout
    signup.stdin.write(token + "\n")
    signup.stdin.flush()
    secret = next(m.group(1) for line in signup.stdout if (m := re.search(r"secret=(\w+)", line)))
    signup.stdin.write(f"{password}\n{password}\n{totp_now(secret)}\n")
    _, err = signup.communicate(timeout=60)
    assert signup.returncode == 0, err
    login = subprocess.run(
        [str(VENV_BIN / "dtclient"), "login", "--proxy", proxy, "--user", "bob"],
        input=f"{password}\n{totp_now(secret, time.time() + 30)}\n",
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DT_HOME": str(home)},
    )
    assert login.returncode == 0, login.stderr

    printed = _dtclient(env, home, "host-key")
    assert printed.returncode == 0, printed.stderr
    expected = json.loads(env.dtadmin("ca", "host-key", "--format", "json").stdout)
    assert printed.stdout.splitlines()[1] == expected["fingerprint"]
    assert printed.stdout.splitlines()[2] == " ".join(expected["public_key"].split()[:2])


def test_paramiko_refuses_a_bastion_key_other_than_the_printed_one(env):
    """The check the fingerprint is for: any other key for the bastion's address is
    refused before a credential is sent."""
    paramiko = _paramiko()
    key_path, cert_path = env.user("ed25519")
    other = (env.node.dir / "ssh_host_ed25519_key.pub").read_text()  # a real, wrong key
    pkey = paramiko.PKey.from_path(key_path)
    pkey.load_certificate(str(cert_path))
    client = _client(paramiko, _host_keys(paramiko, f"[127.0.0.1]:{env.bastion.port}", other))
    try:
        with pytest.raises(paramiko.BadHostKeyException):
            client.connect(
                "127.0.0.1",
                env.bastion.port,
                username="dt",
                pkey=pkey,
                look_for_keys=False,
                allow_agent=False,
                timeout=15,
            )
    finally:
        client.close()
