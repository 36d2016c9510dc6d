"""Several bastions (issue 14): PostgreSQL against SQLite, and HAProxy in front.

Three figures, each measured in the same run as what it is compared with:

- issuance: certificates issued and durably recorded per second on PostgreSQL
  (fsync and synchronous_commit on, as durable as SQLite's synchronous=FULL) against
  the lab's SQLite cluster, one request at a time and 50 at once through the
  bastion's GroupCommitIssuer;
- revocation across bastions: two `dt-bastion serve` on one PostgreSQL (two state
  directories with one ca/), a live `ssh -J` session through B, a lock committed
  beside A (dtadmin's transaction, in this process): time from the commit to the
  client's exit, and to B's ``session.terminated`` row; the same on SQLite (the lab's
  bastion and its state directory), rounds alternating;
- connect through HAProxy: `ssh -J` through HAProxy (TCP, send-proxy-v2) to the two
  bastions, against stock sshd as the jump host through the same HAProxy build and
  settings (no PROXY header: sshd cannot read one), runs alternating.

    python -m bench --only ha [--quick]      (or: python -m bench.ha [--quick])

Ratios, never timed assertions: the machine may be shared, and the load average at
the start and end of the figure is in its rows.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from bench.figures import _group_commit_rate
from bench.lab import CIPHER, Lab
from tests.postgres import Server
from tests.sshd import LOGIN, free_port, keygen, user_client

N_CALLERS = 50


def _p(values: list[float], q: float) -> float:
    """Nearest rank (with fewer than 100 samples, p99 is the slowest one)."""
    return sorted(values)[max(0, math.ceil(len(values) * q) - 1)]


def _pp(values: list[float]) -> str:
    return f"p50 {_p(values, 0.5) * 1000:.0f} ms, p99 {_p(values, 0.99) * 1000:.0f} ms"


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f} (1/5 min) on {os.cpu_count()} cores"


# -- PostgreSQL ------------------------------------------------------------------------------


@contextlib.contextmanager
def durable_postgres() -> Iterator[Server]:
    """The tests' PostgreSQL (initdb in a temp dir, Unix socket), made durable: the
    tests turn fsync off, a benchmark against SQLite's synchronous=FULL must not."""
    from tests.postgres import available, postgres_server

    if not available():
        raise RuntimeError("PostgreSQL is not installed (run scripts/setup.sh)")
    with postgres_server() as server:
        server.admin(
            "ALTER SYSTEM SET fsync = on",
            "ALTER SYSTEM SET synchronous_commit = on",
            "ALTER SYSTEM SET full_page_writes = on",
            "SELECT pg_reload_conf()",
        )
        server.admin("CREATE DATABASE dt_bench")
        yield server


# -- 1. issuance -------------------------------------------------------------------------------


def issuance(lab: Lab, pg_cluster, quick: bool) -> tuple[list[dict], dict]:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate().public_key()
    m = 200 if quick else 1000
    reps = 2 if quick else 3
    clusters = {"sqlite": lab.cluster, "postgres": pg_cluster}
    one: dict[str, list[float]] = {k: [] for k in clusters}
    group: dict[str, list[float]] = {k: [] for k in clusters}
    per_commit: dict[str, list[float]] = {k: [] for k in clusters}
    for _ in range(reps):  # alternate the backends rep by rep
        for name, cluster in clusters.items():
            t0 = time.perf_counter()
            for _ in range(m):
                cluster.ca.sign_user("bench", key)
            one[name].append(m / (time.perf_counter() - t0))
            rate, each = _group_commit_rate(cluster.ca, key, m * 5, callers=N_CALLERS)
            group[name].append(rate)
            per_commit[name].append(each)

    def cell(rates: list[float], name: str) -> str:
        return f"{statistics.median(rates):,.0f}/s ({min(rates):,.0f}-{max(rates):,.0f})"

    def ratio(d: dict[str, list[float]]) -> str:
        return f"{statistics.median(d['postgres']) / statistics.median(d['sqlite']):.2f}"

    common = (
        "PostgreSQL 15 on a Unix socket, fsync + synchronous_commit on; SQLite WAL, "
        f"synchronous=FULL; same disk; {reps} reps alternating; ratio = PostgreSQL / SQLite; "
        "the lab's SQLite bastion runs meanwhile, the PostgreSQL bastions start after this"
    )
    rows = [
        {
            "figure": "HA issuance: issued and durably recorded, one at a time",
            "dt": f"PostgreSQL {cell(one['postgres'], 'postgres')}",
            "openssh": f"SQLite {cell(one['sqlite'], 'sqlite')}",
            "ratio": ratio(one),
            "method": f"{m} sign_user calls per rep (checks, sign, serial + audit row "
            f"committed); {common}",
        },
        {
            "figure": f"HA issuance: {N_CALLERS} requests at once (group commit)",
            "dt": f"PostgreSQL {cell(group['postgres'], 'postgres')}, "
            f"{statistics.median(per_commit['postgres']):.1f} per commit",
            "openssh": f"SQLite {cell(group['sqlite'], 'sqlite')}, "
            f"{statistics.median(per_commit['sqlite']):.1f} per commit",
            "ratio": ratio(group),
            "method": f"{m * 5} certificates per rep from {N_CALLERS} asyncio callers through "
            f"GroupCommitIssuer (what dt-api logins use); {common}",
        },
    ]
    return rows, {"one_at_a_time": one, "group_commit": group, "per_commit": per_commit}


