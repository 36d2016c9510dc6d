"""`dt-bastion serve` as systemd runs it: SIGHUP reloads, SIGTERM drains, readiness on
$NOTIFY_SOCKET, /metrics and /healthz on a listener of their own.

Each test restarts the module's bastion with the options it needs (same state, same
port), sends real signals, reads the bastion's own log lines and talks HTTP to it; the
users hold real `ssh -J` sessions through it to the stock sshd node.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.deployed.deployment import Bastion, Deployment
from tests.deployed.processes import free_port, listening, wait_for
from tests.sshd import notice

pytestmark = pytest.mark.integration


def restart(d: Deployment, *args: str, env: dict[str, str] | None = None) -> Bastion:
    d.stop_bastion()
    return d.start_bastion(*args, env=env)


def logged(bastion: Bastion, text: str, timeout: float = 15) -> str:
    """Wait for ``text`` in the bastion's log; the log."""
    return wait_for(
        f"the bastion to log {text!r}", lambda: text in bastion.log() and bastion.log(), timeout
    )


def http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus exposition (labels in any order); 0 if absent."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
        if match and match.group(1) == name:
            have = dict(re.findall(r'([a-z_]+)="([^"]*)"', match.group(2) or ""))
            if have == labels:
                return float(match.group(3))
    return 0.0


# -- SIGTERM: drain ------------------------------------------------------------------------------


def test_sigterm_drains_sessions_then_cuts_the_rest_with_the_reason(
    deployment: Deployment, tmp_path: Path
):
    d = deployment
    metrics = free_port()
    bastion = restart(d, "--set", "drain_timeout=120", "--metrics-listen", str(metrics))
    assert http(metrics, "/healthz") == (200, "ok\n")
    dora = d.sign_up("dora")
    done = tmp_path / "finish-now"
    finishing = dora.hold_until(done)
    lingering = dora.hold()

    bastion.proc.send_signal(signal.SIGTERM)
    logged(bastion, "dt-bastion stopping: draining")
    assert not listening(bastion.port), "the bastion still accepts connections while draining"
    status, body = http(metrics, "/healthz")
    assert status == 503 and "draining" in body, (status, body)
    assert finishing.alive() and lingering.alive(), "draining cut a session at once"

    done.touch()  # the first session ends on its own, whole
    out, err = finishing.proc.communicate(timeout=30)
    assert finishing.proc.returncode == 0 and "finished" in out, (out, err)
    assert lingering.alive() and bastion.proc.poll() is None

    bastion.proc.send_signal(signal.SIGTERM)  # the admin will not wait: cut now
    assert lingering.wait_cut(30) is not None, "the second SIGTERM did not cut the session"
    _, err = lingering.proc.communicate(timeout=10)
    assert "shutting down" in err, f"ssh -J was not told why: {err!r}"
    assert bastion.proc.wait(30) == 0, bastion.log()
    log = bastion.log()
    assert "drain over (a second stop signal): cutting 1 session(s)" in log, log
    drains = d.audit("bastion.drain")
    assert drains and "2 session(s)" in drains[-1]["message"], drains
    cut = [
        e for e in d.audit("connection.terminated", user="dora") if "shutting down" in e["message"]
    ]
    assert cut, d.audit(user="dora")


def test_the_drain_deadline_cuts_what_is_left_and_exits_zero(deployment: Deployment):
    d = deployment
    bastion = restart(d, "--set", "drain_timeout=1")
    erin = d.sign_up("erin")
    held = erin.hold()
    bastion.proc.send_signal(signal.SIGTERM)
    assert held.wait_cut(30) is not None, "the session outlived the drain deadline"
    _, err = held.proc.communicate(timeout=10)
    assert "shutting down" in err, err
    assert bastion.proc.wait(30) == 0, bastion.log()
    assert "drain over (1 s passed)" in bastion.log(), bastion.log()


# -- SIGHUP: reload ---------------------------------------------------------------------------


def test_sighup_applies_the_new_config_and_refuses_a_bad_one(
    deployment: Deployment, tmp_path: Path
):
    d = deployment
    config = tmp_path / "bastion.toml"
    config.write_text("[bastion]\nmax_connections_per_source = 200\n")
    bastion = restart(d, "--config", str(config))
    fay = d.sign_up("fay")
    held = fay.hold()
    assert fay.can_reach(), "a second connection was refused before the reload"

    config.write_text(
        '[bastion]\nmax_connections_per_source = 1\nlog_level = "debug"\n'
        'proxy_protocol_from = ["10.0.0.0/8"]\n'
    )
    bastion.proc.send_signal(signal.SIGHUP)
    log = logged(bastion, "reload: needs a restart")
    assert "reload applied: log_level info -> debug; max_connections_per_source 200 -> 1" in log, (
        log
    )
    assert "proxy_protocol_from (none) -> 10.0.0.0/8" in log.split("needs a restart")[1], log
    assert not fay.can_reach(), "max_connections_per_source = 1 was not applied"
    assert held.alive() and listening(bastion.port), "the reload dropped a session or the port"

    config.write_text("[bastion]\nmax_connections_per_source = 200\nlisten_prot = 4\n")
    bastion.proc.send_signal(signal.SIGHUP)
    log = logged(bastion, "reload refused")
    assert "unknown setting 'listen_prot'" in log.split("reload refused")[1], log
    assert not fay.can_reach(), "a refused reload changed the running limits"
    assert bastion.proc.poll() is None and held.alive()

    config.write_text("[bastion]\nmax_connections_per_source = 200\n")
    bastion.proc.send_signal(signal.SIGHUP)
    logged(bastion, "max_connections_per_source 1 -> 200")
    assert fay.can_reach(), "reloading back to 200 did not lift the limit"
    held.close()
    rows = [e["message"] for e in d.audit("bastion.reload")]
    assert any("reload refused" in m for m in rows) and any("applied" in m for m in rows), rows


