"""The ssh_config `dtclient config` writes: this cluster's names only, and nothing the
bastion sends (cluster or node names) can add a directive of its own."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from client.profile import Home, Profile, config_node_names, jump_alias, ssh_config

KEYWORDS = {
    "Host",
    "HostName",
    "Port",
    "User",
    "HostKeyAlias",
    "IdentityFile",
    "CertificateFile",
    "IdentitiesOnly",
    "UserKnownHostsFile",
    "StrictHostKeyChecking",
    "ProxyJump",
}


def profile(cluster: str = "example.com") -> Profile:
    return Profile(proxy="bastion.example.com:3022", user="alice", cluster=cluster)


def directives(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines() if line.strip() and line[0] != "#"]


def test_jump_alias_is_prefixed_and_safe():
    assert jump_alias("example.com") == "dt-example.com"
    assert jump_alias("a@b c\nd") == "dt-a-b-c-d"


def test_hostile_names_add_no_directive(tmp_path: Path):
    evil = "x\nHost *\n    ProxyCommand touch /tmp/pwned"
    nodes = ["node-1", evil, "a b", "root@node", "*", "-oProxyCommand=x", "web,db", "db-1"]
    good, bad = config_node_names(nodes)
    assert good == ["node-1", "db-1"]
    assert set(bad) == set(nodes) - set(good)
    text = ssh_config(profile(evil), Home(tmp_path), nodes)
    assert set(directives(text)) <= KEYWORDS, text
    assert all("\n" not in line for line in text.split("\n"))  # each name on its own line
    assert [line for line in text.splitlines() if line.startswith("Host ")] == [
        f"Host {jump_alias(evil)}",
        f"Host node-1 node-1.{jump_alias(evil)[3:]}",
        f"Host db-1 db-1.{jump_alias(evil)[3:]}",
    ]


@pytest.mark.parametrize("host", ["github.com", "example.com", "other.example.com", "node-2"])
def test_ssh_reads_no_jump_for_other_hosts(tmp_path: Path, host: str):
    config = tmp_path / "config"
    config.write_text(ssh_config(profile(), Home(tmp_path), ["node-1"]))
    out = subprocess.run(
        ["ssh", "-G", "-F", str(config), host], capture_output=True, text=True, check=True
    ).stdout
    assert "proxyjump" not in out and str(tmp_path / "keys") not in out
