"""Bots and CI in a `required-for-humans` cluster, as deployed: automation keeps working
when people must use trusted devices.

A bot gets its certificate two ways, both driven here through the product's own
commands only: `dtadmin auth sign` on the CA host (handed to a job that runs stock
`ssh -J`), and a bot token its job presents with `dtclient login --bot-token FILE`.
A person without a trusted device is refused in the same cluster; a locked bot is
refused like a person; a person's name gets neither `auth sign` nor a bot token.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.deployed.deployment import Deployment
from tests.deployed.people import Person
from tests.deployed.processes import LOGIN

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def humans_need_devices(deployment: Deployment) -> None:
    out = deployment.admin("cluster", "set", "device-trust-mode", "required-for-humans").stdout
    assert "required-for-humans" in out


def field(event: dict, name: str) -> object:
    """An event's own field, at the top of `audit ls --format json` (or under "fields")."""
    return event.get(name, (event.get("fields") or {}).get(name))


def add_bot(deployment: Deployment, name: str) -> None:
    out = deployment.admin("bots", "add", name, "--roles", "access", "--logins", LOGIN).stdout
    assert f'Bot "{name}" has been created' in out
    assert name in {b["name"] for b in deployment.admin_json("bots", "ls")}


class Job:
    """A CI job holding a key and the certificate `dtadmin auth sign` gave it, running
    stock OpenSSH (`ssh -J bastion login@node-1`) with an ssh_config of its own."""

    def __init__(self, deployment: Deployment, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.key = workdir / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True
        )
        host_ca = deployment.admin("ca", "export", "--type", "host").stdout
        known = workdir / "known_hosts"
        known.write_text("".join(ln + "\n" for ln in host_ca.splitlines() if ln.startswith("@")))
        common = (
            f"    IdentityFile {self.key}\n    CertificateFile {self.key}-cert.pub\n"
            f"    IdentitiesOnly yes\n    UserKnownHostsFile {known}\n"
            "    StrictHostKeyChecking yes\n    BatchMode yes\n    ConnectTimeout 10\n"
        )
        assert deployment.bastion is not None
        self.config = workdir / "ssh_config"
        self.config.write_text(
            f"Host bastion\n    HostName 127.0.0.1\n    Port {deployment.bastion.port}\n"
            f"    User ci\n    HostKeyAlias 127.0.0.1\n{common}\nHost node-1\n{common}"
        )

    def ssh(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh", "-F", str(self.config), "-J", "bastion", f"{LOGIN}@node-1",
             *(cmd or ("echo", "reached"))],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        )  # fmt: skip


def test_auth_sign_bot_jumps_and_a_person_without_a_device_is_refused(
    deployment: Deployment, tmp_path: Path
):
    add_bot(deployment, "ci-sign")
    job = Job(deployment, tmp_path / "job")
    out = deployment.admin(
        "auth", "sign", "--user", "ci-sign", "--key", f"{job.key}.pub", "--ttl", "1h",
        "--out", f"{job.key}-cert.pub",
    ).stdout  # fmt: skip
    assert "certificate for bot ci-sign" in out
    shown = subprocess.run(
        ["ssh-keygen", "-L", "-f", f"{job.key}-cert.pub"], capture_output=True, text=True
    ).stdout
    assert "dt-bot@dt-bastion" in shown and 'Key ID: "bot-ci-sign-' in shown, shown

    reached = job.ssh()
    assert reached.returncode == 0 and "reached" in reached.stdout, reached.stderr
    issued = deployment.admin_json("cert", "ls", "--user", "ci-sign")
    assert len(issued) == 1 and issued[0]["key_id"].startswith("bot-ci-sign-")
    signed = deployment.audit("cert.create", "ci-sign")
    assert signed and signed[-1]["success"] and field(signed[-1], "bot") is True

    hugo = deployment.sign_up("hugo")  # a person, password and code, no device
    refused = hugo.ssh()
    assert refused.returncode != 0 and "reached" not in refused.stdout
    assert "trusted device" in refused.stderr, refused.stderr


