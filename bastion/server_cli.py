"""``dt-bastion serve``: the command line; :mod:`bastion.service` runs the process."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from bastion.cluster import default_state_dir
from bastion.config import LOG_LEVELS, BastionConfig, load_config, parse_listen, parse_setting
from bastion.protocol import console
from bastion.service.logs import OneLineFormatter

__all__ = ["OneLineFormatter", "app", "main", "serve"]

app = console.cli_app(
    help="dt-bastion: the SSH jump host and CA endpoint of a device-trusted cluster."
)
log = logging.getLogger("bastion")


@app.callback()
def _root() -> None:
    """dt-bastion server."""


@app.command()
def serve(
    state: Annotated[
        Path | None, typer.Option("--state", help="Cluster state directory (default: $DT_STATE).")
    ] = None,
    listen: Annotated[
        str | None,
        typer.Option(
            "--listen",
            help="HOST:PORT, [ADDRESS]:PORT, HOST or PORT to listen on for SSH "
            "(default 0.0.0.0:3022; a port alone keeps the configured host).",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="TOML file with [bastion] settings (read again on SIGHUP)."),
    ] = None,
    database: Annotated[
        str | None,
        typer.Option(
            "--database",
            metavar="URL",
            help="PostgreSQL cluster database, postgresql://... with no password in it "
            "(default: $DT_DATABASE, else the config's database, else SQLite in the state "
            "directory).",
            show_default=False,
        ),
    ] = None,
    host_name: Annotated[
        list[str] | None,
        typer.Option("--host-name", help="Name clients use for this bastion (repeatable)."),
    ] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="Override one config setting, e.g. --set max_connections_per_source=50 "
            "(repeatable; see bastion/config.py for every key).",
        ),
    ] = None,
    metrics_listen: Annotated[
        str | None,
        typer.Option(
            "--metrics-listen",
            metavar="[HOST:]PORT",
            help="Serve Prometheus /metrics and /healthz over HTTP here (a port alone: "
            "127.0.0.1). Off unless set.",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=0,
            help="Processes sharing the SSH port, each a whole bastion (default: one per "
            "core; 1: this process alone, no supervisor).",
        ),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option("--log-level", help=f"One of: {', '.join(LOG_LEVELS)} (default info)."),
    ] = None,
    log_format: Annotated[
        str | None,
        typer.Option(
            "--log-format",
            help="text (one line per record, the default) or json (one object per line).",
        ),
    ] = None,
) -> None:
    """Serve SSH: certificate and password logins, dt-api, and ssh -J forwarding.

    Runs until SIGTERM or SIGINT, then drains: no new connections, open sessions may
    finish for drain_timeout seconds (default 30) before they are cut with the reason.
    SIGHUP reloads the config file and the trust roots. Under systemd it reports
    readiness (Type=notify).

    Example: dt-bastion serve --state /var/lib/dt-bastion --listen 0.0.0.0:3022
    """
    from bastion.service import logs, supervisor
    from bastion.service.run import Service
    from bastion.storage import DATABASE_ENV

    worker = supervisor.as_worker()  # set when started by a supervisor (--workers N)

    explicit: dict[str, Any] = {
        "state_dir": state,
        "metrics_listen": metrics_listen,
        "workers": workers,
    }
    explicit["database"] = database or os.environ.get(DATABASE_ENV) or None
    explicit["log_level"] = logs.check_level(log_level) if log_level is not None else None
    explicit["log_format"] = logs.check_format(log_format) if log_format is not None else None
    if listen:
        explicit["listen_host"], explicit["listen_port"] = parse_listen(listen)
    overrides = dict(parse_setting(item) for item in settings or ())
    explicit["host_names"] = tuple(host_name) if host_name else None
    overrides.update({k: v for k, v in explicit.items() if v is not None})

    def load() -> BastionConfig:  # at start, and again on each SIGHUP
        return load_config(config, defaults={"state_dir": default_state_dir()}, **overrides)

    cfg = load()
    logs.configure(cfg.log_level, cfg.log_format)
    count = supervisor.worker_count(cfg)
    if worker is None and count > 1:
        raise SystemExit(supervisor.Supervisor(cfg, count, sys.argv[1:]).run())
    try:
        import uvloop  # optional: faster event loop when installed

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(Service(load, cfg, worker).run())


def _tune_socket_reads(size: int) -> None:
    """Read at most ``size`` bytes per socket per loop turn (see
    ``BastionConfig.socket_read_size``). asyncio keeps this in a class attribute of its
    selector transport; uvloop has no such knob, and then nothing changes."""
    from asyncio import selector_events

    transport = getattr(selector_events, "_SelectorSocketTransport", None)
    if transport is not None and isinstance(getattr(transport, "max_size", None), int):
        transport.max_size = max(4096, size)


def main() -> None:
    console.run_cli(app, "dt-bastion")


if __name__ == "__main__":
    main()
