"""The benchmark lab: one node, two jump hosts (dt-bastion and stock sshd), one key.

Both paths reach the same sshd node at 127.0.0.1 with the same user key and
certificate and the same ciphers, so the jump host is the only difference.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from bastion.authz.records import Device, DeviceCredential, Node, User
from bastion.ca.certs import load_public_key
from bastion.cluster import Cluster, init_cluster
from tests.sshd import (
    LOGIN,
    VENV_BIN,
    bastion_server,
    free_port,
    keygen,
    sshd_node,
    stop,
    wait_for_port,
)

CIPHER = "aes128-gcm@openssh.com"


class Lab(contextlib.ExitStack):
    def __init__(self, workdir: Path) -> None:
        super().__init__()
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        self.dir = workdir
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def __enter__(self) -> Lab:
        super().__enter__()
        d = self.dir
        self.cluster: Cluster = init_cluster(d / "state", "bench")
        self.callback(self.cluster.close)
        store = self.cluster.store
        store.add_user(User("bench", ("access",), (LOGIN,)))
        self.node = self.enter_context(
            sshd_node(d / "node", self.cluster, extra="MaxSessions 100\nMaxStartups 1000\n")
        )
        store.add_node(Node("node-1", "127.0.0.1", self.node.port))
        # One client process makes thousands of connections and certificates at once
        # on purpose: not the floods the limits bound.
        (d / "bastion.toml").write_text(
            "[bastion]\nmax_connections_per_source = 100000\nmax_auth_failures_per_source = 100000\n"
            "max_unauthenticated = 100000\nmax_unauthenticated_per_source = 100000\n"
            "max_certs_per_user_per_minute = 0\nmax_channels_per_connection = 100000\n"
        )
        self.bastion = self.enter_context(
            bastion_server(d / "state", extra_args=("--config", str(d / "bastion.toml")))
        )
        self.key = keygen(d / "id")
        issued = self.cluster.ca.sign_user(
            "bench", load_public_key((d / "id.pub").read_bytes()), ttl=12 * 3600
        )
        self.cert = d / "id-cert.pub"
        self.cert.write_text(issued.openssh + "\n")
        self.jump = self._stock_jump()
        self.dt_config = self._config("dt", self.bastion.port, "dt")
        self.ossh_config = self._config("openssh", self.jump, LOGIN)
        self.direct_config = self._config("direct", None, LOGIN)
        return self

    def start_workers_bastion(self, workers: int) -> None:
        """A second dt-bastion on the same state, with ``workers`` processes
        (``self.workers_bastion``, ``self.workers_config``); once per lab."""
        if getattr(self, "workers_bastion", None) is not None:
            return
        d = self.dir
        self.workers_bastion = self.enter_context(
            bastion_server(
                d / "state",
                extra_args=("--config", str(d / "bastion.toml"), "--workers", str(workers)),
            )
        )
        deadline = time.monotonic() + 30  # the port opens before every worker is up
        while f"{workers} workers serving on" not in self.workers_bastion.log():
            if time.monotonic() > deadline:
                raise RuntimeError(f"dt-bastion --workers {workers} never said it was ready")
            time.sleep(0.1)
        self.workers_config = self._config("dt-workers", self.workers_bastion.port, "dt")

    def _stock_jump(self) -> int:
        """A stock sshd used only as a jump host, accepting the same key."""
        d = self.dir / "jump"
        d.mkdir()
        keygen(d / "host_key")
        (d / "authorized_keys").write_text((self.dir / "id.pub").read_text())
        port = free_port()
        (d / "sshd_config").write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/pid\n"
            f"AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "AllowTcpForwarding yes\nPermitRootLogin prohibit-password\n"
            "MaxStartups 10000\nMaxSessions 100\nLogLevel ERROR\n"
        )
        proc = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-f", str(d / "sshd_config")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.callback(stop, proc)
        wait_for_port(port, proc)
        self.jump_proc = proc
        return port

    def _config(self, name: str, jump_port: int | None, jump_user: str) -> Path:
        """ssh_config for: client -> jump -> node (the node by its inventory address)."""
        known = self.dir / "known_hosts"
        host_ca = (self.cluster.state_dir / "ca" / "host_ca.pub").read_text().strip()
        known.write_text(f"@cert-authority * {host_ca}\n")
        common = (
            f"    IdentityFile {self.key}\n    CertificateFile {self.cert}\n"
            f"    IdentitiesOnly yes\n    UserKnownHostsFile {known}\n"
            f"    Ciphers {CIPHER}\n    BatchMode yes\n    LogLevel ERROR\n"
            "    ControlMaster no\n    ControlPath none\n"
        )
        text = ""
        if jump_port is not None:
            text += (
                f"Host jump\n    HostName 127.0.0.1\n    Port {jump_port}\n"
                f"    User {jump_user}\n    StrictHostKeyChecking no\n{common}\n"
            )
        text += (
            f"Host node\n    HostName 127.0.0.1\n    Port {self.node.port}\n    User {LOGIN}\n"
            f"    HostKeyAlias node-1\n    StrictHostKeyChecking yes\n{common}"
        )
        if jump_port is not None:
            text += "    ProxyJump jump\n"
        path = self.dir / f"ssh_config.{name}"
        path.write_text(text)
        return path

    def with_cipher(self, config: Path, cipher: str) -> Path:
        """The same ssh_config with ``cipher`` on both legs: ``ssh -c`` alone would set
        only the end-to-end leg to the node, which the jump host never decrypts."""
        path = config.with_name(f"{config.name}.{cipher.split('@')[0]}")
        path.write_text(config.read_text().replace(f"Ciphers {CIPHER}", f"Ciphers {cipher}"))
        return path

    def device_cert(self, tag: str) -> tuple[Path, Device]:
        """A user who needs a trusted device, with one enrolled (for revocation timing)."""
        store = self.cluster.store
        name = f"dev-{tag}"
        store.add_user(User(name, ("access", "require-trusted-device"), (LOGIN,)))
        device = store.add_device(
            Device(
                "",
                tag,
                "linux",
                "enrolled",
                name,
                DeviceCredential(f"cred-{tag}", b"\x30", "tpm_ekpub", "ab"),
            )
        )
        d = self.dir / name
        d.mkdir()
        keygen(d / "id")
        issued = self.cluster.ca.sign_user(
            name, load_public_key((d / "id.pub").read_bytes()), device=device
        )
        (d / "id-cert.pub").write_text(issued.openssh + "\n")
        config = (
            self.dt_config.read_text()
            .replace(str(self.key), str(d / "id"))
            .replace(str(self.cert), str(d / "id-cert.pub"))
        )
        (d / "ssh_config").write_text(config)
        return d / "ssh_config", device


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def tree_rss_kib(pid: int) -> int:
    """RSS of a process and all its descendants (sshd forks one per connection)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            total += rss_kib(p)
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            todo.extend(int(c) for c in children)
    return total


