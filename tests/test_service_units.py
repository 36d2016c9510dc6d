"""The pure parts of running dt-bastion as a service: what a reload changes and how it
says so, the JSON log line, the denial reasons metrics count, sd_notify's datagram."""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile

import pytest

from bastion.config import BastionConfig, load_config, metrics_address
from bastion.protocol.errors import UsageError
from bastion.service import reload
from bastion.service.logs import TEXT_FORMAT, JsonFormatter, OneLineFormatter
from bastion.service.metrics import Metrics, denial_reason
from bastion.service.notify import Notifier


def test_a_reload_sorts_changes_into_live_and_restart():
    old = BastionConfig()
    new = BastionConfig(listen_port=4022, max_connections=10, kex_algs=("curve25519-sha256",))
    changed = reload.changes(old, new)
    assert set(changed) == {"listen_port", "max_connections", "kex_algs"}
    assert "listen_port" in reload.RESTART and "max_connections" in reload.LIVE
    assert "kex_algs" in reload.LIVE and not reload.LIVE & reload.RESTART
    said = reload.described(changed)
    assert "max_connections 20000 -> 10" in said and "kex_algs " in said
    assert "None" not in said and "'" not in said  # no reprs


def test_service_settings_are_checked():
    assert load_config(None, log_level="DEBUG").log_level == "debug"
    with pytest.raises(UsageError, match="debug, info, warning, error"):
        load_config(None, log_level="verbose")
    with pytest.raises(UsageError, match="text, json"):
        load_config(None, log_format="xml")
    with pytest.raises(UsageError, match="is the SSH port"):
        load_config(None, metrics_listen="3022")
    with pytest.raises(UsageError, match="metrics_listen"):
        load_config(None, metrics_listen="localhost")
    assert metrics_address("9322") == ("127.0.0.1", 9322)
    assert metrics_address("[::1]:9322") == ("::1", 9322)


def record(msg: str, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("bastion.audit", logging.INFO, __file__, 1, msg, (), None)
    rec.__dict__.update(extra)
    return rec


def test_json_log_lines_are_one_object_and_leave_unset_fields_out():
    line = JsonFormatter().format(
        record("forged\nDT3101I session.start", audit={"event": "auth.failed", "user": None})
    )
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "forged\nDT3101I session.start" and entry["event"] == "auth.failed"
    assert "user" not in entry and entry["time"].endswith("Z") and entry["level"] == "info"
    text = OneLineFormatter(TEXT_FORMAT).format(record("a\nb"))
    assert "\n" not in text and "a\\nb" in text


@pytest.mark.parametrize(
    "message, reason",
    [
        ("certificate serial 7 has been revoked", "revoked"),
        ("certificate is signed by an unknown CA (SHA256:x)", "untrusted_ca"),
        ("certificate has expired or is not yet valid (run: dtclient login)", "expired"),
        ("user alice is locked: laptop reported lost", "locked"),
        ("too many failed logins from this address", "rate_limit"),
        ("something new", "other"),
    ],
)
def test_denials_are_counted_under_a_bounded_reason(message, reason):
    assert denial_reason(message) == reason


def test_metrics_expose_build_info_without_a_bastion():
    text = Metrics().exposition().decode()
    assert "dt_bastion_build_info{" in text and "_created" not in text


def test_notify_sends_one_datagram_of_key_value_lines():
    folder = tempfile.mkdtemp(dir="/tmp")
    path = os.path.join(folder, "n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        Notifier(path).ready("serving")
        lines = sock.recv(4096).decode().splitlines()
    os.unlink(path)
    os.rmdir(folder)
    assert lines[0] == "READY=1" and "STATUS=serving" in lines
    Notifier("").ready("nobody listens")  # no NOTIFY_SOCKET: nothing, no error


def test_healthz_is_503_once_the_cluster_database_does_not_answer(dt_cluster):
    """The real Bastion and HTTP listener in this process: 200 while its workers
    answer, 503 naming storage once they cannot (closed, as when the disk is gone)."""
    import asyncio
    import urllib.error
    import urllib.request

    from bastion.proxy.server import Bastion
    from bastion.service.metrics import MetricsServer
    from bastion.service.run import Service

    def get(port: int) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    async def scenario() -> list[tuple[int, str]]:
        config = BastionConfig(state_dir=dt_cluster.state_dir)
        service = Service(lambda: config, config)
        service.bastion = bastion = Bastion(dt_cluster, config)
        server = MetricsServer(service.metrics, service.health)
        port = int((await server.start("127.0.0.1", 0)).rsplit(":", 1)[1])
        loop = asyncio.get_running_loop()
        try:
            seen = [await loop.run_in_executor(None, get, port)]
            bastion.workers.close()
            seen.append(await loop.run_in_executor(None, get, port))
            service.draining = True
            seen.append(await loop.run_in_executor(None, get, port))
        finally:
            server.close()
            await server.wait_closed()
            bastion.close()
        return seen

    ok, down, draining = asyncio.run(scenario())
    assert ok == (200, "ok\n")
    assert down[0] == 503 and down[1].startswith("storage:"), down
    assert draining[0] == 503 and "draining" in draining[1], draining
