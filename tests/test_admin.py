"""dtadmin: every command, its bad inputs, the $EDITOR flow, JSON output, no tracebacks."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from typer.main import get_command
from typer.testing import CliRunner

from bastion.admin import app
from bastion.cluster import Cluster
from bastion.protocol.errors import DTError
from tests.tokens import printed_token

DTADMIN = str(Path(sys.executable).parent / "dtadmin")


@dataclass
class Result:
    exit_code: int
    output: str


@pytest.fixture
def state(tmp_path, monkeypatch):
    path = tmp_path / "state"
    monkeypatch.setenv("DT_STATE", str(path))
    return path


@pytest.fixture
def run(state):
    runner = CliRunner()

    def invoke(*args, input=None, env=None):
        """Like the console script: a DTError becomes `error: ...` and its exit code."""
        result = runner.invoke(app, list(args), input=input, env=env)
        exc = result.exception
        if isinstance(exc, DTError):
            return Result(exc.exit_code, result.output + f"error: {exc.message}\n")
        if exc and not isinstance(exc, SystemExit):
            raise exc
        return Result(result.exit_code, result.output)

    return invoke


@pytest.fixture
def cluster(run, state):
    assert run("init", "--cluster", "test").exit_code == 0
    assert (
        run("users", "add", "alice", "--roles", "access,editor", "--logins", "root").exit_code == 0
    )
    return state


def cli(*args, env=None, input=None):
    """The real console script: proves the exit code and that no traceback escapes."""
    proc = subprocess.run(
        [DTADMIN, *args],
        capture_output=True,
        text=True,
        input=input,
        env={**os.environ, **(env or {})},
        timeout=60,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


# -- help ------------------------------------------------------------------------------------


def _commands(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


def test_every_command_has_help(run):
    for path, command in _commands(get_command(app)):
        assert command.help or command.short_help, f"dtadmin {' '.join(path)} has no help"
        result = run(*path, "--help")
        assert result.exit_code == 0, path


# -- init and state ------------------------------------------------------------------------------


def test_init_creates_private_ca_keys_and_refuses_to_overwrite(cluster, run):
    for name in ("user_ca", "host_ca"):
        assert stat.S_IMODE((cluster / "ca" / name).stat().st_mode) == 0o600
    again = run("init", "--cluster", "other")
    assert again.exit_code == 4 and "refusing to overwrite" in again.output


def test_missing_cluster_names_the_fix(tmp_path):
    proc = cli("--state", str(tmp_path / "none"), "users", "ls")
    assert proc.returncode == 5 and "dtadmin init" in proc.stderr


def test_corrupt_database_is_refused_cleanly(cluster):
    for suffix in ("-wal", "-shm"):
        (cluster / f"cluster.db{suffix}").unlink(missing_ok=True)
    (cluster / "cluster.db").write_bytes(b"garbage" * 1000)
    proc = cli("users", "ls", env={"DT_STATE": str(cluster)})
    assert proc.returncode == 5 and "corrupt" in proc.stderr


def test_world_readable_ca_key_is_refused(cluster):
    os.chmod(cluster / "ca" / "user_ca", 0o644)
    proc = cli("users", "ls", env={"DT_STATE": str(cluster)})
    assert proc.returncode == 5 and "chmod 600" in proc.stderr


# -- users and roles ---------------------------------------------------------------------------


def test_users_add_prints_signup_command(run, state):
    run("init", "--cluster", "test")
    result = run("users", "add", "bob", "--roles", "access", "--logins", "root,ubuntu")
    assert result.exit_code == 0 and "dtclient signup --proxy" in result.output
    token = printed_token(result.output)
    store = Cluster.open(state).store
    assert all(t.token_hash != token for t in store.list_tokens())  # only the hash is stored


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("users", "add", "bob", "--roles", "ghost"), 3, 'role "ghost" not found'),
        (("users", "add", "alice", "--roles", "access"), 4, "already exists"),
        (("users", "add", "b b", "--roles", "access"), 2, "invalid user name"),
        (("users", "add", "bob", "--roles", "access", "--logins", "Root!"), 2, "invalid login"),
        (("users", "rm", "nobody"), 3, 'user "nobody" not found'),
        (("users", "update", "nobody", "--add-roles", "auditor"), 3, "not found"),
        (("users", "update", "alice", "--add-roles", "ghost"), 3, "ghost"),
        (("get", "users/nobody"), 3, "not found"),
        (("get", "pets/x"), 2, "invalid resource"),
        (("roles", "rm", "access"), 4, "preset"),
        (("nodes", "add", "n1", "--addr", "host:99999"), 2, "invalid port"),
        (("nodes", "add", "n1", "--addr", "bad host:22"), 2, "invalid host"),
        (("nodes", "rm", "nope"), 3, "not found"),
        (("device", "add", "--asset-tag", "SN1", "--os", "beos"), 2, "invalid --os"),
        (("device", "unenroll", "nope"), 3, "not found"),
        (("lock", "--user", "nobody"), 3, "not found"),
        (("lock", "--message", "x"), 2, "exactly one"),
        (("cluster", "set", "device-trust-mode", "sometimes"), 2, "invalid device trust mode"),
        (("cluster", "set", "colour", "blue"), 2, "unknown setting"),
        (("auth", "sign", "--user", "alice", "--pubkey", "/nonexistent"), 2, "cannot read"),
        (("audit", "ls", "--since", "yesterday-ish"), 2, "invalid --since"),
    ],
)
def test_bad_input_gets_a_clear_error(cluster, args, code, message):
    proc = cli(*args, env={"DT_STATE": str(cluster)})
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr and proc.stderr.startswith("error: ")


def test_users_update_and_json(cluster, run):
    assert run("users", "update", "alice", "--add-roles", "require-trusted-device").exit_code == 0
    users = json.loads(run("users", "ls", "--format", "json").output)
    assert users[0]["roles"] == ["access", "editor", "require-trusted-device"]
    assert run("users", "update", "alice", "--remove-roles", "editor").exit_code == 0
    doc = json.loads(run("get", "users/alice", "--format", "json").output)
    assert doc["spec"]["roles"] == ["access", "require-trusted-device"]


def test_roles_create_from_yaml(cluster, run, tmp_path):
    role = tmp_path / "role.yaml"
    role.write_text(
        "kind: role\nmetadata: {name: prod}\nspec:\n"
        "  options: {max_session_ttl: 8h, device_trust_mode: required}\n"
        "  allow: {logins: [root], node_labels: {env: prod}}\n"
    )
    assert run("roles", "create", "-f", str(role)).exit_code == 0
    doc = json.loads(run("get", "roles/prod", "--format", "json").output)
    assert doc["spec"]["options"]["device_trust_mode"] == "required"
    assert doc["spec"]["options"]["max_session_ttl"] == "8h"
    role.write_text(
        "kind: role\nmetadata: {name: bad}\nspec:\n  options: {max_session_ttl: soon}\n"
    )
    result = run("roles", "create", "-f", str(role))
    assert result.exit_code == 2 and "invalid duration" in result.output
    role.write_text("kind: role\nmetadata: {name: bad}\nspec:\n  colour: red\n")
    assert "unknown field spec.colour" in run("roles", "create", "-f", str(role)).output


# -- the $EDITOR flow ------------------------------------------------------------------------------


def editor(tmp_path, body: str) -> str:
    script = tmp_path / "editor.py"
    script.write_text(
        f"import sys, pathlib\np = pathlib.Path(sys.argv[1])\ntext = p.read_text()\n{body}\n"
    )
    return f"{sys.executable} {script}"


def test_edit_adds_a_role(cluster, tmp_path):
    ed = editor(
        tmp_path,
        "p.write_text(text.replace('  - editor\\n', '  - editor\\n  - require-trusted-device\\n'))",
    )
    proc = cli("edit", "users/alice", env={"DT_STATE": str(cluster), "EDITOR": ed})
    assert proc.returncode == 0, proc.stderr
    assert (
        "require-trusted-device" in cli("get", "users/alice", env={"DT_STATE": str(cluster)}).stdout
    )
    assert Cluster.open(cluster).store.list_audit(type="user.update")


def test_an_edit_never_writes_over_a_change_made_while_the_editor_was_open(cluster, tmp_path):
    """Another admin removes a role (a separate dtadmin process) while the editor is
    open; saving the copy shown before must not put the role back."""
    env = {"DT_STATE": str(cluster)}
    meanwhile = (
        f"import subprocess\nsubprocess.run([{DTADMIN!r}, 'users', 'update', 'alice', "
        f"'--remove-roles', 'editor'], check=True, env={{**__import__('os').environ, "
        f"'DT_STATE': {str(cluster)!r}}})\n"
        "p.write_text(text.replace('  - access\\n', '  - access\\n  - auditor\\n'))"
    )
    proc = cli("edit", "users/alice", env={**env, "EDITOR": editor(tmp_path, meanwhile)})
    assert proc.returncode != 0 and "changed by someone else" in proc.stderr, proc.stderr
    roles = json.loads(cli("get", "users/alice", "--format", "json", env=env).stdout)["spec"][
        "roles"
    ]
    assert "editor" not in roles and "auditor" not in roles


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("p.write_text('spec: [unclosed')", "invalid YAML"),
        ("p.write_text(text.replace('name: alice', 'name: mallory'))", "cannot be changed"),
        ("p.write_text(text.replace('  - editor', '  - ghost'))", 'unknown role "ghost"'),
        ("p.write_text(text.replace('kind: user', 'kind: role'))", "kind must stay"),
        ("p.write_text(text + 'extra: 1\\n')", "unknown field"),
        ("sys.exit(3)", "exited with 3"),
    ],
)
def test_bad_edits_change_nothing(cluster, tmp_path, body, message):
    before = cli("get", "users/alice", env={"DT_STATE": str(cluster)}).stdout
    ed = editor(tmp_path, body)
    proc = cli("edit", "users/alice", env={"DT_STATE": str(cluster), "EDITOR": ed})
    assert proc.returncode != 0 and message in proc.stderr
    assert "nothing was changed" in proc.stderr
    assert cli("get", "users/alice", env={"DT_STATE": str(cluster)}).stdout == before


def test_edit_device_to_unenroll(cluster, run, tmp_path):
    from bastion.authz.records import DeviceCredential

    store = Cluster.open(cluster).store
    run("device", "add", "--asset-tag", "SN1", "--owner", "alice")
    from dataclasses import replace

    store.update_device(
        replace(
            store.get_device("SN1"),
            enroll_status="enrolled",
            credential=DeviceCredential("c", b"\x30", "tpm_ekpub", "ab"),
        )
    )
    ed = editor(
        tmp_path,
        "p.write_text(text.replace('enroll_status: enrolled', 'enroll_status: not_enrolled'))",
    )
    proc = cli("edit", "device/SN1", env={"DT_STATE": str(cluster), "EDITOR": ed})
    assert proc.returncode == 0, proc.stderr
    device = Cluster.open(cluster).store.get_device("SN1")
    assert device.enroll_status == "not_enrolled" and device.credential is None
    assert Cluster.open(cluster).store.list_audit(type="device.unenroll")


def test_unchanged_edit_says_so(cluster, tmp_path):
    proc = cli("edit", "users/alice", env={"DT_STATE": str(cluster), "EDITOR": "true"})
    assert proc.returncode == 0 and "No changes" in proc.stdout


# -- CA export, signing, audit, nodes, devices, locks -----------------------------------------------


def test_ca_export_and_signing(cluster, run, tmp_path):
    user = run("ca", "export", "--type", "user").output
    assert "ssh-ed25519 " in user and "SHA256:" in user
    host = json.loads(run("ca", "export", "--type", "host", "--format", "json").output)
    assert host["fingerprint"].startswith("SHA256:")
    assert "@cert-authority * " in run("ca", "export", "--type", "host").output
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True
    )
    # auth sign is for bots (people log in with dtclient): see tests/test_bots.py
    assert run("bots", "add", "ci", "--roles", "access", "--logins", "root").exit_code == 0
    assert (
        run(
            "auth", "sign", "--user", "ci", "--pubkey", str(tmp_path / "k.pub"), "--ttl", "30m"
        ).exit_code
        == 0
    )
    out = subprocess.run(
        ["ssh-keygen", "-L", "-f", str(tmp_path / "k-cert.pub")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "dt-user@dt-bastion" in out and "root" in out
    assert (
        run("host", "sign", str(tmp_path / "k.pub"), "--principals", "node-1,10.0.0.5").exit_code
        == 0
    )
    assert (
        "host certificate"
        in subprocess.run(
            ["ssh-keygen", "-L", "-f", str(tmp_path / "k-cert.pub")], capture_output=True, text=True
        ).stdout
    )
    run("lock", "--user", "ci")
    refused = run("auth", "sign", "--user", "ci", "--pubkey", str(tmp_path / "k.pub"))
    assert refused.exit_code == 7 and "locked" in refused.output


def test_nodes_devices_locks_and_audit(cluster, run):
    assert (
        run("nodes", "add", "node-1", "--addr", "10.0.0.5:22", "--labels", "env=prod").exit_code
        == 0
    )
    assert run("nodes", "add", "v6", "--addr", "[::1]:2222").exit_code == 0
    nodes = json.loads(run("nodes", "ls", "--format", "json").output)
    assert {n["name"]: n["port"] for n in nodes} == {"node-1": 22, "v6": 2222}
    assert "TrustedUserCAKeys" in run("nodes", "sshd-config", "node-1").output
    added = run("device", "add", "--asset-tag", "SN9", "--enroll")
    assert "dtclient device enroll --token" in added.output
    doc = json.loads(run("get", "device/SN9", "--format", "json").output)
    assert doc["spec"]["enroll_status"] == "not_enrolled" and doc["spec"]["id"]
    assert "was not enrolled" in run("device", "unenroll", "SN9").output
    run("lock", "--device", "SN9", "--message", "lost", "--ttl", "1h")
    locks = json.loads(run("lock", "ls", "--format", "json").output)
    assert locks[0]["target"] == "SN9" and locks[0]["expires"]
    assert run("lock", "rm", locks[0]["id"]).exit_code == 0
    assert run("lock", "rm", locks[0]["id"]).exit_code != 0  # gone: a clear NotFound
    lifted = json.loads(run("audit", "ls", "--type", "lock.delete", "--format", "json").output)
    assert lifted[-1]["device"] == "SN9" and "device SN9" in lifted[-1]["message"]
    assert run("cluster", "set", "device-trust-mode", "required").exit_code == 0
    events = json.loads(run("audit", "ls", "--format", "json").output)
    kinds = {e["event"] for e in events}
    assert {
        "cluster.init",
        "user.create",
        "node.create",
        "device.create",
        "token.create",
        "lock.create",
        "lock.delete",
        "cluster.update",
    } <= kinds
    tokens = json.loads(run("audit", "ls", "--type", "token.create", "--format", "json").output)
    assert [t["message"] for t in tokens if t["kind"] == "enroll"] == ["Device Enroll Token Created"]
    # the name it had before the one naming style still finds it
    old = json.loads(run("audit", "ls", "--type", "device.token.create", "--format", "json").output)
    assert old == tokens
    assert run("device", "rm", "SN9").exit_code == 0
