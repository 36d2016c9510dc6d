"""A stolen password is not a trusted device (issue 12).

With device trust required and no EK roots configured (the old default), a stolen
password and code self-enrolled the attacker's own software TPM (``--current-device``,
editor role) and got a device certificate; auto-enrollment accepted any TPM that
reported the inventory serial. Now a device's trust rests on an EK certificate
chaining to a vendor root (shipped) or to a root an admin added, or on an EK an admin
registered. Real bastion, real ``dtclient``, two real software TPMs: the victim's
(whose CA the admin trusted) and the attacker's (whose CA nobody trusted).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from bastion.authz.records import Node
from bastion.cluster import init_cluster
from tests.sshd import LOGIN, bastion_server, sshd_node
from tests.swtpm import trust_test_tpms
from tests.test_device_login import BIN
from tests.test_login import PASSWORD, next_code, signup
from tests.tokens import printed_token

pytestmark = pytest.mark.integration


@pytest.fixture
def env(tmp_path, swtpm, attacker_swtpm):
    cluster = init_cluster(tmp_path / "state", "stolen")
    trust_test_tpms(cluster.store, swtpm.provisioned)  # the fleet's CA; not the attacker's
    with sshd_node(tmp_path / "node", cluster) as node, bastion_server(tmp_path / "state") as b:
        cluster.store.add_node(Node("node-1", "127.0.0.1", node.port))
        yield type(
            "Env",
            (),
            {
                "tmp": tmp_path,
                "cluster": cluster,
                "proxy": f"127.0.0.1:{b.port}",
                "victim_tpm": swtpm,
                "attacker_tpm": attacker_swtpm,
            },
        )
    cluster.close()


def run(env, *args, tpm=None, home="attacker", input=None):
    proc = subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "DT_STATE": str(env.cluster.state_dir),
            "DT_HOME": str(env.tmp / home),
            "DT_TPM_TCTI": (tpm or env.attacker_tpm).tcti,
            "COLUMNS": "200",
            "SSH_AUTH_SOCK": "",
        },
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def stolen_login(env, roles="access,editor,require-trusted-device"):
    """The attacker holds alice's password and her authenticator's secret."""
    out = run(env, "dtadmin", "users", "add", "alice", "--roles", roles, "--logins", LOGIN)
    secret = signup(env, env.tmp / "attacker", printed_token(out.stdout))
    login = run(
        env,
        "dtclient",
        "login",
        "--proxy",
        env.proxy,
        "--user",
        "alice",
        input=f"{PASSWORD}\n{next_code(secret)}\n",
    )
    assert login.returncode == 0, login.stderr
    return secret


def device_trusted(env, home="attacker"):
    status = run(env, "dtclient", "status", "--format", "json", home=home)
    return json.loads(status.stdout)["device_trusted"]


def test_a_stolen_password_cannot_self_enroll_the_attackers_tpm(env):
    """As attacked: the cluster's default, no EK root added by anyone."""
    for root in env.cluster.store.list_trust_roots():
        env.cluster.store.remove_trust_root(root["fingerprint"])
    stolen_login(env)
    enrolled = run(env, "dtclient", "device", "enroll", "--current-device", "--asset-tag", "EVIL-1")
    assert enrolled.returncode != 0
    assert "does not chain to a trust root" in enrolled.stderr
    assert "dtadmin trust-root add" in enrolled.stderr  # the fix is named
    denied = [e for e in env.cluster.store.list_audit(type="device.enroll") if not e.success]
    assert denied and "a password alone does not make a trusted device" in denied[-1].message
    assert env.cluster.store.find_device("EVIL-1") is None
    renewed = run(env, "dtclient", "login", "--proxy", env.proxy, "--user", "alice")
    assert renewed.returncode == 0 and not device_trusted(env)


def test_auto_enrollment_needs_a_trusted_tpm_too(env, swtpm):
    for root in env.cluster.store.list_trust_roots():  # the default: none added
        env.cluster.store.remove_trust_root(root["fingerprint"])
    stolen_login(env, roles="access,require-trusted-device")
    assert run(env, "dtadmin", "cluster", "set", "auto-enroll", "on").returncode == 0
    inventory = env.tmp / "inventory.json"
    inventory.write_text(
        json.dumps([{"asset_tag": "ALICE-1", "os_type": "linux", "owner": "alice"}])
    )
    assert run(env, "dtadmin", "device", "import", str(inventory)).returncode == 0, "import"
    # the attacker's TPM reports the inventory serial
    enrolled = run(env, "dtclient", "device", "enroll", "--asset-tag", "ALICE-1")
    assert enrolled.returncode != 0 and "does not chain to a trust root" in enrolled.stderr
    assert not env.cluster.store.get_device("ALICE-1").enrolled
    # the control: alice's own machine, once the admin trusted its (test) TPM vendor
    trust_test_tpms(env.cluster.store, swtpm.provisioned)
    shutil.copytree(env.tmp / "attacker", env.tmp / "alice", ignore=shutil.ignore_patterns("tpm"))
    ok = run(
        env, "dtclient", "device", "enroll", "--asset-tag", "ALICE-1", tpm=env.victim_tpm,
        home="alice",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    record = env.cluster.store.get_device("ALICE-1").credential
    assert record.attestation_type == "tpm_ekcert_trusted"


def test_an_ek_the_admin_registered_is_trusted_and_a_role_can_ask_for_more(env, tmp_path):
    stolen_login(env, roles="access,require-trusted-device")
    collected = json.loads(run(env, "dtclient", "device", "collect", "--format", "json").stdout)
    ek_hash = collected["ek_pub_hash"]
    added = run(
        env, "dtadmin", "device", "add", "--asset-tag", "LAB-1", "--owner", "alice",
        "--ek-pub-hash", ek_hash, "--enroll",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    token_file = tmp_path / "token"
    token_file.write_text(printed_token(added.stdout) + "\n")
    enrolled = run(
        env, "dtclient", "device", "enroll", "--token-file", str(token_file), "--asset-tag", "LAB-1"
    )
    assert enrolled.returncode == 0, enrolled.stderr
    assert env.cluster.store.get_device("LAB-1").credential.attestation_type == "tpm_ekcert"
    renewed = run(env, "dtclient", "login", "--proxy", env.proxy, "--user", "alice")
    assert renewed.returncode == 0 and device_trusted(env)
    # a role that wants a vendor-certified TPM refuses this one, and says why
    role = env.tmp / "role.yaml"
    role.write_text(
        "kind: role\nversion: v1\nmetadata: {name: strict}\n"
        "spec:\n  options: {device_attestation: tpm_ekcert_trusted}\n"
    )
    assert run(env, "dtadmin", "roles", "create", "-f", str(role)).returncode == 0
    assert run(env, "dtadmin", "users", "update", "alice", "--add-roles", "strict").returncode == 0
    refused = run(env, "dtclient", "login", "--proxy", env.proxy, "--user", "alice")
    assert "tpm_ekcert_trusted" in refused.stderr, refused.stderr
    assert not device_trusted(env)
