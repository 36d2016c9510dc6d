"""dtclient device enroll / login with device authentication, against the real bastion."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bastion.authz.records import Node
from bastion.cluster import init_cluster
from tests.sshd import LOGIN, bastion_server, sshd_node
from tests.swtpm import trust_test_tpms
from tests.test_login import PASSWORD, next_code, signup
from tests.tokens import printed_token

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


@pytest.fixture
def env(tmp_path, swtpm):
    cluster = init_cluster(tmp_path / "state", "device-test")
    trust_test_tpms(cluster.store, swtpm.provisioned)  # an admin trusts the test TPMs' CA
    with sshd_node(tmp_path / "node", cluster) as node, bastion_server(tmp_path / "state") as b:
        cluster.store.add_node(Node("node-1", "127.0.0.1", node.port))
        e = type(
            "Env",
            (),
            {
                "tmp": tmp_path,
                "cluster": cluster,
                "bastion": b,
                "proxy": f"127.0.0.1:{b.port}",
                "tpm": swtpm,
            },
        )
        yield e
    cluster.close()


def run(env, *args, input=None):
    proc = subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "DT_STATE": str(env.cluster.state_dir),
            "DT_HOME": str(env.tmp / "home"),
            "DT_TPM_TCTI": env.tpm.tcti,
            "COLUMNS": "200",
            "SSH_AUTH_SOCK": "",
        },
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_token_enrollment_then_device_login(env):
    out = run(
        env,
        "dtadmin",
        "users",
        "add",
        "carol",
        "--roles",
        "access,require-trusted-device",
        "--logins",
        LOGIN,
    ).stdout
    secret = signup(env, env.tmp / "home", printed_token(out))
    login = run(
        env,
        "dtclient",
        "login",
        "--proxy",
        env.proxy,
        "--user",
        "carol",
        input=f"{PASSWORD}\n{next_code(secret)}\n",
    )
    assert login.returncode == 0 and "device trust is required" in login.stderr

    tag = "CAROL-LAPTOP"
    token_out = run(env, "dtadmin", "device", "add", "--asset-tag", tag, "--enroll").stdout
    token = printed_token(token_out)
    enrolled = run(env, "dtclient", "device", "enroll", "--token", token, "--asset-tag", tag)
    assert enrolled.returncode == 0, enrolled.stderr
    assert f'Device "{tag}"/linux registered and enrolled' in enrolled.stdout
    reused = run(env, "dtclient", "device", "enroll", "--token", token, "--asset-tag", tag)
    assert reused.returncode == 8 and "already used" in reused.stderr

    renewed = run(env, "dtclient", "login", "--proxy", env.proxy, "--user", "carol")
    assert renewed.returncode == 0, renewed.stderr
    status = json.loads(run(env, "dtclient", "status", "--format", "json").stdout)
    assert status["device_trusted"] and status["device_asset_tag"] == tag
    cert = env.tmp / "home" / "clusters" / "device-test" / "keys" / "id_ed25519-cert.pub"
    listing = subprocess.run(
        ["ssh-keygen", "-L", "-f", str(cert)], capture_output=True, text=True
    ).stdout
    for ext in (
        "device-id@dt-bastion",
        "device-asset-tag@dt-bastion",
        "device-credential-id@dt-bastion",
    ):
        assert ext in listing

    config = env.tmp / "ssh_config"
    config.write_text(run(env, "dtclient", "config").stdout)
    ok = subprocess.run(
        ["ssh", "-F", str(config), "-o", "BatchMode=yes", f"{LOGIN}@node-1", "true"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert ok.returncode == 0, ok.stderr

    assert run(env, "dtadmin", "device", "unenroll", tag).returncode == 0
    again = run(env, "dtclient", "login", "--proxy", env.proxy, "--user", "carol")
    assert again.returncode == 0 and "device authentication failed" in again.stderr
    assert "not enrolled" in again.stderr
    status = json.loads(run(env, "dtclient", "status", "--format", "json").stdout)
    assert not status["device_trusted"]
    denied = [e for e in env.cluster.store.list_audit(type="device.authenticate") if not e.success]
    assert denied and "not enrolled" in denied[-1].message


def test_renewal_never_outlives_the_presenting_certificate(env):
    out = run(env, "dtadmin", "users", "add", "dave", "--roles", "access", "--logins", LOGIN).stdout
    secret = signup(env, env.tmp / "home", printed_token(out))
    first = run(
        env,
        "dtclient",
        "login",
        "--proxy",
        env.proxy,
        "--user",
        "dave",
        "--ttl",
        "10m",
        input=f"{PASSWORD}\n{next_code(secret)}\n",
    )
    assert first.returncode == 0, first.stderr
    before = json.loads(run(env, "dtclient", "status", "--format", "json").stdout)
    time.sleep(1.1)
    renewed = run(env, "dtclient", "login", "--proxy", env.proxy, "--user", "dave", "--ttl", "8h")
    assert renewed.returncode == 0 and "Renewing" in renewed.stderr
    after = json.loads(run(env, "dtclient", "status", "--format", "json").stdout)
    assert after["serial"] != before["serial"] and after["valid_until"] <= before["valid_until"]


def test_no_tpm_is_a_clear_error(env):
    result = run(env, "dtclient", "device", "collect", "--tpm", "device:/nonexistent/tpmrm0")
    assert result.returncode == 13 and "no TPM found at /nonexistent/tpmrm0" in result.stderr


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("runuser") is None, reason="needs root to run as another user"
)
def test_tpm_permission_denied_names_the_fix(tmp_path):
    device = tmp_path / "tpmrm0"
    device.write_bytes(b"")
    device.chmod(0o600)
    tmp_path.chmod(0o755)
    code = f"from client.tpm import TPM\nwith TPM.open('device:{device}'): pass\n"
    result = subprocess.run(
        ["runuser", "-u", "nobody", "--", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(Path(__file__).resolve().parents[1]),
    )
    if "Permission denied" in result.stderr and "client" not in result.stderr:
        pytest.skip("nobody cannot read this checkout")
    assert "TPMPermissionDenied" in result.stderr and "tss group" in result.stderr


def test_permission_mapping_when_not_root(tmp_path, monkeypatch):
    """As root we cannot be denied for real; this fault is simulated (os.access says no)."""
    from bastion.protocol.errors import TPMPermissionDenied
    from client import tpm

    device = tmp_path / "tpmrm0"
    device.write_bytes(b"")
    monkeypatch.setattr(tpm.os, "access", lambda path, mode: False)
    err = tpm._open_error(f"device:{device}", OSError("EACCES"))
    assert isinstance(err, TPMPermissionDenied) and "usermod -aG tss" in err.message
