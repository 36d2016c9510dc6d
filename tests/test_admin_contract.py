"""dtadmin as people and scripts use it: the real process against a real state dir.

The JSON contract (bastion/protocol/console.py) on every list command, singular and
plural nouns, `get KIND`, `tokens ls/rm`, label filters, and the signup command that
`users add` prints.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from bastion.cluster import Cluster
from tests.tokens import printed_token

DTADMIN = Path(sys.executable).parent / "dtadmin"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
TIME_KEYS = {
    "created",
    "updated",
    "expires",
    "valid_after",
    "valid_before",
    "issued",
    "revoked",
    "used",
    "started",
    "time",
}


def dtadmin(state: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [DTADMIN, "--state", str(state), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    """One cluster with something in every list: users, nodes, devices, locks, tokens,
    certificates (64-bit serials)."""
    state = tmp_path_factory.mktemp("contract") / "state"
    dtadmin(state, "init", "--cluster", "contract.example")
    dtadmin(state, "users", "add", "alice", "--roles", "access", "--logins", "root")
    dtadmin(state, "users", "add", "bob", "--roles", "access,editor")
    dtadmin(state, "nodes", "add", "db-1", "--addr", "10.0.0.5:22", "--labels", "env=prod,team=db")
    dtadmin(state, "nodes", "add", "web-1", "--addr", "10.0.0.6:22", "--labels", "env=dev")
    dtadmin(state, "device", "add", "--asset-tag", "SN1", "--owner", "alice", "--enroll")
    dtadmin(state, "lock", "--user", "bob", "--message", "on leave", "--ttl", "1d")
    cluster = Cluster.open(state)
    try:
        from dataclasses import replace

        # what an enrollment ceremony records: the client's data, with an epoch time
        device = cluster.store.get_device("SN1")
        collected = ({"os_type": "linux", "time": 1767225600.25},)
        cluster.store.update_device(replace(device, collected_data=collected))
        for _ in range(3):
            cluster.ca.sign_user("alice", ed25519.Ed25519PrivateKey.generate().public_key())
    finally:
        cluster.close()
    return state


LISTS = [
    ("users", "ls"),
    ("roles", "ls"),
    ("nodes", "ls"),
    ("devices", "ls"),
    ("locks", "ls"),
    ("tokens", "ls"),
    ("certs", "ls"),
    ("sessions", "ls"),
    ("trust-root", "ls"),
    ("get", "users"),
    ("get", "roles"),
    ("get", "nodes"),
    ("get", "devices"),
]


def _check_values(where: str, value: object) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            if key in TIME_KEYS:
                assert inner is None or (isinstance(inner, str) and RFC3339.match(inner)), (
                    f"{where}.{key} = {inner!r} is not an RFC 3339 UTC time"
                )
            if key == "serial":
                assert inner is None or isinstance(inner, str), f"{where}.serial is {inner!r}"
            _check_values(f"{where}.{key}", inner)
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            _check_values(f"{where}[{i}]", inner)
    else:
        assert not isinstance(value, float), f"{where} = {value!r}: a float (an epoch time?)"
        assert not (isinstance(value, int) and abs(value) >= 2**53), f"{where} = {value}"


def test_every_list_command_prints_the_json_contract(state):
    """Lists are top-level arrays of objects, times RFC 3339, serials strings (certs ls
    printed serials as JSON numbers, which jq rounds, and times as epoch floats)."""
    for args in LISTS:
        data = json.loads(dtadmin(state, *args, "--format", "json").stdout)
        assert isinstance(data, list), args
        assert all(isinstance(item, dict) for item in data), args
        _check_values(" ".join(args), data)
    cluster = Cluster.open(state)
    try:
        serials = {str(c.serial) for c in cluster.store.list_certs()}
    finally:
        cluster.close()
    listed = json.loads(dtadmin(state, "certs", "ls", "--format", "json").stdout)
    assert {c["serial"] for c in listed} == serials and len(serials) == 3


NOUNS = ("user", "role", "node", "device", "lock", "token", "cert", "session")


def test_every_noun_answers_to_singular_and_plural(state):
    """`dtadmin users` but `dtadmin device`, `lock`, `cert`: now each answers to both."""
    for noun in NOUNS:
        singular = dtadmin(state, noun, "ls", "--format", "json").stdout
        assert singular == dtadmin(state, f"{noun}s", "ls", "--format", "json").stdout, noun
    # --help shows each group once, by its plural
    commands = dtadmin(state, "--help").stdout
    for noun in NOUNS:
        listed = rf"^\W*{noun}s\s"  # a Rich box or plain help alike
        assert re.search(listed, commands, re.M), (noun, commands)
        assert not re.search(rf"^\W*{noun}\s", commands, re.M), (noun, commands)


def test_get_roles_prints_every_role(state):
    names = {
        r["metadata"]["name"]
        for r in json.loads(dtadmin(state, "get", "roles", "--format", "json").stdout)
    }
    assert {"access", "auditor", "editor", "device-admin", "require-trusted-device"} <= names
    text = dtadmin(state, "get", "roles").stdout
    assert text.count("kind: role") == len(names) and text.count("---") == len(names)
    assert dtadmin(state, "get", "role/access").stdout.count("kind: role") == 1
    bad = dtadmin(state, "get", "widgets", check=False)
    assert bad.returncode == 2 and "roles/NAME" in bad.stderr


def test_nodes_ls_filters_by_labels(state):
    def names(*selectors):
        out = dtadmin(state, "nodes", "ls", *selectors, "--format", "json").stdout
        return [n["name"] for n in json.loads(out)]

    assert names() == ["db-1", "web-1"]
    assert names("env=prod") == ["db-1"]
    assert names("env=prod", "team=db") == ["db-1"]
    assert names("env=prod", "team=web") == []
    refused = dtadmin(state, "nodes", "ls", "envprod", check=False)
    assert refused.returncode == 2 and "key=value" in refused.stderr


def test_tokens_ls_and_rm_never_show_the_secret(tmp_path):
    state = tmp_path / "state"
    dtadmin(state, "init", "--cluster", "tokens.example")
    signup = printed_token(dtadmin(state, "users", "add", "carol", "--roles", "access").stdout)
    enroll = printed_token(dtadmin(state, "device", "add", "--asset-tag", "SN7", "--enroll").stdout)
    listing = dtadmin(state, "tokens", "ls", "--format", "json").stdout
    text = dtadmin(state, "tokens", "ls").stdout
    assert signup not in listing + text and enroll not in listing + text
    tokens = {t["kind"]: t for t in json.loads(listing)}
    assert tokens["signup"]["user"] == "carol" and tokens["signup"]["status"] == "unused"
    assert tokens["enroll"]["device"] == "SN7" and tokens["enroll"]["used"] is None
    assert "user carol" in text and "device SN7" in text
    # rm by the ID ls shows; the token no longer works
    removed = dtadmin(state, "tokens", "rm", tokens["signup"]["id"])
    assert "removed" in removed.stdout
    left = json.loads(dtadmin(state, "token", "ls", "--format", "json").stdout)
    assert [t["kind"] for t in left] == ["enroll"]
    cluster = Cluster.open(state)
    try:
        from bastion.credentials import token_hash

        assert cluster.store.find_token(token_hash(signup), "signup") is None
        events = cluster.store.list_audit(type="token.delete")
        assert events and "carol" in events[-1].message
    finally:
        cluster.close()
    missing = dtadmin(state, "tokens", "rm", "abcdef123456", check=False)
    assert missing.returncode == 3 and "not found" in missing.stderr
    bad = dtadmin(state, "tokens", "rm", "zz", check=False)
    assert bad.returncode == 2


def test_users_add_prints_the_real_address_and_ca_pin(tmp_path):
    """It printed `dtclient signup --proxy <bastion-host>:3022` and no --ca-pin."""
    state = tmp_path / "state"
    dtadmin(state, "init", "--cluster", "signup.example")
    host_ca = json.loads(
        dtadmin(state, "ca", "export", "--type", "host", "--format", "json").stdout
    )
    unset = dtadmin(state, "users", "add", "dave", "--roles", "access")
    assert f"--ca-pin {host_ca['fingerprint']}" in unset.stdout
    assert "<bastion-host>" not in unset.stdout
    assert "dtadmin cluster set public-addr" in unset.stderr
    assert dtadmin(
        state, "cluster", "set", "public-addr", "bastion.example.com"
    ).stdout.strip() == ("public-addr is now bastion.example.com:3022")
    again = dtadmin(state, "users", "reset", "dave")
    assert (
        f"dtclient signup --proxy bastion.example.com:3022 --ca-pin {host_ca['fingerprint']}"
        in again.stdout
    )
    assert "public-addr" not in again.stderr
    dtadmin(state, "cluster", "set", "public-addr", "[2001:db8::1]:2222")
    assert "--proxy [2001:db8::1]:2222 " in dtadmin(state, "users", "reset", "dave").stdout
    bad = dtadmin(state, "cluster", "set", "public-addr", "not a host", check=False)
    assert bad.returncode == 2 and "invalid host" in bad.stderr


def test_the_exit_codes_in_the_docs_are_the_ones_the_commands_use():
    """docs/getting-started.md, "Scripting", lists every error's exit code and code name."""
    from bastion.protocol import errors

    docs = (Path(__file__).resolve().parent.parent / "docs" / "getting-started.md").read_text()
    table = {}
    for line in docs[docs.index("## 6. Scripting") :].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].isdigit():
            table[int(cells[0])] = set(re.findall(r"`([a-z_]+)`", cells[1]))

    def walk(cls):
        yield cls
        for sub in cls.__subclasses__():
            yield from walk(sub)

    for cls in walk(errors.DTError):
        if cls.__module__ != errors.__name__:
            continue  # a shell's private refinement keeps its parent's code
        assert cls.code in table.get(cls.exit_code, set()), (cls.__name__, cls.exit_code)
    # and a real failure ends with the documented code
    missing = subprocess.run(
        [DTADMIN, "--state", "/nonexistent/dt-state", "users", "ls"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == errors.StateError.exit_code and "error:" in missing.stderr
