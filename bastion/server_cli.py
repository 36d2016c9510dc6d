"""``dt-bastion serve``: run the bastion until SIGTERM/SIGINT, then end sessions cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from bastion.audit import escape_control
from bastion.cluster import Cluster, default_state_dir
from bastion.config import BastionConfig, load_config, parse_listen, parse_setting
from bastion.protocol import console

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
        str | None, typer.Option("--listen", help="HOST:PORT to listen on (default 0.0.0.0:3022).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML file with [bastion] settings.")
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
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info or warning.")] = "info",
) -> None:
    """Serve SSH: certificate and password logins, dt-api, and ssh -J forwarding.

    Example: dt-bastion serve --state /var/lib/dt-bastion --listen 0.0.0.0:3022
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), handlers=[handler])
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    host, port = parse_listen(listen) if listen else (None, None)
    overrides = dict(parse_setting(item) for item in settings or ())
    explicit: dict[str, Any] = {"state_dir": state, "listen_host": host, "listen_port": port}
    explicit["host_names"] = tuple(host_name) if host_name else None
    overrides.update({k: v for k, v in explicit.items() if v is not None})
    cfg = load_config(config, defaults={"state_dir": default_state_dir()}, **overrides)
    try:
        import uvloop  # optional: faster event loop when installed

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(cfg))


class OneLineFormatter(logging.Formatter):
    """No record can forge another: its message is escaped onto one line
    (:func:`bastion.audit.escape_control`; a client's disconnect reason holding a
    newline once wrote a fake ``session.start allow`` line), and a traceback keeps
    its own lines but each is indented, so none starts like a record."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_control(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("    " + escape_control(line) for line in text.splitlines())


def _tune_socket_reads(size: int) -> None:
    """Read at most ``size`` bytes per socket per loop turn (see
    ``BastionConfig.socket_read_size``). asyncio keeps this in a class attribute of its
    selector transport; uvloop has no such knob, and then nothing changes."""
    from asyncio import selector_events

    transport = getattr(selector_events, "_SelectorSocketTransport", None)
    if transport is not None and isinstance(getattr(transport, "max_size", None), int):
        transport.max_size = max(4096, size)


async def _serve(cfg: BastionConfig) -> None:
    _tune_socket_reads(cfg.socket_read_size)
    from bastion.proxy.server import Bastion, start_server

    cluster = Cluster.open(cfg.state_dir)
    try:
        # Once, before anyone is let in: the open-time check skips indexes, and a
        # broken index answers "no lock", "no such serial" wrongly.
        cluster.store.integrity_check()
    except BaseException:
        cluster.close()
        raise
    cert_path = cluster.ensure_bastion_host_cert(cfg.names())
    bastion = Bastion(cluster, cfg)
    acceptor = await start_server(bastion, str(cluster.bastion_host_key_path()), str(cert_path))
    bastion.registry.start()
    addrs = ", ".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in acceptor.sockets)
    log.info("dt-bastion serving cluster %s on %s", cluster.name, addrs)
    print(f"dt-bastion ready on {addrs}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("dt-bastion stopping: ending live sessions")
    acceptor.close()
    await bastion.registry.stop("bastion shutting down")
    await bastion.disconnect_all("the bastion is shutting down")
    await acceptor.wait_closed()
    bastion.close()  # the issuer's queue answered, the workers' writes landed
    cluster.close()


def main() -> None:
    console.run_cli(app, "dt-bastion")


if __name__ == "__main__":
    main()
