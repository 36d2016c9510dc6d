"""`make demo DEMO_ARGS=--ha`: several bastions on PostgreSQL behind HAProxy.

The story of docs/getting-started.md ("Several bastions"), with real commands and
their real output, each step checked: a PostgreSQL made with initdb and pg_ctl in the
demo's folder (the password of its ``dt`` role only in each host's passfile), two
"hosts" (two state directories; the second gets a copy of the first's ``ca/`` keys),
each running `dt-bastion serve` with the ``database`` key in its TOML, HAProxy in
front of both (TCP mode, send-proxy-v2, health checks on /healthz), a stock sshd node,
and alice signing up, logging in and using plain `ssh -J` through HAProxy. A lock
written on the host that does not hold her session cuts it (the change feed), and a
bastion killed with `kill -9` leaves her still getting in while its sibling ends the
dead one's session on record.

Run by scripts/demo.py --ha. Everything is stopped at the end (no --keep) and the
demo checks that no process it started is left. DT_DEMO_TIMES=1 adds the seconds
since the start to each heading.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


CLUSTER = "demo.ha"
BALANCER = "127.0.0.3"  # the address HAProxy connects to the bastions from (tests/haproxy.py)
CLIENT = "127.0.0.1"  # where alice's ssh connects from


class Host:
    """One bastion host: its state directory (the keys), passfile, TOML and process."""

    def __init__(self, workdir: Path, name: str, pg_port: int) -> None:
        from tests.haproxy import Serve

        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(mode=0o700)
        self.state = self.dir / "state"
        self.passfile = self.dir / "pgpass"
        self.config = self.dir / "bastion.toml"
        # No password in the URL: libpq reads it from the passfile the URL names.
        self.url = f"postgresql://dt@127.0.0.1:{pg_port}/dt?passfile={self.passfile}"
        self.serve = Serve(self.state, name, ("--config", str(self.config)))
        self.exported = False  # DT_STATE and DT_DATABASE name this host's

    def dtadmin(self, *args: str) -> list[str]:
        """A dtadmin command line run on this host."""
        if self.exported:
            return ["dtadmin", *args]
        return ["dtadmin", "--database", self.url, "--state", str(self.state), *args]

    def write_passfile(self, port: int, password: str) -> None:
        fd = os.open(self.passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"127.0.0.1:{port}:dt:dt:{password}\n")

    def write_config(self) -> None:
        self.config.write_text(
            "[bastion]\n"
            f'database = "{self.url}"\n'
            f'proxy_protocol_from = ["{BALANCER}/32"]\n'
            "# a sibling's dead sessions are ended within this (the demo waits for it)\n"
            "session_sweep_interval = 0.5\n"
        )

    def command(self) -> list[str]:
        """What Serve.start runs (for the reader; tests/haproxy.py builds the same)."""
        s = self.serve
        return ["dt-bastion", "serve", "--state", str(s.state),
                "--listen", f"127.0.0.1:{s.port}",
                "--set", f"metrics_listen=127.0.0.1:{s.health_port}",
                "--set", "drain_timeout=2", *s.args]  # fmt: skip


def start_postgres(demo: Any) -> tuple[Path, int]:
    """initdb and pg_ctl in the demo's folder; stopped at the end of the demo."""
    from tests.postgres import PG_BIN, _free_port, _runner

    assert PG_BIN is not None
    root = demo.workdir / "postgres"
    root.mkdir()
    root.chmod(0o755)
    run_as = _runner(root)  # as root: the server runs as nobody (PostgreSQL refuses root)
    data = root / "data"
    demo.run(
        [*run_as, str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres",
         "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync",
         "--locale=C.UTF-8"],
        expect="Success", show=False,
    )  # fmt: skip
    print("  ok: a cluster owned by the OS user it runs as; local socket: trust, TCP: scram")
    port = _free_port()
    settings = (
        f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{root}'\n"
        "fsync = off  # a demo's data is thrown away\n"
    )
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(settings)
    print("  postgresql.conf, appended:")
    print("".join(f"    {line}\n" for line in settings.splitlines()), end="")
    pg_ctl = [*run_as, str(PG_BIN / "pg_ctl"), "-D", str(data)]
    demo.defer(
        lambda: subprocess.run(
            [*pg_ctl, "-w", "-t", "30", "-m", "fast", "stop"], capture_output=True, timeout=60
        )
    )
    demo.run([*pg_ctl, "-l", str(root / "log"), "-w", "-t", "30", "start"], expect="server started")
    return root, port


def audit(cluster: Any, *types: str) -> list[Any]:
    """alice's audit rows of these types, oldest first (times to the microsecond, which
    `dtadmin audit ls` rounds to the second)."""
    return [e for e in cluster.store.list_audit(type=list(types)) if e.user == "alice"]


