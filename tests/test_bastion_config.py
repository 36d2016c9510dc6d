"""dt-bastion's configuration: defaults < TOML file < --set < dedicated options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bastion.config import BastionConfig, load_config, parse_setting
from bastion.protocol.errors import UsageError

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
