"""Shipping the audit log: `dtadmin audit export` (stdout, file, syslog) and
`dtadmin audit ls --follow`, driven as an admin runs them: separate processes, a real
terminal for Ctrl-C, real unix and UDP sockets for syslog."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pexpect
import pytest

from tests.test_audit_chain import BIN, dtadmin, verify


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    state = tmp_path_factory.mktemp("export-template") / "state"
    dtadmin(state, "init", "--cluster", "export")
    dtadmin(state, "users", "add", "alice", "--roles", "access", "--logins", "root")
    return state


@pytest.fixture
def state(template, tmp_path):
    return Path(shutil.copytree(template, tmp_path / "state"))


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_export_to_stdout_is_json_lines_with_checkpoints_and_filters(state):
    out = lines(dtadmin(state, "audit", "export").stdout)
    events = [o for o in out if o["event"] != "audit.checkpoint"]
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert {"cluster.init", "user.create", "token.create"} <= {e["event"] for e in events}
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", e["time"]) for e in events)
    (cp,) = [o for o in out if o["event"] == "audit.checkpoint"]
    assert cp["row_id"] == 1 and out.index(cp) == 1  # right after the row it signs
    only = lines(dtadmin(state, "audit", "export", "--type", "user.create").stdout)
    assert [o["event"] for o in only if "id" in o] == ["user.create"]
    assert lines(dtadmin(state, "audit", "export", "--since", "2099-01-01T00:00:00").stdout) == [
        o for o in lines(dtadmin(state, "audit", "export", "--since", "2099-01-01").stdout)
    ]
    bad = dtadmin(state, "audit", "export", "--type", "user.made", check=False)
    assert bad.returncode == 2 and "unknown event type 'user.made'" in bad.stderr


def test_export_to_a_file_appends_and_resumes_after_the_last_id(state, tmp_path):
    target = tmp_path / "siem" / "audit.jsonl"
    target.parent.mkdir()
    dtadmin(state, "audit", "export", "-o", str(target))
    first = lines(target.read_text())
    assert target.stat().st_mode & 0o777 == 0o600
    dtadmin(state, "users", "add", "bob", "--roles", "access", "--logins", "root")
    dtadmin(state, "audit", "verify", "--checkpoint")
    dtadmin(state, "audit", "export", "-o", str(target))  # a rerun: only what is new
    dtadmin(state, "audit", "export", "-o", str(target))  # and again: nothing
    whole = lines(target.read_text())
    assert whole[: len(first)] == first
    ids = [o["id"] for o in whole if o["event"] != "audit.checkpoint"]
    assert ids == list(range(1, ids[-1] + 1))  # no gap, no duplicate
    checkpoints = [o["checkpoint"] for o in whole if o["event"] == "audit.checkpoint"]
    assert checkpoints == [1, 2]
    # the export is a checkpoint kept elsewhere: verify against it
    assert verify(state, "--against", str(target)).returncode == 0


def test_export_to_syslog_over_a_unix_socket_and_udp(state, tmp_path):
    path = str(tmp_path / "log.sock")
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        unix.bind(path)
        udp.bind(("127.0.0.1", 0))
        unix.settimeout(10)
        udp.settimeout(10)
        dtadmin(state, "audit", "export", "--syslog", path, "--no-checkpoints")
        got = [unix.recv(65536).decode() for _ in range(3)]
        port = udp.getsockname()[1]
        dtadmin(
            state, "audit", "export", "--syslog", f"udp:127.0.0.1:{port}", "--type", "user.create"
        )
        over_udp = [udp.recv(65536).decode() for _ in range(2)]  # the checkpoint, then it
    finally:
        unix.close()
        udp.close()
    rfc5424 = re.compile(
        r"<(\d+)>1 (\S+Z) (\S+) dt-bastion (\d+) ([a-z]+\.[a-z]+) \[dt@32473 id=\"(\d+)\""
        r" code=\"(DT\d{4}[IW])\"\] (\{.*\})$"
    )
    first = rfc5424.match(got[0])
    assert first, got[0]
    assert first.group(1) == str(10 * 8 + 6)  # authpriv.info
    assert first.group(5) == "cluster.init" and json.loads(first.group(8))["id"] == 1
    assert 'audit.checkpoint [dt@32473 id="1"]' in over_udp[0]
    m = rfc5424.match(over_udp[1])
    assert m and m.group(5) == "user.create" and json.loads(m.group(8))["user"] == "alice"
    refused = dtadmin(state, "audit", "export", "--syslog", str(tmp_path / "nothing"), check=False)
    assert refused.returncode == 2 and "cannot send to syslog" in refused.stderr


def test_ls_follow_shows_events_from_other_processes_until_ctrl_c(state):
    follow = pexpect.spawn(
        str(BIN / "dtadmin"),
        ["--state", str(state), "audit", "ls", "--follow", "--limit", "1"],
        encoding="utf-8",
        timeout=30,
        dimensions=(40, 200),
    )
    try:
        follow.expect("token.create")  # the newest event, then it waits
        dtadmin(state, "lock", "--user", "alice", "--message", "laptop reported lost")
        follow.expect("lock.create")
        follow.expect("laptop reported lost")
        follow.sendcontrol("c")
        follow.expect(pexpect.EOF)
    finally:
        follow.close()
    assert follow.exitstatus == 0, follow.before
    assert "Traceback" not in follow.before and "interrupted" not in follow.before


def test_export_follow_as_json_lines_ends_cleanly_on_sigint(state, tmp_path):
    proc = subprocess.Popen(
        [str(BIN / "dtadmin"), "--state", str(state), "audit", "export", "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen = []
        while not any(o.get("event") == "user.create" for o in seen):
            seen.append(json.loads(proc.stdout.readline()))
        dtadmin(state, "users", "add", "dave", "--roles", "access", "--logins", "root")
        while not any(o.get("user") == "dave" for o in seen):
            seen.append(json.loads(proc.stdout.readline()))
        proc.send_signal(subprocess.signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "Traceback" not in err, err