def hold(demo: Any, config: Path) -> subprocess.Popen[str]:
    """`ssh ... node-1 'echo held; cat' &`: a session left open. Its input is a pipe
    the demo never writes to, so ``cat`` on the node lives exactly as long as the
    session (a ``sleep`` would outlive a cut one: sshd does not kill a command that
    has no terminal when its connection drops)."""
    from tests.sshd import LOGIN

    args = ["ssh", "-F", str(config), "-o", "BatchMode=yes", f"{LOGIN}@node-1",
            "echo held; cat"]  # fmt: skip
    print(f"$ {shlex.join(args)} &    # its input left open", flush=True)
    proc = subprocess.Popen(
        args, cwd=demo.workdir, env=demo.env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip

    def end() -> None:
        proc.kill()
        proc.communicate()

    demo.defer(end)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "held":
        end()
        demo.check(False, f"the held session did not start (ssh exited {proc.returncode})")
    print("  held")
    return proc


def open_sessions(demo: Any, host: Host) -> int:
    """``dt_bastion_sessions_open`` from the host's /metrics (its metrics_listen)."""
    url = f"http://127.0.0.1:{host.serve.health_port}/metrics"
    out = demo.run(["curl", "-sf", url], show=False).stdout
    [line] = [ln for ln in out.splitlines() if ln.startswith("dt_bastion_sessions_open ")]
    print(f"  {host.name}: {line}")
    return int(float(line.split()[1]))


def holder(demo: Any, hosts: list[Host], cluster: Any) -> tuple[Host, Any]:
    """The host whose bastion holds alice's one open session (its /metrics count it)
    and that session as `dtadmin sessions ls` (run on host A) shows it."""
    demo.run(hosts[0].dtadmin("sessions", "ls"), expect="live")
    rows = cluster.store.list_open_sessions()
    demo.check(len(rows) == 1, f"one open session: {rows}")
    [row] = rows
    demo.check(
        row.remote_addr == CLIENT,
        f"the session is from alice's own address {CLIENT}, not the balancer's ({row.remote_addr})",
    )
    print(f"  from {CLIENT}, alice's own address (the PROXY header's), not the balancer's")
    print("  each bastion's /metrics (metrics_listen) counts the sessions it holds:")
    holding = [h for h in hosts if h.serve.alive() and open_sessions(demo, h) == 1]
    demo.check(len(holding) == 1, "exactly one bastion counts the session open")
    print(f"  so bastion {row.instance} is {holding[0].name}")
    return holding[0], row


def wait_for(what: str, predicate: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)
    return value


def story(demo: Any) -> None:  # noqa: PLR0915 - one story, step by step
    from bastion.cluster import Cluster
    from tests.haproxy import haproxy
    from tests.postgres import PG_BIN
    from tests.sshd import LOGIN, sshd_node
    from tests.tokens import printed_token

    demo.heading("A PostgreSQL for the cluster: initdb and pg_ctl, in this folder")
    pg_dir, pg_port = start_postgres(demo)

    demo.heading("The database and its role; the password only in each host's passfile")
    password = secrets.token_urlsafe(18)
    sql = f"CREATE ROLE dt LOGIN PASSWORD '{password}';\nCREATE DATABASE dt OWNER dt;\n"
    print("  (the SQL on stdin, never in argv: CREATE ROLE dt LOGIN PASSWORD '...';"
          " CREATE DATABASE dt OWNER dt;)")  # fmt: skip
    psql = [str(PG_BIN / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-h", str(pg_dir),
            "-p", str(pg_port), "-U", "postgres"]  # fmt: skip
    demo.run(psql, input=sql, expect="CREATE DATABASE")
    hosts = [Host(demo.workdir, name, pg_port) for name in ("host-a", "host-b")]
    a, b = hosts
    for host in hosts:
        host.write_passfile(pg_port, password)
    demo.run(["ls", "-l", str(a.passfile), str(b.passfile)])
    print(f"  the URL each host uses names its passfile, never the password:\n    {a.url}")

    demo.heading("Host A: dtadmin --database URL init makes the schema and the CA keys")
    a.state.mkdir(mode=0o700)
    demo.run(a.dtadmin("init", "--cluster", CLUSTER), expect="postgresql://127.0.0.1")
    demo.check(not (a.state / "cluster.db").exists(), "the state is in PostgreSQL, not SQLite")
    keys = sorted(p.name for p in (a.state / "ca").iterdir())
    print(f"  {a.state}/ca: {' '.join(keys)} (the keys; the state is in the database)")
    print("  and a URL with a password in it is refused, wherever it comes from:")
    demo.run(
        ["dtadmin", "--database", "postgresql://dt:hunter2@127.0.0.1/dt",
         "--state", str(a.state), "users", "ls"],
        expect_rc=5, expect="carries a password",
    )  # fmt: skip

    demo.heading("Host B: a copy of host A's ca/ keys, mode 0600 in a 0700 ca/")
    b.state.mkdir(mode=0o700)
    (b.state / "ca").mkdir(mode=0o700)
    demo.run(["cp", "-p", *(str(a.state / "ca" / k) for k in keys), str(b.state / "ca")])
    demo.run(b.dtadmin("cluster", "show"), expect=CLUSTER)

    demo.heading("Each host's TOML: the database key, and the balancer trusted for PROXY")
    for host in hosts:
        host.write_config()
    demo.run(["cat", str(a.config)], expect="database =")

    cluster = Cluster.open(a.state, database=a.url)
    demo.defer(cluster.close)
    node = demo.enter(lambda detach: sshd_node(demo.workdir / "node", cluster, detach=detach))

    demo.heading("Two `dt-bastion serve`, one per host, on the one database")
    for host in hosts:
        demo.defer(host.serve.stop)
        print(f"$ {shlex.join(host.command())} &    # on {host.name}", flush=True)
    with ThreadPoolExecutor(len(hosts)) as pool:  # both at once, as two hosts would
        list(pool.map(lambda host: host.serve.start(), hosts))
    for host in hosts:
        ready = [ln for ln in host.serve.log().splitlines() if "dt-bastion ready on" in ln]
        print(f"  {host.name}: {ready[-1].strip()}")

    demo.heading("HAProxy in front: TCP mode, send-proxy-v2, health checks on /healthz")
    lb = demo.enter(
        lambda detach: haproxy(demo.workdir / "haproxy", [h.serve.backend for h in hosts])
    )
    backend = lb.config.read_text().split("backend bastions\n", 1)[1]
    print("  haproxy.cfg (checked with haproxy -c), its backend:")
    print("".join(f"    {line}\n" for line in backend.strip().splitlines()), end="")
    # tests/haproxy.py waits for the frontend's port; the runtime API's socket may come
    # a moment later
    admin = lb.config.parent / "admin.sock"
    demo.check(wait_for("admin.sock", admin.exists, 10), f"HAProxy never made {admin}")
    for host in hosts:
        lb.wait_status(host.name, "UP")
    print(f"  haproxy -db on 127.0.0.1:{lb.port}; its runtime API says: {lb.status()}")
    proxy = f"127.0.0.1:{lb.port}"

    demo.heading("On host A: a node, the balancer as the public address, and alice")
    demo.env["DT_STATE"] = str(a.state)
    demo.env["DT_DATABASE"] = a.url
    print(f"$ export DT_STATE={a.state} DT_DATABASE={shlex.quote(a.url)}")
    a.exported = True  # from here on, host A's dtadmin takes both from the environment
    dtadmin = ["dtadmin"]
    demo.run([*dtadmin, "nodes", "add", "node-1", "--addr", f"127.0.0.1:{node.port}"])
    demo.run([*dtadmin, "cluster", "set", "public-addr", proxy])
    out = demo.run([*dtadmin, "users", "add", "alice", "--roles", "access", "--logins", LOGIN])
    token = printed_token(out.stdout)
    pin = out.stdout.split("--ca-pin ", 1)[1].split()[0]  # the host CA's, as printed
    demo.check(pin == cluster.ca.host_ca_fingerprint, "users add printed the host CA's pin")

    demo.heading("alice signs up and logs in through HAProxy, then plain `ssh -J`")
    secret = demo.signup(proxy, token, pin)
    config = demo.first_login(proxy, secret, pin)

    demo.heading("A session held open through HAProxy: which bastion holds it?")
    held = hold(demo, config)
    owner, _ = holder(demo, hosts, cluster)
    other = next(h for h in hosts if h is not owner)

    demo.heading(f"A lock written on {other.name} cuts the session {owner.name} holds")
    out = demo.run(
        other.dtadmin("lock", "--user", "alice", "--message", f"demo: locked on {other.name}"),
        expect="locked",
    ).stdout
    lock_id = out.rsplit("lock id ", 1)[1].split(")")[0]
    try:
        held.wait(20)
    except subprocess.TimeoutExpired:
        demo.check(False, "the held session was still open 20 s after the lock")
    # (only ssh's own lines: the node's shell may add noise from root's rc files)
    assert held.stderr is not None
    said = [ln for ln in held.stderr.read().splitlines() if "dt-bastion" in ln]
    print(f"  the held ssh exited {held.returncode}; it was told:")
    print("".join(f"    {line}\n" for line in said), end="")
    demo.check(any("is locked" in line for line in said), "alice was told she is locked")
    made = audit(cluster, "lock.create")
    cut = audit(cluster, "session.terminated")
    demo.check(made and cut, "a lock.create and a session.terminated row")
    demo.run(other.dtadmin("audit", "ls", "--user", "alice", "--type", "session.terminated"),
             expect=f"locked on {other.name}")  # fmt: skip
    took = cut[-1].time - made[-1].time
    demo.check(took < 5, f"the cut took {took:.2f} s after the lock")
    print(f"  cut {took * 1000:.0f} ms after the lock was committed (the two rows' times)")
    demo.ssh(config, expect_ok=False, expect="locked")
    demo.run([*dtadmin, "locks", "rm", lock_id])

    demo.heading("kill -9 the bastion holding a session: alice still gets in")
    held = hold(demo, config)
    victim, row = holder(demo, hosts, cluster)
    sibling = next(h for h in hosts if h is not victim)
    assert victim.serve.proc is not None
    demo.run(["kill", "-9", str(victim.serve.proc.pid)])
    killed = time.monotonic()
    victim.serve.proc.wait(10)
    try:
        held.wait(20)
    except subprocess.TimeoutExpired:
        demo.check(False, "the session through the killed bastion stayed open")
    print(f"  the session through {victim.name} ended with it (ssh exited {held.returncode})")
    for _ in range(2):  # round robin: one of them would be the dead one's turn
        demo.ssh(config, expect_ok=True)

    demo.heading(f"{sibling.name} ends the dead bastion's session on record")

    def recovered() -> list[Any]:
        return [
            e for e in audit(cluster, "session.end")
            if e.fields.get("recovered") and e.fields.get("session_id") == row.session_id
            and e.fields.get("bastion") == row.instance
        ]  # fmt: skip

    ends = wait_for("the recovered session.end", recovered, 30)
    demo.check(ends, f"no recovered session.end for {victim.name}'s session after 30 s")
    print(f"  {time.monotonic() - killed:.1f} s after the kill (a free liveness lock, seen twice)")
    demo.run(sibling.dtadmin("audit", "ls", "--user", "alice", "--type", "session.end",
                             "--limit", "1"), expect="killed or crashed")  # fmt: skip
    demo.run(sibling.dtadmin("sessions", "ls"), expect="no open sessions")
    lb.wait_status(victim.name, "DOWN")
    print(f"  HAProxy's health checks: {lb.status()}")

    demo.heading("One audit chain for both bastions, verified from host B")
    demo.run(b.dtadmin("audit", "verify"), expect="audit log intact")


def leftovers(workdir: Path) -> list[str]:
    """Processes still running that were started for ``workdir``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if str(workdir) in cmdline and stat.rpartition(")")[2].split()[0] != "Z":
            found.append(f"{proc.name} {cmdline.strip()[:120]}")
    return found


def main(demo_class: Any, failed: type[Exception]) -> int:
    from tests.haproxy import HAPROXY
    from tests.postgres import available
    from tests.sshd import SSHD

    missing = [
        what
        for what, ok in (
            ("PostgreSQL (/usr/lib/postgresql/*/bin)", available()),
            (f"HAProxy ({HAPROXY})", Path(HAPROXY).exists()),
            (f"sshd ({SSHD})", Path(SSHD).exists()),
        )
        if not ok
    ]
    if missing:
        print(f"the HA demo needs {', '.join(missing)}: run scripts/setup.sh", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="dt-ha-"))
    if os.geteuid() == 0:
        workdir.chmod(0o711)  # PostgreSQL runs as nobody: it must reach its folder in here
    demo = demo_class(workdir)
    if os.environ.get("DT_DEMO_TIMES"):
        heading, t0 = demo.heading, time.monotonic()
        demo.heading = lambda text: heading(f"{text}  [{time.monotonic() - t0:.1f} s]")
    began = time.monotonic()
    passed = False
    try:
        story(demo)
        passed = True
    except (failed, AssertionError, subprocess.TimeoutExpired) as exc:
        print(f"\n\033[1;31mdemo failed: {exc}\033[0m", file=sys.stderr)
    finally:
        demo.close()
        wait_for("nothing left", lambda: not leftovers(workdir), 10)
        left = leftovers(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
    if left:
        print("still running after the demo:\n  " + "\n  ".join(left), file=sys.stderr)
        return 1
    if not passed:
        return 1
    print(
        f"\n  everything stopped: PostgreSQL, HAProxy, both bastions, the node ({time.monotonic() - began:.0f} s)"
    )
    print("\n\033[1;32mdemo passed: every step behaved as the guide says\033[0m")
    return 0
