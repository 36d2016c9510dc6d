"""`dtclient signup` and `login` in a real terminal (pexpect), as a person who knows
`tsh login` types them: why a login failed is said, profiles per cluster, the CA pin
before the password, a refused renewal asks for the password, prompts a spinner never
hides and Ctrl-C ends, a short password refused before the code, a wrong code asked
again under the same QR code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pexpect
import pyotp
import pytest

from bastion.authz.records import Node
from bastion.cluster import init_cluster
from tests.deployed.people import Terminal, plain
from tests.sshd import LOGIN, bastion_server, sshd_node
from tests.test_login import BIN, PASSWORD, ca_pin, run
from tests.tokens import printed_token

pytestmark = pytest.mark.integration
_names = iter(range(1000))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("terminal")
    cluster = init_cluster(tmp / "state", "term-test")
    with sshd_node(tmp / "node", cluster) as node, bastion_server(tmp / "state") as bastion:
        cluster.store.add_node(Node("node-1", "127.0.0.1", node.port))
        yield type(
            "Env",
            (),
            {
                "tmp": tmp,
                "cluster": cluster,
                "bastion": bastion,
                "node": node,
                "proxy": f"127.0.0.1:{bastion.port}",
            },
        )
    cluster.close()


class Person:
    """One user at a terminal: their own DT_HOME, an authenticator app (the TOTP secret)."""

    def __init__(self, env, home: Path, name: str | None = None) -> None:
        self.env, self.home, self.name = env, home, name
        self.secret: str | None = None
        self.last_step = 0

    def environ(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "DT_HOME": str(self.home),
            "DT_STATE": str(self.env.cluster.state_dir),
            "SSH_AUTH_SOCK": "",
            "COLUMNS": "200",
            **extra,
        }

    def terminal(self, *args: str, timeout: float = 30, **extra: str) -> Terminal:
        return Terminal(
            str(BIN / "dtclient"),
            list(args),
            env=self.environ(**extra),
            encoding="utf-8",
            timeout=timeout,
            dimensions=(50, 200),
        )

    def code(self) -> str:
        """The next code the app shows, never one already used (steps are single use)."""
        assert self.secret
        totp = pyotp.TOTP(self.secret)
        now = int(time.time() // 30)
        step = max(self.last_step + 1, now)
        if step > now + 1:
            time.sleep((step - 1) * 30 - time.time() + 0.2)
        self.last_step = step
        return totp.at(step * 30)

    def forget_spent_codes(self) -> None:
        """Clear the step the bastion last spent, as if no code had been used yet. The
        bastion takes a code of the step before, this or the next 30 s step and never one
        at or below the last it spent, so code() yields two codes, then waits for the
        clock: a test that needs more codes calls this instead of waiting up to 60 s."""
        store = self.env.cluster.store
        user = store.get_user(self.name)
        store.set_user_secrets(self.name, user.password_hash, user.totp_secret, None)
        self.last_step = 0

    def dtclient(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(BIN / "dtclient"), *args],
            env=self.environ(**extra),
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def signup(self, token: str, pin: str) -> None:
        term = self.terminal("signup", "--proxy", self.env.proxy, "--ca-pin", pin)
        term.expect("Signup token")
        term.sendline(token)
        term.expect(r"secret=([A-Z2-7]+)")
        self.secret = term.match.group(1)
        term.expect("New password")
        term.sendline(PASSWORD)
        term.expect("Repeat the password")
        term.sendline(PASSWORD)
        term.expect("One-time code")
        term.sendline(self.code())
        term.expect("Signed up")
        finish(term, 0)

    def login(self, *args: str) -> str:
        term = self.terminal("login", *args)
        term.expect("Password for")
        term.sendline(PASSWORD)
        term.expect("One-time code")
        term.sendline(self.code())
        return finish(term, 0)


def finish(term: Terminal, status: int | None) -> str:
    term.expect(pexpect.EOF)
    term.close()
    out = plain(term.before or "")
    if status is not None:
        assert term.exitstatus == status, out
    return out


def new_user(env, tmp_path: Path) -> Person:
    name = f"t{next(_names)}"
    out = run(env, env.tmp, "dtadmin", "users", "add", name, "--roles", "access", "--logins", LOGIN)
    assert out.returncode == 0, out.stderr
    person = Person(env, tmp_path / f"home-{name}", name)
    person.signup(printed_token(out.stdout), ca_pin(env))
    return person


# -- 1. why a login failed is said --------------------------------------------------------------


def test_a_locked_user_is_told_the_lock_message_only_after_password_and_code(env, tmp_path):
    person = new_user(env, tmp_path)
    locked = run(
        env,
        env.tmp,
        "dtadmin",
        "lock",
        "--user",
        person.name,
        "--message",
        "laptop reported lost",
        "--ttl",
        "2h",
    )
    assert locked.returncode == 0, locked.stderr
    try:
        me = ("--proxy", env.proxy, "--user", person.name)
        term = person.terminal("login", *me)
        term.expect("Password for")
        term.sendline("not the password at all")
        term.expect("One-time code")
        term.sendline("123456")
        out = finish(term, 6)
        assert "wrong user name, password or code" in out and "laptop" not in out

        term = person.terminal("login", *me)
        term.expect("Password for")
        term.sendline(PASSWORD)
        term.expect("One-time code")
        term.sendline(person.code())
        out = finish(term, 6)
        assert "laptop reported lost" in out, out
        assert re.search(r"until \d{4}-\d\d-\d\d \d\d:\d\d UTC", out), out
        assert "wrong user name" not in out
    finally:
        for lock in env.cluster.store.list_locks(now=time.time()):
            if lock.target == person.name:
                run(env, env.tmp, "dtadmin", "lock", "rm", lock.id)


def test_a_used_signup_token_is_said_to_be_used(env, tmp_path):
    name = f"t{next(_names)}"
    out = run(env, env.tmp, "dtadmin", "users", "add", name, "--roles", "access", "--logins", LOGIN)
    token = printed_token(out.stdout)
    person = Person(env, tmp_path / "home", name)
    person.signup(token, ca_pin(env))
    again = person.terminal("signup", "--proxy", env.proxy)
    again.expect("Signup token")
    again.sendline(token)
    out = finish(again, 8)
    assert "already used" in out and "ask an admin" in out, out


def test_a_plain_sshd_at_the_proxy_address_is_not_a_bastion(env, tmp_path):
    person = Person(env, tmp_path / "home")
    term = person.terminal("login", "--proxy", f"127.0.0.1:{env.node.port}", "--user", "someone")
    index = term.expect(["not a dt-bastion", "Password for", r"\[y/N\]"])
    out = plain(term.before or "") + (term.after if isinstance(term.after, str) else "")
    assert index == 0, out
    out += finish(term, 14)
    assert "OpenSSH" in out and "--proxy" in out, out


# -- 2. profiles per cluster --------------------------------------------------------------------


def test_login_remembers_proxy_and_user_per_cluster_side_by_side(env, tmp_path):
    person = new_user(env, tmp_path)
    person.login("--proxy", env.proxy, "--user", person.name, "--password")
    person.forget_spent_codes()  # a third code, without waiting for the clock
    out = person.login("--password")  # neither --proxy nor --user: the profile has them
    assert f"Logged in as: {person.name}" in out

    other_state = tmp_path / "other-state"
    other = init_cluster(other_state, "second")
    try:
        with bastion_server(other_state) as second:
            out = run(
                env,
                tmp_path,
                "dtadmin",
                "users",
                "add",
                person.name,
                "--roles",
                "access",
                "--logins",
                LOGIN,
                "--state",
                str(other_state),
            )
            token = printed_token(out.stdout)
            pin = json.loads(
                run(
                    env,
                    tmp_path,
                    "dtadmin",
                    "ca",
                    "export",
                    "--type",
                    "host",
                    "--format",
                    "json",
                    "--state",
                    str(other_state),
                ).stdout
            )["fingerprint"]
            proxy2 = f"127.0.0.1:{second.port}"
            signup = person.terminal("signup", "--proxy", proxy2, "--ca-pin", pin)
            signup.expect("Signup token")
            signup.sendline(token)
            signup.expect(r"secret=([A-Z2-7]+)")
            first_secret, person.secret, person.last_step = person.secret, signup.match.group(1), 0
            for prompt in ("New password", "Repeat"):
                signup.expect(prompt)
                signup.sendline(PASSWORD)
            signup.expect("One-time code")
            signup.sendline(person.code())
            finish(signup, 0)
            person.login()  # the profile signup left: cluster "second"
            status = person.dtclient("status")
            assert status.returncode == 0, status.stderr
            assert "Cluster:       second" in status.stdout or "second" in status.stdout
            rows = json.loads(person.dtclient("status", "--format", "json").stdout)["profiles"]
            assert {(r["cluster"], r["current"], r["logged_in"]) for r in rows} == {
                ("term-test", False, True),
                ("second", True, True),
            }
            assert re.search(r"^\* second ", status.stdout, re.MULTILINE), status.stdout
            assert re.search(r"^  term-test ", status.stdout, re.MULTILINE), status.stdout
            # each cluster its own key files; choose one without switching
            first = json.loads(
                person.dtclient("status", "--format", "json", DT_CLUSTER="term-test").stdout
            )
            assert first["cluster"] == "term-test" and first["logged_in_as"] == person.name
            renew = person.terminal("login", "--cluster", "term-test")
            renew.expect("Renewing")
            finish(renew, 0)
            assert person.dtclient("logout", "--all").returncode == 0
            rows = json.loads(person.dtclient("status", "--format", "json").stdout or "{}").get(
                "profiles"
            )
            assert rows is None  # not logged in anywhere: status exits 15
            assert person.dtclient("status").returncode == 15
            person.secret = first_secret
    finally:
        other.close()


def test_an_old_single_profile_home_is_moved_into_its_cluster_folder(env, tmp_path):
    person = new_user(env, tmp_path)
    person.login("--proxy", env.proxy, "--user", person.name)
    home = person.home
    folder = home / "clusters" / "term-test"
    for name in ("profile.json", "trusted.json", "known_hosts", "keys"):
        shutil.move(folder / name, home / name)  # as an earlier dtclient left it
    shutil.rmtree(home / "clusters")
    (home / "current").unlink()
    status = person.dtclient("status")
    assert status.returncode == 0, status.stderr
    assert "moved yours to" in status.stderr and f"Logged in as: {person.name}" in status.stdout
    assert (folder / "keys" / "id_ed25519").exists() and not (home / "keys").exists()
    term = person.terminal("login")
    term.expect("Renewing")
    finish(term, 0)


# -- 3. the CA pin before the password ----------------------------------------------------------


def test_a_wrong_pin_is_refused_before_the_password_is_asked(env, tmp_path):
    person = Person(env, tmp_path / "home")
    wrong = "SHA256:" + "A" * 43
    term = person.terminal("login", "--proxy", env.proxy, "--user", "nobody", "--ca-pin", wrong)
    index = term.expect(["possible man in the middle", "Password for"])
    assert index == 0, plain(term.before or "")
    finish(term, 14)


def test_the_trust_prompt_comes_before_the_password_and_ctrl_c_ends_it(env, tmp_path):
    person = Person(env, tmp_path / "home")
    term = person.terminal("login", "--proxy", env.proxy, "--user", "nobody")
    term.expect(r"Trust this cluster's host CA\? \[y/N\] ")
    term.sendintr()
    term.expect(pexpect.EOF, timeout=10)  # at once, not after Enter
    term.close()
    assert term.exitstatus == 130

    term = person.terminal("login", "--proxy", env.proxy, "--user", "nobody")
    term.expect(r"\[y/N\] ")
    term.send("y")
    term.expect("y")  # the typed answer shows
    # and nothing draws over it while the person thinks (a spinner redraws ~12 times a s)
    assert term.expect(["Logging in", pexpect.TIMEOUT], timeout=1) == 1
    term.sendline("")
    term.expect("Password for nobody")
    term.sendline("some password here")
    term.expect("One-time code")
    term.sendline("123456")
    assert "wrong user name, password or code" in finish(term, 6)


# -- 4. a refused renewal asks for the password -------------------------------------------------


def test_a_revoked_certificate_falls_back_to_password_and_code(env, tmp_path):
    person = new_user(env, tmp_path)
    person.login("--proxy", env.proxy, "--user", person.name)
    revoked = run(env, env.tmp, "dtadmin", "cert", "revoke", "--user", person.name)
    assert revoked.returncode == 0, revoked.stderr
    term = person.terminal("login", "--proxy", env.proxy, "--user", person.name)
    term.expect("Renewing")
    term.expect("renewal refused: the bastion refused your certificate")
    term.expect("Password for")
    assert "revoked" in plain(term.before or ""), term.before  # the SSH layer's banner
    term.sendline(PASSWORD)
    term.expect("One-time code")
    term.sendline(person.code())
    out = finish(term, 0)
    assert f"Logged in as: {person.name}" in out and "wrong password" not in out


# -- 6. prompts: the password rule up front, a wrong code asked again ---------------------------


def test_signup_refuses_a_short_password_first_and_asks_a_wrong_code_again(env, tmp_path):
    name = f"t{next(_names)}"
    out = run(env, env.tmp, "dtadmin", "users", "add", name, "--roles", "access", "--logins", LOGIN)
    person = Person(env, tmp_path / "home", name)
    term = person.terminal("signup", "--proxy", env.proxy, "--ca-pin", ca_pin(env))
    term.expect("Signup token")
    term.sendline(printed_token(out.stdout))
    term.expect(r"secret=([A-Z2-7]+)")
    person.secret = term.match.group(1)
    term.expect(r"New password \(at least (\d+) characters\)")
    term.sendline("short")
    assert term.expect(["too short", "Repeat the password", "One-time code"]) == 0
    term.expect("New password")
    term.sendline(PASSWORD)
    term.expect("Repeat the password")
    term.sendline(PASSWORD)
    term.expect("One-time code")
    term.sendline("000000")
    term.expect("One-time code")  # asked again, on the same connection
    seen = plain(term.before or "")
    assert "secret=" not in seen, seen  # no new QR code, no new secret
    term.sendline(person.code())
    term.expect("Signed up")
    finish(term, 0)
    assert f"Logged in as: {name}" in person.login("--proxy", env.proxy, "--user", name)


# -- 5. the TPM briefly unreachable --------------------------------------------------------------


def test_an_unreachable_tpm_never_costs_the_device_certificate(tmp_path, swtpm):
    from tests.sshd import free_port
    from tests.swtpm import trust_test_tpms

    cluster = init_cluster(tmp_path / "state", "tpm-test")
    trust_test_tpms(cluster.store, swtpm.provisioned)
    try:
        with bastion_server(tmp_path / "state") as bastion:
            env = type("Env", (), {"tmp": tmp_path, "cluster": cluster})
            env.proxy = f"127.0.0.1:{bastion.port}"
            out = run(
                env, tmp_path, "dtadmin", "users", "add", "dora", "--roles",
                "access,require-trusted-device", "--logins", LOGIN,
            )  # fmt: skip
            person = Person(env, tmp_path / "home", "dora")
            person.signup(printed_token(out.stdout), ca_pin(env))
            me = ("--proxy", env.proxy, "--user", "dora")
            person.login(*me)
            out = run(env, tmp_path, "dtadmin", "device", "add", "--asset-tag", "DORA", "--enroll")
            term = person.terminal(
                "device", "enroll", "--token-file", "-", "--asset-tag", "DORA", "--tpm", swtpm.tcti
            )
            term.expect("token")
            term.sendline(printed_token(out.stdout))
            finish(term, 0)
            term = person.terminal("login", *me)  # the TCTI saved at enrollment
            term.expect("Renewing")
            finish(term, 0)
            before = json.loads(person.dtclient("status", "--format", "json").stdout)
            assert before["device_trusted"], before

            gone = f"swtpm:host=127.0.0.1,port={free_port()}"  # DT_TPM_TCTI beats the saved one
            person.forget_spent_codes()  # two more codes below, without waiting a minute
            for args in ((), ("--password",)):
                term = person.terminal("login", *me, *args, DT_TPM_TCTI=gone)
                if args:
                    term.expect("Password for")
                    term.sendline(PASSWORD)
                    term.expect("One-time code")
                    term.sendline(person.code())
                out = finish(term, 13)
                assert "TPM could not be reached" in out and gone in out, out
                assert "Kept your current certificate" in out and "enroll" not in out, out
                after = json.loads(person.dtclient("status", "--format", "json").stdout)
                assert after["serial"] == before["serial"] and after["device_trusted"]

            person.dtclient("logout")  # no working device certificate left to keep
            term = person.terminal("login", *me, DT_TPM_TCTI=gone)
            term.expect("Password for")
            term.sendline(PASSWORD)
            term.expect("One-time code")
            term.sendline(person.code())
            out = finish(term, 0)
            assert "TPM could not be reached" in out and "stays enrolled" in out, out
            assert "dtclient device enroll" not in out, out
            events = cluster.store.list_audit(type="device.authenticate", user="dora")
            assert any(e.message.startswith("the client's TPM did not answer") for e in events)
    finally:
        cluster.close()


def test_tpm_given_as_a_device_path_means_the_device_tcti(tmp_path):
    person = Person(type("Env", (), {"cluster": type("C", (), {"state_dir": tmp_path})}), tmp_path)
    out = person.dtclient("device", "collect", "--tpm", str(tmp_path / "tpmrm0"))
    assert out.returncode == 13 and f"no TPM found at {tmp_path / 'tpmrm0'}" in out.stderr, out


def test_prompts_without_a_terminal_still_say_what_was_missing(env, tmp_path):
    person = Person(env, tmp_path / "home")
    out = person.dtclient("login", "--proxy", env.proxy, "--user", "x", "--ca-pin", ca_pin(env))
    assert out.returncode == 2 and "no answer on standard input for: Password for x" in out.stderr
    out = person.dtclient("login", "--proxy", env.proxy, "--user", "x")
    assert out.returncode == 2 and "Trust this cluster's host CA" in out.stderr, out.stderr
