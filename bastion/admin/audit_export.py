"""Shipping the audit log: JSON lines to stdout, a file or syslog, once or following.

The log is followed by polling the database (a WAL read takes no lock, so it never
holds up the bastion's writer), which sees rows from every process that appends:
``dt-bastion serve``, every ``dtadmin``. Checkpoints are shipped as lines of their
own (``"event": "audit.checkpoint"``) after the rows they sign, so a copy kept by a
SIEM can later prove the database lost nothing up to it
(``dtadmin audit verify --against FILE``).

Syslog is RFC 5424 (``<PRI>1 TIMESTAMP HOST dt-bastion PID MSGID [SD] MSG``) over a
unix datagram socket (``/dev/log``, the default) or UDP; MSGID is the event type,
MSG the JSON line. Facility authpriv; severity info for an allow, warning for a deny.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from bastion.authz.records import AuditEvent
from bastion.protocol import console
from bastion.protocol.errors import UsageError
from bastion.storage import StateStore
from bastion.storage.audit_chain import Checkpoint

POLL_SECONDS = 0.25
PAGE = 1000
CHECKPOINT_EVENT = "audit.checkpoint"
_AUTHPRIV = 10
_SD_ID = "dt@32473"  # 32473: the private enterprise number RFC 5612 sets aside for examples
_MAX_DATAGRAM = 60_000


def event_json(e: AuditEvent) -> dict[str, Any]:
    """One event as ``ls --format json`` and the export show it."""
    return {
        **e.fields,
        "id": e.id,
        "time": console.rfc3339(e.time),
        "code": e.code,
        "event": e.type,
        "success": e.success,
        "user": e.user,
        "device": e.device,
        "addr.remote": e.remote_addr,
        "message": e.message,
        "hash": e.hash,
    }


def checkpoint_json(cp: Checkpoint) -> dict[str, Any]:
    return {
        "event": CHECKPOINT_EVENT,
        "checkpoint": cp.id,
        "row_id": cp.row_id,
        "row_hash": cp.row_hash,
        "signed_at": cp.time,  # exactly as signed (a float), not rounded to RFC 3339
        "time": console.rfc3339(cp.time),
        "key": cp.key,
        "signature": cp.signature,
    }


def as_json(item: AuditEvent | Checkpoint) -> dict[str, Any]:
    return checkpoint_json(item) if isinstance(item, Checkpoint) else event_json(item)


def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


# -- following ------------------------------------------------------------------------


class Position:
    """Where an export or a follow has got to: the last event and checkpoint sent."""

    def __init__(self, event: int = 0, checkpoint: int = 0) -> None:
        self.event = event
        self.checkpoint = checkpoint


def batches(
    store: StateStore,
    position: Position,
    *,
    types: tuple[str, ...] | None,
    user: str | None,
    since: float | None,
    checkpoints: bool,
    follow: bool,
    stop: Callable[[], bool],
) -> Iterator[list[AuditEvent | Checkpoint]]:
    """Lists of events (each checkpoint right after the row it signs), oldest first,
    from ``position`` on; with ``follow``, polls for more until ``stop()``.
    Checkpoints sign the newest row when they are made, so their row ids rise with
    their ids."""
    while True:
        with store.read_transaction():  # one snapshot: nothing lands between the reads
            page = store.list_audit(
                type=types,
                user=user,
                since=since,
                after_id=position.event,
                limit=PAGE,
                oldest_first=True,
            )
            newest = store.last_audit_id()
            signed = store.list_audit_checkpoints(after=position.checkpoint) if checkpoints else []
        if len(page) < PAGE:  # every row up to the newest was read (filters skip some)
            reached = max(page[-1].id if page else 0, position.event, newest)
        else:
            reached = page[-1].id
        due = []
        for cp in signed:
            if cp.row_id > reached:
                break  # its row comes in a later page
            due.append(cp)
        if due:
            position.checkpoint = due[-1].id
        out: list[AuditEvent | Checkpoint] = []
        for e in page:  # each checkpoint right after the row it signs
            while due and due[0].row_id < e.id:
                out.append(due.pop(0))
            out.append(e)
        out.extend(due)
        position.event = reached
        if out:
            yield out
        if len(page) == PAGE:
            continue
        if not follow or stop():
            return
        time.sleep(POLL_SECONDS)
        if stop():
            return


@contextlib.contextmanager
def interrupted_cleanly() -> Iterator[Callable[[], bool]]:
    """Ctrl-C (or SIGTERM) sets a flag instead of raising mid-write: a follow ends
    after the batch it is writing, with exit status 0 and no traceback."""
    stopped = False

    def handler(_sig: int, _frame: Any) -> None:
        nonlocal stopped
        stopped = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: stopped
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# -- sinks ------------------------------------------------------------------------------


def resume_point(path: Path) -> Position:
    """The last event id and checkpoint id already in an export file (read from its
    end), so a restarted export appends where the last one stopped. A torn last line
    (a crash mid-write) is ignored and written again."""
    position = Position()
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return position
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    with f:
        end = f.seek(0, os.SEEK_END)
        block, data = 65536, b""
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            data = f.read(end - start) + data
            end = start
            for line in reversed(data.split(b"\n")[1 if start else 0 :]):
                obj = _parse_line(line)
                if obj is None:
                    continue
                if obj.get("event") == CHECKPOINT_EVENT:
                    position.checkpoint = position.checkpoint or int(obj.get("checkpoint", 0))
                elif isinstance(obj.get("id"), int):
                    position.event = position.event or obj["id"]
                if position.event and position.checkpoint:
                    return position
            block *= 2
    return position


def _parse_line(line: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def open_file(path: Path) -> IO[str]:
    """Append-only, created 0600 (audit rows name users and addresses)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise UsageError(f"cannot open {path} for appending: {exc.strerror}") from None
    f = os.fdopen(fd, "a", encoding="utf-8")
    if f.tell() and not _ends_with_newline(path):
        f.write("\n")  # a torn last line stays torn, and the next line starts clean
    return f


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class Syslog:
    """RFC 5424 messages to a unix datagram socket or a UDP address."""

    def __init__(self, target: str) -> None:
        self.host = socket.gethostname().split(".")[0] or "-"
        self.pid = str(os.getpid())
        if target.startswith("udp:"):
            host, _, port = target[4:].rpartition(":")
            host = host.strip("[]")
            if not host or not port.isdigit():
                raise UsageError(f"invalid --syslog {target!r}: use udp:HOST:PORT")
            try:
                info = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)[0]
            except (OSError, UnicodeError) as exc:
                raise UsageError(f"invalid --syslog {target!r}: {exc}") from None
            self.sock = socket.socket(info[0], socket.SOCK_DGRAM)
            self.address: Any = info[4]
        else:
            path = target[5:] if target.startswith("unix:") else target
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.address = path
        self.target = target

    def message(self, obj: dict[str, Any]) -> bytes:
        deny = obj.get("success") is False
        pri = _AUTHPRIV * 8 + (4 if deny else 6)
        stamp = obj.get("time") or datetime.datetime.now(datetime.UTC).isoformat()
        msgid = _sd_safe(str(obj.get("event") or "-"), 32)
        sd_params = {"id": obj.get("id", obj.get("checkpoint")), "code": obj.get("code")}
        sd = "".join(f' {k}="{_sd_value(str(v))}"' for k, v in sd_params.items() if v is not None)
        head = f"<{pri}>1 {stamp} {self.host} dt-bastion {self.pid} {msgid} [{_SD_ID}{sd}] "
        return (head + dumps(obj)).encode()[:_MAX_DATAGRAM]

    def send(self, items: list[AuditEvent | Checkpoint]) -> None:
        try:
            for item in items:
                self.sock.sendto(self.message(as_json(item)), self.address)
        except OSError as exc:
            raise UsageError(f"cannot send to syslog at {self.target}: {exc.strerror}") from None

    def close(self) -> None:
        self.sock.close()


def _sd_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _sd_safe(text: str, limit: int) -> str:
    """A PRINTUSASCII token without spaces (RFC 5424 MSGID)."""
    cleaned = "".join(ch if 33 <= ord(ch) <= 126 else "_" for ch in text)
    return cleaned[:limit] or "-"


def write_lines(out: IO[str], items: list[AuditEvent | Checkpoint]) -> None:
    out.write("".join(dumps(as_json(o)) + "\n" for o in items))
    out.flush()


def stdout() -> IO[str]:
    return sys.stdout