# -- 2. revocation across bastions --------------------------------------------------------------


def _lock(store, user: str) -> tuple[float, float]:
    """What `dtadmin lock --user` commits (lock row + lock.create audit, one
    transaction); (perf_counter, time.time) once the commit has returned."""
    from bastion import audit
    from bastion.authz.records import Lock

    with store.transaction():
        record = store.add_lock(Lock("", "user", user, "bench", None, created_by="bench"))
        audit.record(
            store,
            "lock.create",
            message=f"user {user} locked: bench",
            user=user,
            actor="bench",
            lock=record.id,
        )
    return time.perf_counter(), time.time()


def _one_cut(cluster, store, directory: Path, user: str, bastion_port: int) -> tuple[float, float]:
    """One live session through the bastion on ``bastion_port`` cut by a lock written
    through ``store``: (commit to the client's exit, commit to session.terminated)."""
    from bastion.authz.records import User

    store.add_user(User(user, ("access",), (LOGIN,)))
    config = user_client(cluster, directory / user, user, bastion_port=bastion_port)
    live = subprocess.Popen(
        ["ssh", "-F", str(config), f"{LOGIN}@node-1", "echo started; sleep 60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = live.stdout.readline().strip() if live.stdout else ""
        if line != "started":
            live.kill()
            raise RuntimeError(f"no session for {user}: {live.communicate()[1][-300:]}")
        committed, wall = _lock(store, user)
        live.wait(timeout=15)
        seen = time.perf_counter() - committed
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()
    deadline = time.monotonic() + 10
    while True:
        rows = [e for e in store.list_audit(type="session.terminated", limit=20) if e.user == user]
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    audited = rows[-1].time - wall if rows else float("nan")
    return seen, audited


def revocation(lab: Lab, pg_cluster, b_port: int, quick: bool) -> tuple[list[dict], dict]:
    rounds = 10 if quick else 30
    seen: dict[str, list[float]] = {"postgres": [], "sqlite": []}
    audited: dict[str, list[float]] = {"postgres": [], "sqlite": []}
    d = lab.dir / "ha-revocation"
    tag = int(time.time())
    for i in range(rounds):  # alternate the backends round by round
        s, a = _one_cut(pg_cluster, pg_cluster.store, d, f"pgrev{i}-{tag}", b_port)
        seen["postgres"].append(s)
        audited["postgres"].append(a)
        s, a = _one_cut(lab.cluster, lab.cluster.store, d, f"sqrev{i}-{tag}", lab.bastion.port)
        seen["sqlite"].append(s)
        audited["sqlite"].append(a)
    ratio = _p(seen["postgres"], 0.5) / _p(seen["sqlite"], 0.5)
    ratio99 = _p(seen["postgres"], 0.99) / _p(seen["sqlite"], 0.99)
    rows = [
        {
            "figure": "HA revocation: lock on A to live session on B cut (client sees it)",
            "dt": f"PostgreSQL, two bastions: {_pp(seen['postgres'])}",
            "openssh": f"SQLite, one state dir: {_pp(seen['sqlite'])}",
            "ratio": f"{ratio:.2f} (p50), {ratio99:.2f} (p99)",
            "method": f"{rounds} rounds each, alternating; lock row + lock.create audit committed "
            "beside A (dtadmin's transaction, another process than either bastion), timed from "
            "the commit's return to the exit of the `ssh -J` client through B "
            "(`echo started; sleep 60` on the node); target p99 < 250 ms",
        },
        {
            "figure": "HA revocation: lock on A to B's session.terminated audit row",
            "dt": f"PostgreSQL, two bastions: {_pp(audited['postgres'])}",
            "openssh": f"SQLite, one state dir: {_pp(audited['sqlite'])}",
            "ratio": f"{_p(audited['postgres'], 0.5) / _p(audited['sqlite'], 0.5):.2f} (p50)",
            "method": "same rounds: the audit row's time (B's clock, same host) minus the "
            "wall time at the commit's return",
        },
    ]
    return rows, {"client_exit": seen, "audit_row": audited}


# -- 3. connect through HAProxy ----------------------------------------------------------------


@contextlib.contextmanager
def _haproxy(directory: Path, text: str, port: int) -> Iterator[int]:
    from tests.haproxy import run_haproxy

    with run_haproxy(directory, text, port):
        yield port


def _stock_config(text: str) -> str:
    """tests/haproxy.py's configuration for stock sshd: no PROXY header (sshd cannot
    read one) and a TCP connect check in place of the bastion's /healthz."""
    return text.replace(" send-proxy-v2", "").replace(
        "    option httpchk GET /healthz\n    http-check expect status 200\n", ""
    )


def _jump_config(
    path: Path, jump_port: int, jump_user: str, key: Path, cert: Path, host_ca: Path, node: int
) -> Path:
    """The lab's ssh_config shape (bench/lab.py ``_config``) for another jump port."""
    known = path.with_suffix(".known_hosts")
    known.write_text(f"@cert-authority * {host_ca.read_text().strip()}\n")
    common = (
        f"    IdentityFile {key}\n    CertificateFile {cert}\n"
        f"    IdentitiesOnly yes\n    UserKnownHostsFile {known}\n"
        f"    Ciphers {CIPHER}\n    BatchMode yes\n    LogLevel ERROR\n"
        "    ControlMaster no\n    ControlPath none\n"
    )
    path.write_text(
        f"Host jump\n    HostName 127.0.0.1\n    Port {jump_port}\n"
        f"    User {jump_user}\n    StrictHostKeyChecking no\n{common}\n"
        f"Host node\n    HostName 127.0.0.1\n    Port {node}\n    User {LOGIN}\n"
        f"    HostKeyAlias node-1\n    StrictHostKeyChecking yes\n{common}"
        "    ProxyJump jump\n"
    )
    return path


def _ssh_true(config: Path) -> float:
    t0 = time.perf_counter()
    result = subprocess.run(
        ["ssh", "-F", str(config), "node", "true"], capture_output=True, timeout=60
    )
    elapsed = time.perf_counter() - t0
    if result.returncode != 0:
        raise RuntimeError(f"ssh via {config.name} failed: {result.stderr.decode()[-300:]}")
    return elapsed


def connect(
    lab: Lab, pg_cluster, serves, pg_node_port: int, quick: bool
) -> tuple[list[dict], dict]:
    from bastion.ca.certs import load_public_key
    from tests.haproxy import config_text

    runs = 10 if quick else 30
    d = lab.dir / "ha-connect"
    d.mkdir()
    key = keygen(d / "id")
    issued = pg_cluster.ca.sign_user(
        "bench", load_public_key((d / "id.pub").read_bytes()), ttl=12 * 3600
    )
    cert = d / "id-cert.pub"
    cert.write_text(issued.openssh + "\n")
    dt_port, ossh_port = free_port(), free_port()
    dt_text = config_text(dt_port, [s.backend for s in serves], stats_socket=d / "dt.sock")
    from tests.haproxy import Backend

    ossh_text = _stock_config(
        config_text(ossh_port, [Backend("sshd", lab.jump, lab.jump)], stats_socket=d / "o.sock")
    )
    pg_ca = pg_cluster.state_dir / "ca" / "host_ca.pub"
    lab_ca = lab.cluster.state_dir / "ca" / "host_ca.pub"
    configs = {
        "dt": _jump_config(d / "dt-haproxy", dt_port, "dt", key, cert, pg_ca, pg_node_port),
        "openssh": _jump_config(
            d / "ossh-haproxy", ossh_port, LOGIN, lab.key, lab.cert, lab_ca, lab.node.port
        ),
        "dt_direct": _jump_config(
            d / "dt-direct", serves[0].port, "dt", key, cert, pg_ca, pg_node_port
        ),
        "openssh_direct": lab.ossh_config,
        "dt_sqlite_direct": lab.dt_config,  # the lab's bastion: SQLite, no PROXY listener
    }
    samples: dict[str, list[float]] = {k: [] for k in configs}
    with _haproxy(d / "dt", dt_text, dt_port), _haproxy(d / "ossh", ossh_text, ossh_port):
        for name in configs:  # one untimed warm-up each (health checks, page cache)
            _ssh_true(configs[name])
        for _ in range(runs):
            for name, config in configs.items():
                samples[name].append(_ssh_true(config))
    p50 = {k: _p(v, 0.5) for k, v in samples.items()}
    p99 = {k: _p(v, 0.99) for k, v in samples.items()}
    rows = [
        {
            "figure": "HA connect: `ssh -J` through HAProxy, `node true`",
            "dt": f"{_pp(samples['dt'])} (two bastions on PostgreSQL)",
            "openssh": _pp(samples["openssh"]),
            "ratio": f"{p50['dt'] / p50['openssh']:.2f} (p50), {p99['dt'] / p99['openssh']:.2f} (p99)",
            "method": f"{runs} runs each, alternating with the direct jumps below; HAProxy "
            "(tests/haproxy.py config: TCP, roundrobin, send-proxy-v2 to the bastions; the "
            "same without send-proxy-v2 and with a TCP check for sshd); whole command wall time",
            "note": "the same runs without HAProxy (client straight to the jump host): "
            f"dt-bastion A {_pp(samples['dt_direct'])}, OpenSSH {_pp(samples['openssh_direct'])}, "
            f"the lab's dt-bastion on SQLite {_pp(samples['dt_sqlite_direct'])}; "
            f"HAProxy adds {(p50['dt'] - p50['dt_direct']) * 1000:.0f} ms (dt-bastion) and "
            f"{(p50['openssh'] - p50['openssh_direct']) * 1000:.0f} ms (OpenSSH) at p50",
        },
    ]
    return rows, samples


# -- the figure --------------------------------------------------------------------------------


def ha(lab: Lab, quick: bool = False) -> dict:
    from bastion.authz.records import Node, User
    from bastion.cluster import Cluster, init_cluster
    from tests.haproxy import Serve
    from tests.sshd import sshd_node

    load_before = _load()
    rows: list[dict] = []
    raw: dict[str, object] = {"load_before": load_before}
    d = lab.dir / "ha"
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(durable_postgres())
        url = server.url("dt_bench")
        state_a, state_b = d / "host-a" / "state", d / "host-b" / "state"
        state_a.parent.mkdir(parents=True)
        state_b.parent.mkdir(parents=True)
        init_cluster(state_a, "bench-ha", database=url).close()
        import shutil

        shutil.copytree(state_a, state_b)  # the second host gets the keys, not the state
        cluster = Cluster.open(state_a, database=url)  # beside A, as dtadmin opens it
        stack.callback(cluster.close)
        cluster.store.add_user(User("bench", ("access",), (LOGIN,)))
        node = stack.enter_context(
            sshd_node(d / "node", cluster, extra="MaxSessions 100\nMaxStartups 1000\n")
        )
        cluster.store.add_node(Node("node-1", "127.0.0.1", node.port))

        print("   issuance", flush=True)
        got, raw["issuance"] = issuance(lab, cluster, quick)
        rows += got

        args = (
            "--database", url,
            "--config", str(lab.dir / "bastion.toml"),
            "--set", 'proxy_protocol_from=["127.0.0.3/32"]',
        )  # fmt: skip
        serves = [Serve(state_a, "a", args), Serve(state_b, "b", args)]
        for s in serves:
            s.start()
            stack.callback(s.stop)

        print("   revocation across bastions", flush=True)
        got, raw["revocation"] = revocation(lab, cluster, serves[1].port, quick)
        rows += got

        print("   connect through HAProxy", flush=True)
        got, raw["connect"] = connect(lab, cluster, serves, node.port, quick)
        rows += got
    load_after = _load()
    raw["load_after"] = load_after
    for row in rows:
        row["method"] += f"; {load_before} before, {load_after} after"
    return {"raw": raw, "rows": rows}


def main() -> int:
    """`python -m bench.ha [--quick]`: only these rows, into bench/results/ha.md."""
    import argparse
    import json
    import sys

    from bench.__main__ import ROOT, write_markdown

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--quick", action="store_true")
    quick = parser.parse_args().quick
    import platform

    raw: dict = {"machine": platform.platform(), "python": platform.python_version()}
    raw["quick"] = quick
    with Lab(ROOT / "bench" / "results" / "lab") as lab:
        result = ha(lab, quick=quick)
    out = ROOT / "bench" / "results"
    raw["ha"] = result["raw"]
    (out / "ha-raw.json").write_text(json.dumps(raw, indent=2, default=str))
    write_markdown(result["rows"], raw, out / "ha.md")
    sys.stdout.write((out / "ha.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
