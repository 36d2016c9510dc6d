"""What a node installs: `dtadmin nodes helper` writes dt-node-principals as one file
that needs Python and cryptography, and nothing else of the bastion or its dependencies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cryptography
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from bastion.admin.nodes import node_state
from bastion.authz.records import User
from bastion.cluster import init_cluster

BIN = Path(sys.executable).parent
# The contract and the decision core: what the helper may load of the project.
ALLOWED_PROJECT = ("bastion", "bastion.node_principals", "bastion.protocol", "bastion.authz")
ALLOWED_THIRD_PARTY = {"cryptography", "cffi", "_cffi_backend", "bastion"}
# importtime also lists imports tried and failed: cryptography's optional bcrypt (not on
# the path given here) and the stdlib's Jython probe in `copy`.
PROBES = {"bcrypt", "org"}


@pytest.fixture
def cluster(tmp_path):
    c = init_cluster(tmp_path / "state", "install")
    c.store.add_user(User("alice", ("access",), ("root",)))
    yield c
    c.close()


def only_cryptography(tmp_path: Path) -> Path:
    """A directory holding cryptography (and its cffi) only, as a node's venv would."""
    site = Path(cryptography.__file__).parent.parent
    lib = tmp_path / "node-site"
    lib.mkdir()
    for entry in site.iterdir():
        if entry.name in ("cryptography", "cffi") or entry.name.startswith("_cffi_backend"):
            (lib / entry.name).symlink_to(entry)
    return lib


def test_the_helper_runs_with_nothing_but_cryptography(cluster, tmp_path):
    import json
    import time

    helper = tmp_path / "dt-node-principals"
    subprocess.run(
        [BIN / "dtadmin", "--state", str(cluster.state_dir), "nodes", "helper"]
        + ["--out", str(helper), "--python", sys.executable],
        check=True,
        capture_output=True,
    )
    assert os.stat(helper).st_mode & 0o777 == 0o755
    assert helper.read_bytes().startswith(f"#!{sys.executable}\n".encode())
    state = tmp_path / "state.json"
    state.write_text(json.dumps(node_state(cluster, now=time.time(), valid_for=600)))
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    key_type, blob = cluster.ca.sign_user("alice", key).openssh.split()[:2]
    ca = cluster.state_dir / "ca" / "user_ca.pub"
    # -S: no site-packages (neither the bastion's dependencies nor its own install);
    # -X importtime: every module it loads, on stderr.
    proc = subprocess.run(
        [sys.executable, "-S", "-X", "importtime", str(helper)]
        + ["--ca", str(ca), "--state", str(state), "root", key_type, blob],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(only_cryptography(tmp_path)), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    # optional mode (the default): a certificate without device extensions logs in
    assert proc.stdout == "root\n", proc.stderr
    loaded = {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    } - {"imported package"}
    project = {m for m in loaded if m == "bastion" or m.startswith("bastion.")}
    assert all(m == "bastion" or m.startswith(ALLOWED_PROJECT[1:]) for m in project), project
    assert not {m for m in project if m.startswith("bastion.protocol.console")}
    third_party = {m.split(".")[0] for m in loaded} - set(sys.stdlib_module_names)
    assert third_party <= ALLOWED_THIRD_PARTY | PROBES, third_party