def test_bot_token_login_then_ssh_and_the_token_dies_with_its_removal(
    deployment: Deployment, tmp_path: Path
):
    add_bot(deployment, "ci-token")
    token_file = tmp_path / "ci-token.token"
    out = deployment.admin("bots", "token", "ci-token", "--ttl", "2h", "--out", str(token_file))
    assert str(token_file) in out.stdout and token_file.stat().st_mode & 0o077 == 0
    [listed] = deployment.admin_json("bots", "tokens", "ci-token")
    assert listed["expired"] is False and listed["id"] in out.stdout

    job = Person(deployment, "ci-token")
    login = ["login", "--proxy", deployment.proxy, "--user", "ci-token",
             "--ca-pin", deployment.ca_pin, "--bot-token", str(token_file)]  # fmt: skip
    logged_in = job.dtclient(*login)
    assert "ci-token" in logged_in.stdout
    assert job.can_reach(), job.ssh().stderr
    used = deployment.audit("token.use", "ci-token")
    assert used and used[-1]["success"] and field(used[-1], "token") == listed["id"]
    [cert] = deployment.admin_json("cert", "ls", "--user", "ci-token")
    assert cert["key_id"].startswith("bot-ci-token-") and cert["device_id"] is None

    # The wrong bot name is caught before a certificate is asked for.
    wrong = job.dtclient(*login[:4], "someone-else", *login[5:], ok=False)
    assert wrong.returncode != 0 and 'belongs to "ci-token"' in wrong.stderr

    deployment.admin("bots", "token-rm", "ci-token", listed["id"])
    again = job.dtclient(*login, ok=False)
    assert again.returncode != 0 and "ci-token" not in again.stdout
    assert "refused the bot token" in again.stderr or "not valid" in again.stderr, again.stderr
    refused = deployment.audit("token.use")
    assert not refused[-1]["success"] and "not valid" in refused[-1]["message"]

    # A second token, then the bot removed: the token and its certificates go with it.
    token2 = tmp_path / "second.token"
    deployment.admin("bots", "token", "ci-token", "--out", str(token2))
    assert job.dtclient(*login[:-1], str(token2)).returncode == 0
    removed = deployment.admin("bots", "rm", "ci-token").stdout
    assert "1 token(s) removed" in removed
    assert not job.can_reach()
    assert job.dtclient(*login[:-1], str(token2), ok=False).returncode != 0


def test_a_locked_bot_is_refused(deployment: Deployment, tmp_path: Path):
    add_bot(deployment, "ci-locked")
    job = Job(deployment, tmp_path / "job")
    deployment.admin("auth", "sign", "--user", "ci-locked", "--key", f"{job.key}.pub")
    assert job.ssh().returncode == 0
    token_file = tmp_path / "t"
    deployment.admin("bots", "token", "ci-locked", "--out", str(token_file))

    lock_id = deployment.lock_user("ci-locked")
    assert job.ssh().returncode != 0
    bot = Person(deployment, "ci-locked")
    login = bot.dtclient(
        "login", "--proxy", deployment.proxy, "--user", "ci-locked",
        "--ca-pin", deployment.ca_pin, "--bot-token", str(token_file), ok=False,
    )  # fmt: skip
    assert login.returncode != 0 and "locked" in login.stderr, login.stderr
    assert "locked" in deployment.audit("token.use", "ci-locked")[-1]["message"]
    resign = deployment.admin(
        "auth", "sign", "--user", "ci-locked", "--key", f"{job.key}.pub", ok=False
    )
    assert resign.returncode != 0 and "locked" in resign.stderr

    deployment.admin("lock", "rm", lock_id)
    assert job.ssh().returncode == 0


def test_a_person_gets_neither_auth_sign_nor_a_bot_token(deployment: Deployment, tmp_path: Path):
    deployment.add_user("ivy")
    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    sign = deployment.admin("auth", "sign", "--user", "ivy", "--key", f"{key}.pub", ok=False)
    assert sign.returncode != 0 and "is a person, not a bot" in sign.stderr
    assert not (tmp_path / "k-cert.pub").exists()
    assert deployment.admin_json("cert", "ls", "--user", "ivy") == []
    refused = deployment.audit("cert.create", "ivy")
    assert refused and not refused[-1]["success"]

    token = deployment.admin("bots", "token", "ivy", ok=False)
    assert token.returncode != 0 and "it is a person" in token.stderr
    assert deployment.admin("bots", "tokens", "ivy", ok=False).returncode != 0

    # And a bot never signs up nor logs in with a password.
    add_bot(deployment, "ci-nopass")
    reset = deployment.admin("users", "reset", "ci-nopass", ok=False)
    assert reset.returncode != 0 and "bots never sign up" in reset.stderr


def test_a_person_with_a_trusted_device_gets_through(deployment: Deployment, new_tpm: str):
    """required-for-humans is `required` for people, not `off`: with a device it works."""
    june = deployment.sign_up("june", tcti=new_tpm)
    assert not june.can_reach()
    deployment.enroll(june, "JUNE-LAPTOP")
    reached = june.ssh()
    assert reached.returncode == 0 and "reached" in reached.stdout, reached.stderr