# -- systemd readiness ------------------------------------------------------------------------


def test_readiness_reload_and_stop_are_told_to_systemd(
    deployment: Deployment, notify_socket: socket.socket
):
    d = deployment
    address = notify_socket.getsockname()
    bastion = restart(d, env={"NOTIFY_SOCKET": address})
    ready = notice(notify_socket)
    assert ready.get("READY") == "1" and ready.get("MAINPID") == str(bastion.proc.pid), ready
    assert listening(bastion.port), "READY=1 came before the bastion listened"

    bastion.proc.send_signal(signal.SIGHUP)
    reloading = notice(notify_socket)
    assert reloading.get("RELOADING") == "1" and int(reloading["MONOTONIC_USEC"]) > 0, reloading
    assert notice(notify_socket).get("READY") == "1"

    bastion.proc.send_signal(signal.SIGTERM)
    assert notice(notify_socket).get("STOPPING") == "1"
    assert bastion.proc.wait(30) == 0


# -- /metrics and /healthz ------------------------------------------------------------------------


def test_metrics_count_connections_sessions_logins_and_refusals(deployment: Deployment):
    d = deployment
    port = free_port()
    bastion = restart(d, "--metrics-listen", f"127.0.0.1:{port}")
    logged(bastion, f"/metrics and /healthz on http://127.0.0.1:{port}")
    gwen = d.sign_up("gwen")
    held = gwen.hold()
    status, text = http(port, "/metrics")
    assert status == 200
    assert "dt_bastion_build_info{" in text and 'version="' in text
    assert sample(text, "dt_bastion_sessions_open") == 1.0, text
    assert sample(text, "dt_bastion_connections_open") >= 1.0
    assert sample(text, "dt_bastion_certificates_issued_total") >= 1.0
    assert sample(text, "dt_bastion_auth_total", result="allowed", reason="certificate") >= 1.0, [
        line for line in text.splitlines() if "auth" in line
    ]
    assert 'dt_bastion_storage_seconds_count{lane="read"}' in text
    assert 'dt_bastion_storage_queue{lane="write"}' in text
    held.close()

    d.lock_user("gwen")
    assert not gwen.can_reach()

    def denied() -> float:  # audited once the refused connection has ended
        return sample(
            http(port, "/metrics")[1], "dt_bastion_auth_total", result="denied", reason="locked"
        )

    wait_for("the locked user's refusal to be counted", denied)
    assert http(port, "/nothing")[0] == 404
    assert not listening_ssh_on(port), "the metrics port answered SSH"


def listening_ssh_on(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"SSH-2.0-probe\r\n")
        s.settimeout(5)
        try:
            return s.recv(64).startswith(b"SSH-")
        except (TimeoutError, ConnectionError):
            return False


def test_json_logs_are_one_object_per_line_without_nones(deployment: Deployment):
    d = deployment
    bastion = restart(d, "--log-format", "json")
    hana = d.sign_up("hana")
    assert hana.can_reach()
    d.stop_bastion()
    lines = [line for line in bastion.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines if not line.startswith("dt-bastion ready on")]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert not any("None" in line for line in lines), [line for line in lines if "None" in line]
    starts = [r for r in records if r.get("event") == "session.start"]
    assert starts and starts[0]["user"] == "hana" and starts[0]["result"] == "allow", starts


def host_cert_principals(port: int, tmp_path: Path) -> list[str]:
    """The principals of the host certificate the bastion offers a new connection."""
    scan = subprocess.run(
        ["ssh-keyscan", "-c", "-p", str(port), "127.0.0.1"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    cert = next(line for line in scan.stdout.splitlines() if "-cert-v01@openssh.com" in line)
    path = tmp_path / "scanned-cert.pub"
    path.write_text(cert[cert.index("ssh-") :] + "\n")  # `-c` prints no host field
    shown = subprocess.run(
        ["ssh-keygen", "-L", "-f", str(path)], capture_output=True, text=True, timeout=30
    )
    block = shown.stdout.split("Principals:")[1].split("Critical Options:")[0]
    return block.split()


def test_sighup_re_signs_the_host_certificate_for_new_host_names(
    deployment: Deployment, tmp_path: Path
):
    d = deployment
    config = tmp_path / "bastion.toml"
    config.write_text('[bastion]\nhost_names = ["old.example"]\n')
    bastion = restart(d, "--config", str(config))
    assert host_cert_principals(bastion.port, tmp_path) == ["old.example"]
    config.write_text('[bastion]\nhost_names = ["new.example", "127.0.0.1"]\n')
    bastion.proc.send_signal(signal.SIGHUP)
    logged(bastion, "host_names old.example -> new.example,127.0.0.1")
    assert host_cert_principals(bastion.port, tmp_path) == ["new.example", "127.0.0.1"]
    d.stop_bastion()  # the next test gets a bastion with the usual names
