"""Smaller command paths: config files, trust roots, device data, users reset, ssh-agent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.config import load_config, parse_listen
from bastion.protocol.errors import UsageError

BIN = Path(sys.executable).parent
SHARED_ROOTS = Path(__file__).resolve().parents[2] / "shared" / "tpm-ek-roots"


def cli(*args, env=None, input=None):
    proc = subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        input=input,
        timeout=60,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "bastion.toml"
    path.write_text(
        '[bastion]\nlisten_port = 4022\nhost_names = ["bastion.example.com"]\n'
        "max_connections_per_source = 5\n"
    )
    cfg = load_config(path, listen_host="127.0.0.1")
    assert cfg.listen_port == 4022 and cfg.listen_host == "127.0.0.1"
    assert cfg.names() == ("bastion.example.com",) and cfg.max_connections_per_source == 5
    path.write_text("[bastion]\nlisten_prot = 1\n")
    with pytest.raises(UsageError, match="unknown setting 'listen_prot'"):
        load_config(path)
    path.write_text("[bastion]\nlogin_timeout = -1\n")
    with pytest.raises(UsageError, match="positive number"):
        load_config(path)
    path.write_text("not = [toml")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_config(path)
    assert parse_listen("0.0.0.0:3022") == ("0.0.0.0", 3022)
    with pytest.raises(UsageError):
        parse_listen("host:port")


def test_serve_refuses_a_corrupt_cluster(tmp_path):
    (tmp_path / "cluster.db").write_bytes(b"junk" * 500)
    result = cli("dt-bastion", "serve", "--state", str(tmp_path), "--listen", "127.0.0.1:0")
    assert result.returncode == 5 and "corrupt" in result.stderr


@pytest.fixture
def state(tmp_path):
    env = {"DT_STATE": str(tmp_path / "state")}
    assert cli("dtadmin", "init", "--cluster", "x", env=env).returncode == 0
    return env


def test_trust_roots_including_real_vendor_roots(state, tmp_path):
    pems = sorted(SHARED_ROOTS.glob("*.pem"))
    if not pems:
        pytest.skip("../shared/tpm-ek-roots is not present")
    for pem in pems:
        result = cli("dtadmin", "device", "trust-root", "add", str(pem), env=state)
        assert result.returncode == 0, result.stderr
    again = cli("dtadmin", "device", "trust-root", "add", str(pems[0]), env=state)
    assert again.returncode == 4
    roots = json.loads(
        cli("dtadmin", "device", "trust-root", "ls", "--format", "json", env=state).stdout
    )
    assert len(roots) == len(pems) and any("Nuvoton" in r["subject"] for r in roots)
    bad = tmp_path / "bad.pem"
    bad.write_text("hello")
    assert (
        "not a PEM or DER"
        in cli("dtadmin", "device", "trust-root", "add", str(bad), env=state).stderr
    )
    assert (
        cli("dtadmin", "device", "trust-root", "rm", roots[0]["fingerprint"], env=state).returncode
        == 0
    )


def test_users_reset_issues_a_new_token(state):
    cli("dtadmin", "users", "add", "erin", "--roles", "access", env=state)
    result = cli("dtadmin", "users", "reset", "erin", env=state)
    assert result.returncode == 0 and "dtclient signup" in result.stdout


@pytest.mark.integration
def test_device_collect_and_asset_tag(swtpm):
    env = {"DT_TPM_TCTI": swtpm.tcti}
    data = json.loads(cli("dtclient", "device", "collect", "--format", "json", env=env).stdout)
    assert data["os_type"] == "linux" and len(data["ek_pub_hash"]) == 64 and data["asset_tag"]
    tag = cli("dtclient", "device", "asset-tag", env=env)
    assert tag.returncode == 0 and tag.stdout.strip()


@pytest.mark.integration
def test_login_adds_to_and_logout_removes_from_ssh_agent(tmp_path):
    from bastion.cluster import init_cluster
    from tests.sshd import bastion_server
    from tests.test_login import PASSWORD, next_code, signup
    from tests.tokens import printed_token

    cluster = init_cluster(tmp_path / "state", "agent")
    agent = subprocess.run(
        ["ssh-agent", "-s", "-a", str(tmp_path / "agent.sock")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pid = int(agent.split("SSH_AGENT_PID=")[1].split(";")[0])
    env = {
        "DT_STATE": str(tmp_path / "state"),
        "DT_HOME": str(tmp_path / "home"),
        "SSH_AUTH_SOCK": str(tmp_path / "agent.sock"),
    }
    try:
        with bastion_server(tmp_path / "state") as b:
            token = cli("dtadmin", "users", "add", "fay", "--roles", "access", env=env).stdout
            e = type("E", (), {"proxy": f"127.0.0.1:{b.port}", "cluster": cluster, "tmp": tmp_path})
            secret = signup(e, tmp_path / "home", printed_token(token))
            login = cli(
                "dtclient",
                "login",
                "--proxy",
                e.proxy,
                "--user",
                "fay",
                env=env,
                input=f"{PASSWORD}\n{next_code(secret)}\n",
            )
            assert login.returncode == 0, login.stderr
            listed = subprocess.run(
                ["ssh-add", "-l"], capture_output=True, text=True, env={**os.environ, **env}
            ).stdout
            assert "fay@dt-bastion" in listed or "CERT" in listed
            assert cli("dtclient", "logout", env=env).returncode == 0
            listed = subprocess.run(
                ["ssh-add", "-l"], capture_output=True, text=True, env={**os.environ, **env}
            )
            assert "fay@dt-bastion" not in listed.stdout
    finally:
        os.kill(pid, 15)
        cluster.close()