__all__ = ["Lab", "rss_kib", "tree_rss_kib", "CIPHER", "os"]


@contextlib.contextmanager
def enrolled_user(
    lab: Lab, name: str, asset_tag: str, boot_log: bytes | None = None
) -> Iterator[tuple[dict[str, str], str]]:
    """A signed-up, logged-in user whose device (a swtpm) is enrolled; (env, proxy).
    With ``boot_log`` the fresh swtpm's PCRs are that log's replay before enrollment,
    as firmware would have left them, and dtclient sends the log (DT_EVENT_LOG)."""
    from tests.swtpm import provision, run_swtpm, trust_test_tpms
    from tests.test_login import PASSWORD, next_code, signup
    from tests.tokens import printed_token

    home = lab.dir / f"{name}-home"
    env = {
        **os.environ,
        "DT_STATE": str(lab.cluster.state_dir),
        "DT_HOME": str(home),
        "SSH_AUTH_SOCK": "",
    }
    factory = provision(lab.dir / f"{name}-tpm-factory")
    trust_test_tpms(lab.cluster.store, factory)
    with run_swtpm(factory, lab.dir / f"{name}-tpm") as tpm:
        env["DT_TPM_TCTI"] = tpm.tcti
        if boot_log is not None:
            from tests.tpm_eventlog import replay_into_tpm

            replay_into_tpm(tpm.tcti, boot_log)
            log_file = lab.dir / f"{name}-boot.log"
            log_file.write_bytes(boot_log)
            env["DT_EVENT_LOG"] = str(log_file)
        out = subprocess.run(
            [VENV_BIN / "dtadmin", "users", "add", name, "--roles", "access,editor", "--logins", "root"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        proxy = f"127.0.0.1:{lab.bastion.port}"
        e = type("E", (), {"proxy": proxy, "cluster": lab.cluster, "tmp": lab.dir})
        secret = signup(e, home, printed_token(out))
        login = [VENV_BIN / "dtclient", "login", "--proxy", proxy, "--user", name]
        subprocess.run(
            login,
            input=f"{PASSWORD}\n{next_code(secret)}\n",
            env=env,
            text=True,
            capture_output=True,
            check=True,
        )
        subprocess.run(
            [VENV_BIN / "dtclient", "device", "enroll", "--current-device", "--asset-tag", asset_tag],
            env=env,
            capture_output=True,
            check=True,
        )
        yield env, proxy
