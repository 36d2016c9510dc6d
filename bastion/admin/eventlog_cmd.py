"""dtadmin eventlog: read a TCG boot event log as the bastion will (no cluster state needed).

``dtadmin eventlog show FILE`` prints each event (PCR, type, digests, a short summary of
its data) and the PCR values the log replays to, for every digest bank it carries: what
to compare with ``tpm2_pcrread`` on the device, or with a quote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bastion.admin.common import new_app
from bastion.protocol import console, eventlog
from bastion.protocol.console import Format
from bastion.protocol.errors import NotFound, UsageError

app = new_app("Read a TCG boot event log (binary_bios_measurements).")


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(eventlog.MAX_LOG_SIZE + 1)
    except FileNotFoundError:
        raise NotFound(f"no such file: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory, not an event log") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    return data


@app.command("show")
def show(
    file: Annotated[
        Path,
        typer.Argument(
            help="The log, e.g. a copy of /sys/kernel/security/tpm0/binary_bios_measurements."
        ),
    ],
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.text,
) -> None:
    """Print a boot event log's events and the PCR values it replays to.

    Example: sudo cat /sys/kernel/security/tpm0/binary_bios_measurements > boot.log;
    dtadmin eventlog show boot.log
    """
    log = eventlog.parse(_read(file))
    pcrs = eventlog.replay(log)
    events: list[dict[str, Any]] = [
        {
            "index": e.index,
            "pcr": e.pcr,
            "type": e.type_name,
            "digests": {name: digest.hex() for name, digest in e.digests},
            "size": len(e.data),
            "summary": eventlog.summary(e),
        }
        for e in log.events
    ]
    pcr_hex = {
        bank: {str(pcr): v.hex() for pcr, v in sorted(values.items())}
        for bank, values in pcrs.items()
    }
    doc: dict[str, Any] = {
        "format": "crypto-agile" if log.spec_id is not None else "sha1",
        "banks": list(log.banks),
        "events": events,
        "pcrs": pcr_hex,
    }
    if fmt is Format.json:
        console.print_json(doc)
        return
    console.print_table(
        ["#", "PCR", "Type", "Digests", "Event"],
        [
            (
                str(e["index"]),
                str(e["pcr"]),
                e["type"],
                " ".join(f"{bank}:{hexd}" for bank, hexd in e["digests"].items()),
                e["summary"],
            )
            for e in events
        ],
        title=f"{file.name}: {len(events)} events ({doc['format']})",
        empty="(no events)",
    )
    console.print_table(
        ["Bank", "PCR", "Value"],
        [(bank, pcr, value) for bank, values in pcr_hex.items() for pcr, value in values.items()],
        title="PCR values the log replays to",
        empty="(no PCR extended)",
    )
