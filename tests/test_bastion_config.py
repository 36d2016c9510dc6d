"""dt-bastion's configuration: defaults < TOML file < --set < dedicated options."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.config import BastionConfig, load_config, parse_listen, parse_setting
from bastion.protocol.errors import UsageError
from tests.deployed.processes import free_port

DT_BASTION = Path(sys.executable).parent / "dt-bastion"


def test_safe_defaults():
    cfg = BastionConfig()
    assert cfg.listen_port == 3022 and cfg.login_timeout <= 60
    assert cfg.keepalive_interval > 0 and cfg.keepalive_count_max > 0
    assert 0 < cfg.max_connections_per_source < cfg.max_connections
    assert cfg.revision_poll_interval <= 0.25  # live revocation within a second
    # keystrokes beside a bulk transfer wait for at most one such read (bench: interactive)
    assert 4096 <= cfg.socket_read_size <= 64 * 1024


def test_socket_read_size_reaches_asyncio():
    from asyncio import selector_events

    from bastion.server_cli import _tune_socket_reads

    transport = selector_events._SelectorSocketTransport
    before = transport.max_size
    try:
        _tune_socket_reads(32768)
        assert transport.max_size == 32768
        _tune_socket_reads(1)  # never below one page
        assert transport.max_size == 4096
    finally:
        transport.max_size = before


@pytest.mark.parametrize(
    "item, expected",
    [
        ("max_connections_per_source=5", ("max_connections_per_source", 5)),
        ("login-timeout=2.5", ("login_timeout", 2.5)),
        ("revision_poll_interval = 0.1", ("revision_poll_interval", 0.1)),
        ('host_names=["a.example", "b.example"]', ("host_names", ["a.example", "b.example"])),
        ("listen_host=::1", ("listen_host", "::1")),
        ("state_dir=/srv/dt", ("state_dir", "/srv/dt")),
    ],
)
def test_set_reads_toml_values(item, expected):
    assert parse_setting(item) == expected


@pytest.mark.parametrize("item", ["max_connectionz=5", "login_timeout", "=3", "extra=1"])
def test_set_refuses_unknown_keys(item):
    with pytest.raises(UsageError, match="expected KEY=VALUE"):
        parse_setting(item)


def test_set_values_are_type_checked():
    with pytest.raises(UsageError, match="positive number"):
        load_config(None, **dict([parse_setting("login_timeout=0")]))
    with pytest.raises(UsageError, match="non-negative integer"):
        load_config(None, **dict([parse_setting("max_connections=lots")]))


def test_precedence(tmp_path):
    path = tmp_path / "bastion.toml"
    path.write_text(
        '[bastion]\nstate_dir = "/from/file"\nlogin_timeout = 5\nkeepalive_interval = 7\n'
    )
    cfg = load_config(
        path,
        defaults={"state_dir": "/from/env", "keepalive_count_max": 9},
        login_timeout=3,
    )
    assert cfg.state_dir == Path("/from/file")  # the file beats $DT_STATE
    assert cfg.login_timeout == 3.0  # the command line beats the file
    assert cfg.keepalive_interval == 7.0 and cfg.keepalive_count_max == 9
    assert load_config(None, defaults={"state_dir": "/from/env"}).state_dir == Path("/from/env")


def serve(*args, env=None):
    result = subprocess.run(
        [str(DT_BASTION), "serve", "--listen", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_serve_refuses_bad_settings_before_starting(tmp_path):
    bad = serve("--state", str(tmp_path), "--set", "max_connectionz=5")
    assert bad.returncode != 0 and "max_connectionz" in bad.stderr
    path = tmp_path / "bastion.toml"
    path.write_text("[bastion]\nlisten_prot = 1\n")
    bad = serve("--state", str(tmp_path), "--config", str(path))
    assert bad.returncode != 0 and "unknown setting 'listen_prot'" in bad.stderr


def test_serve_uses_the_state_dir_from_the_config_file(tmp_path):
    path = tmp_path / "bastion.toml"
    path.write_text(f'[bastion]\nstate_dir = "{tmp_path / "nowhere"}"\n')
    result = serve("--config", str(path), env={"PATH": "/usr/bin:/bin", "DT_STATE": "/elsewhere"})
    assert result.returncode != 0 and str(tmp_path / "nowhere") in result.stderr


# -- dt-bastion serve's command line, as an admin or systemd runs it ----------------------------


@pytest.fixture
def cluster_env(tmp_path):
    """A fresh cluster (``dtadmin init``); the environment that finds it."""
    env = {"PATH": f"{DT_BASTION.parent}:/usr/bin:/bin", "DT_STATE": str(tmp_path / "state")}
    subprocess.run(
        [str(DT_BASTION.parent / "dtadmin"), "init", "--cluster", "cli.test"],
        env=env, capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    return env


@contextlib.contextmanager
def running(*args, env):
    """``dt-bastion serve ARGS`` until it says it is ready; its ready line. Stopped
    (SIGTERM) on exit, its stderr then in ``result["stderr"]``."""
    proc = subprocess.Popen(
        [str(DT_BASTION), "serve", *args],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    result = {}
    try:
        line = proc.stdout.readline()
        assert line.startswith("dt-bastion ready on"), line + proc.stderr.read()
        result["ready"] = line.strip()
        yield result
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, result["stderr"] = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        result["code"] = proc.returncode


def test_serve_refuses_an_unknown_log_level_naming_the_levels(tmp_path):
    bad = serve("--state", str(tmp_path), "--log-level", "verbose")
    assert bad.returncode == 2, bad.stderr
    assert "'verbose'" in bad.stderr and "debug, info, warning, error" in bad.stderr
    bad = serve("--state", str(tmp_path), "--log-format", "xml")
    assert bad.returncode == 2 and "text, json" in bad.stderr, bad.stderr


def test_listen_with_a_port_alone_is_that_port_on_the_configured_host(tmp_path, cluster_env):
    assert parse_listen("56069") == (None, 56069)
    assert parse_listen("[::1]:3022") == ("::1", 3022) and parse_listen("::1") == ("::1", 3022)
    config = tmp_path / "bastion.toml"
    config.write_text('[bastion]\nlisten_host = "127.0.0.1"\n')
    port = free_port()
    with running("--config", str(config), "--listen", str(port), env=cluster_env) as out:
        assert out["ready"] == f"dt-bastion ready on 127.0.0.1:{port}"
    assert out["code"] == 0, out["stderr"]


def test_an_address_in_use_is_named_not_an_internal_error(tmp_path, cluster_env):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        bad = serve("--listen", f"127.0.0.1:{port}", env=cluster_env)
        assert bad.returncode == 2 and "internal error" not in bad.stderr, bad.stderr
        assert f"cannot listen on 127.0.0.1:{port}: address already in use" in bad.stderr
        bad = serve("--metrics-listen", str(port), env=cluster_env)
        assert f"cannot listen on 127.0.0.1:{port}: address already in use" in bad.stderr


def test_metrics_are_never_on_the_ssh_port(tmp_path, cluster_env):
    bad = serve("--listen", "127.0.0.1:4022", "--metrics-listen", "4022", env=cluster_env)
    assert bad.returncode == 2 and "is the SSH port" in bad.stderr, bad.stderr


def test_log_lines_name_no_python_none(tmp_path, cluster_env):
    """The first start signs the host certificate: its audit line once read
    ``user=None device=None addr=None``."""
    with running("--listen", "127.0.0.1:0", env=cluster_env) as out:
        pass
    assert out["code"] == 0 and "cert.create allow" in out["stderr"], out["stderr"]
    assert "None" not in out["stderr"], out["stderr"]
