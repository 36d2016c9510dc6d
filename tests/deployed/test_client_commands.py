"""`dtclient config`, `dtclient ssh` and `dtclient ls` as a user runs them beside their own
~/.ssh/config: the written config touches only this cluster's jump host and nodes, ssh's
own options pass through `dtclient ssh`, and `ls` filters on labels like `tsh ls env=prod`.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.deployed.deployment import Deployment
from tests.deployed.people import Person
from tests.deployed.processes import LOGIN

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def carol(deployment: Deployment) -> Person:
    """A user who may reach node-1 (env=test) and db-1 (env=prod, role=db)."""
    deployment.admin(
        "nodes", "add", "db-1", "--addr", "127.0.0.1:9", "--labels", "env=prod,role=db"
    )
    return deployment.sign_up("carol", "access")


def ssh_g(config: Path, host: str, env: dict[str, str]) -> dict[str, list[str]]:
    """What `ssh -G` resolves for ``host`` under ``config``: option -> values."""
    out = subprocess.run(
        ["ssh", "-G", "-F", str(config), host],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    found: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        found.setdefault(key, []).append(value)
    return found


def test_config_names_only_this_clusters_jump_host_and_nodes(deployment: Deployment, carol: Person):
    text = carol.dtclient("config").stdout
    config = carol.home / "written_ssh_config"
    config.write_text(text)
    key = str(carol.home / ".dt" / "clusters" / deployment.cluster / "keys" / "id_ed25519")
    jump = f"dt-{deployment.cluster}"

    # 1. Hosts of the user's own: untouched (no jump, no dt key).
    for foreign in ("github.com", "git@github.com", "example.org", "10.1.2.3", "bastion"):
        opts = ssh_g(config, foreign, carol.env)
        assert "proxyjump" not in opts, f"{foreign} goes through the bastion:\n{text}"
        assert key not in opts.get("identityfile", []), f"{foreign} gets the dt key:\n{text}"

    # 2. The cluster's nodes, by inventory name and NAME.CLUSTER: through dt-CLUSTER.
    for name, node in (("node-1", "node-1"), (f"db-1.{deployment.cluster}", "db-1")):
        opts = ssh_g(config, f"{LOGIN}@{name}", carol.env)
        assert opts.get("proxyjump") == [jump], f"{name}: {opts.get('proxyjump')}\n{text}"
        assert opts["hostname"] == [node]
        assert opts["identityfile"] == [key]

    # 3. The jump host, named after the cluster, is the bastion with the dt key.
    opts = ssh_g(config, jump, carol.env)
    assert opts["hostname"] == ["127.0.0.1"] and opts["port"] == [str(deployment.bastion.port)]
    assert opts["user"] == ["dt"] and opts["identityfile"] == [key]
    assert "proxyjump" not in opts

    # 4. Plain stock ssh with the written config reaches the node, both ways of naming it.
    for name in ("node-1", f"node-1.{deployment.cluster}"):
        proc = subprocess.run(
            ["ssh", "-F", str(config), "-o", "BatchMode=yes", f"{LOGIN}@{name}", "echo", "reached"],
            env=carol.env,
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 0 and "reached" in proc.stdout, proc.stderr


def dtclient_ssh(person: Person, *args: str) -> subprocess.CompletedProcess[str]:
    return person.dtclient("ssh", *args, ok=False)


def test_ssh_passes_sshs_own_options_through(deployment: Deployment, carol: Person):
    # 1. -v is ssh's, not the destination.
    proc = dtclient_ssh(carol, "-v", "-o", "BatchMode=yes", f"{LOGIN}@node-1", "echo", "hi")
    assert proc.returncode == 0 and proc.stdout.strip() == "hi", proc.stderr
    assert "debug1:" in proc.stderr, "ssh -v's debug lines are missing"

    # 2. Options after `--`, an argument option (-l) instead of LOGIN@, bundled values
    #    (-oX=Y) and the NODE.CLUSTER form.
    proc = dtclient_ssh(
        carol, "--", "-l", LOGIN, "-oBatchMode=yes", f"node-1.{deployment.cluster}", "echo", "ok"
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr

    # 3. The remote command keeps its own options; the remote exit code comes back.
    proc = dtclient_ssh(carol, "-o", "BatchMode=yes", f"{LOGIN}@node-1", "sh", "-c", "'exit 7'")
    assert proc.returncode == 7, proc.stderr

    # 4. A bad ssh command line is refused in one line, before ssh runs.
    for args, message in (
        (["-p"], "ssh option -p needs a value"),
        (["-Z", "node-1"], "unknown ssh option -Z"),
        (["-v"], "give a destination"),
    ):
        proc = dtclient_ssh(carol, *args)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)


def test_ls_filters_on_labels(carol: Person):
    def names(*args: str) -> list[str]:
        out = carol.dtclient("ls", *args, "--format", "json").stdout
        return sorted(n["name"] for n in json.loads(out))

    assert names() == ["db-1", "node-1"]
    assert names("env=prod") == ["db-1"]
    assert names("env=prod", "role=db") == ["db-1"]
    assert names("env=prod", "role=web") == []
    assert names("env=test") == ["node-1"]

    table = carol.dtclient("ls", "env=prod").stdout
    assert "db-1" in table and "node-1" not in table, table
    empty = carol.dtclient("ls", "team=none").stdout
    assert "(no nodes you may reach with team=none)" in empty, empty

    proc = carol.dtclient("ls", "prod", ok=False)
    assert proc.returncode == 2 and "label filter 'prod' is not KEY=VALUE" in proc.stderr
