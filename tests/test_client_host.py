"""The client host as another local user attacks it: argv, DT_HOME, the ssh-agent.

Real `dtclient` processes against a real `dt-bastion serve`, prompts in a real
terminal (pexpect), a real `ssh-agent` on a socket in the test's temp dir. Tests that
need a second user use `nobody` (chown as root) and skip cleanly without root.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest

from bastion.cluster import init_cluster
from bastion.credentials import totp_now
from bastion.protocol import files
from tests.sshd import LOGIN, bastion_server
from tests.swtpm import trust_test_tpms
from tests.tokens import printed_token

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
PASSWORD = "correct horse battery"
_names = iter(range(1000))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client-host")
    cluster = init_cluster(tmp / "state", "host-test")
    with bastion_server(tmp / "state") as bastion:
        pin = cluster.ca.host_ca_fingerprint
        yield type(
            "Env",
            (),
            {"tmp": tmp, "cluster": cluster, "proxy": f"127.0.0.1:{bastion.port}", "pin": pin},
        )
    cluster.close()


def environ(env, home, **extra):
    return {
        **os.environ,
        "DT_STATE": str(env.cluster.state_dir),
        "DT_HOME": str(home),
        "COLUMNS": "200",
        "SSH_AUTH_SOCK": "",
        **extra,
    }


def run(env, home, *args, input=None, **extra):
    proc = subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
        env=environ(env, home, **extra),
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def add_user(env):
    name = f"h{next(_names)}"
    out = run(env, env.tmp, "dtadmin", "users", "add", name, "--roles", "access", "--logins", LOGIN)
    assert out.returncode == 0, out.stderr
    return name, printed_token(out.stdout)


def terminal(env, home, *args, **extra):
    """dtclient in a real pseudo-terminal, as a person runs it."""
    return pexpect.spawn(
        str(BIN / "dtclient"),
        list(args),
        env=environ(env, home, **extra),
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 200),
    )


def cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def finish_signup(term, secret):
    term.sendline(PASSWORD)
    term.expect("Repeat the password")
    term.sendline(PASSWORD)
    term.expect("One-time code")
    term.sendline(totp_now(secret))
    term.expect("Signed up")
    term.expect(pexpect.EOF)
    term.close()
    assert term.exitstatus == 0, term.before


def piped_signup(env, home, args, first_lines=""):
    """dtclient signup with pipes: ``first_lines`` before the URI, then the answers."""
    proc = subprocess.Popen(
        [str(BIN / "dtclient"), "signup", "--proxy", env.proxy, "--ca-pin", env.pin, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ(env, home),
    )
    proc.stdin.write(first_lines)
    proc.stdin.flush()
    secret = None
    for line in proc.stdout:
        match = re.search(r"secret=([A-Z2-7]+)", line)
        if match:
            secret = match.group(1)
            break
    assert secret, proc.stderr.read()
    proc.stdin.write(f"{PASSWORD}\n{PASSWORD}\n{totp_now(secret)}\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    return secret, err


def signup(env, home, token):
    """A plain signup, the token pasted at the prompt; returns the TOTP secret."""
    return piped_signup(env, home, [], first_lines=token + "\n")[0]


def login(env, home, name, secret, **extra):
    code = totp_now(secret, time.time() + 30)  # the signup used this step's
    return run(
        env,
        home,
        "dtclient",
        "login",
        "--proxy",
        env.proxy,
        "--user",
        name,
        "--password",
        input=f"{PASSWORD}\n{code}\n",
        **extra,
    )


# -- 1. secrets never in argv ----------------------------------------------------------------


def test_signup_token_typed_at_the_prompt_is_not_in_the_process_command_line(env, tmp_path):
    name, token = add_user(env)
    term = terminal(env, tmp_path / "home", "signup", "--proxy", env.proxy, "--ca-pin", env.pin)
    term.expect("Signup token")
    term.sendline(token)
    term.expect(r"secret=([A-Z2-7]+)")
    assert token not in term.before  # not echoed either
    secret = term.match.group(1)
    term.expect("New password")
    # dtclient now waits at its password prompt, the token in memory: what another local
    # user can read of it (any user may read /proc/PID/cmdline) holds no token.
    line = cmdline(term.pid)
    assert b"signup" in line and token.encode() not in line
    finish_signup(term, secret)
    assert login(env, tmp_path / "home", name, secret).returncode == 0


def test_signup_token_from_a_file_or_standard_input(env, tmp_path):
    _, token = add_user(env)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    _, err = piped_signup(env, tmp_path / "h1", ["--token-file", str(token_file)])
    assert "warning" not in err
    _, token = add_user(env)
    _, err = piped_signup(env, tmp_path / "h2", ["--token-file", "-"], first_lines=token + "\n")
    assert "warning" not in err
    _, token = add_user(env)  # no option at all: the token is the first line asked for
    piped_signup(env, tmp_path / "h3", [], first_lines=token + "\n")


def test_token_on_the_command_line_still_works_but_warns_why(env, tmp_path):
    _, token = add_user(env)
    term = terminal(
        env, tmp_path / "home", "signup", "--proxy", env.proxy, "--ca-pin", env.pin,
        "--token", token,
    )  # fmt: skip
    term.expect("warning: --token puts the token on the command line")
    term.expect(r"secret=([A-Z2-7]+)")
    assert "--token-file" in term.before.replace("\r\n", " ").replace("\n", " ")
    secret = term.match.group(1)
    term.expect("New password")
    assert token.encode() in cmdline(term.pid)  # which is what the warning is about
    finish_signup(term, secret)


def test_token_options_refuse_clearly(env, tmp_path):
    both = run(
        env, tmp_path, "dtclient", "signup", "--proxy", env.proxy,
        "--token", "x", "--token-file", "-",
    )  # fmt: skip
    assert both.returncode == 2 and "not both" in both.stderr
    missing = run(
        env, tmp_path, "dtclient", "signup", "--proxy", env.proxy,
        "--token-file", str(tmp_path / "nope"),
    )  # fmt: skip
    assert missing.returncode == 2 and "cannot read the token file" in missing.stderr
    empty = run(env, tmp_path, "dtclient", "signup", "--proxy", env.proxy, input="\n")
    assert empty.returncode == 2 and "token is empty" in empty.stderr


def test_admin_output_shows_the_safe_commands(env):
    out = run(env, env.tmp, "dtadmin", "users", "add", f"h{next(_names)}", "--roles", "access")
    token = printed_token(out.stdout)
    assert "dtclient signup --proxy BASTION-HOST:3022 --ca-pin SHA256:" in out.stdout
    assert "--token " not in out.stdout and out.stdout.count(token) == 1
    dev = run(env, env.tmp, "dtadmin", "device", "add", "--asset-tag", "SAFE-1", "--enroll")
    token = printed_token(dev.stdout)
    assert "dtclient device enroll --token-file -" in dev.stdout
    assert "--token " not in dev.stdout and dev.stdout.count(token) == 1


def test_enrollment_token_pasted_at_a_terminal_prompt(env, tmp_path, swtpm):
    name, token = add_user(env)
    home = tmp_path / "home"
    secret = signup(env, home, token)
    assert login(env, home, name, secret).returncode == 0
    trust_test_tpms(env.cluster.store, swtpm.provisioned)
    dev = run(env, env.tmp, "dtadmin", "device", "add", "--asset-tag", "PASTE-1", "--enroll")
    enroll_token = printed_token(dev.stdout)
    term = terminal(
        env, home, "device", "enroll", "--token-file", "-", "--asset-tag", "PASTE-1",
        DT_TPM_TCTI=swtpm.tcti,
    )  # fmt: skip
    term.expect("Enrollment token")
    assert enroll_token.encode() not in cmdline(term.pid)
    term.sendline(enroll_token)
    term.expect(pexpect.EOF)
    term.close()
    assert enroll_token not in term.before
    assert term.exitstatus == 0 and "registered and enrolled" in term.before, term.before


# -- 2. DT_HOME: nobody else's links, nobody else's directory --------------------------------


def _victim(tmp_path: Path) -> Path:
    """A file of another user's that the attack wants dtclient to write into."""
    victim = tmp_path / "victim"
    victim.write_text("the victim's own file\n")
    if os.geteuid() == 0:
        os.chown(victim, 65534, 65534)
    return victim


def test_atomic_write_never_writes_through_a_planted_link(tmp_path, monkeypatch):
    victim = _victim(tmp_path)
    target = tmp_path / "dir" / "id_ed25519"
    target.parent.mkdir(mode=0o700)
    target.symlink_to(victim)
    # the temp name an older dtclient used: predictable from the pid
    (target.parent / f".{target.name}.tmp{os.getpid()}").symlink_to(victim)
    files.atomic_write(target, b"PRIVATE KEY\n", 0o600)
    assert victim.read_text() == "the victim's own file\n"
    assert not target.is_symlink() and target.read_bytes() == b"PRIVATE KEY\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    # a link at the very temp name chosen makes the write fail, never follow it
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: "guessed")
    (target.parent / f".{target.name}.guessed.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        files.atomic_write(target, b"OTHER KEY\n", 0o600)
    assert victim.read_text() == "the victim's own file\n"
    assert target.read_bytes() == b"PRIVATE KEY\n"


def test_login_with_links_planted_in_its_home_leaves_the_victim_alone(env, tmp_path):
    name, token = add_user(env)
    home = tmp_path / "home"
    secret = signup(env, home, token)
    victim = _victim(tmp_path)
    keys = home / "clusters" / "host-test" / "keys"
    keys.mkdir(mode=0o700)
    planted = ["id_ed25519", "id_ed25519.pub", "id_ed25519-cert.pub"]
    # and the temp names an older dtclient would pick: one per likely next pid
    last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
    planted += [f".{n}.tmp{pid}" for n in planted[:3] for pid in range(last, last + 400)]
    for link in planted:
        (keys / link).symlink_to(victim)
    result = login(env, home, name, secret)
    assert result.returncode == 0, result.stderr
    assert victim.read_text() == "the victim's own file\n"
    key = keys / "id_ed25519"
    assert not key.is_symlink() and b"PRIVATE KEY" in key.read_bytes()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_a_home_others_can_write_is_refused_with_the_fix(env, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o777)
    for args in (("login", "--proxy", env.proxy, "--user", "x"), ("status",), ("logout",)):
        result = run(env, home, "dtclient", *args, input="pw\n123456\n")
        assert result.returncode == 5, (args, result.stderr)
        assert f"run: chmod 700 {home}" in result.stderr
    assert list(home.iterdir()) == []  # nothing written into it
    home.chmod(0o700)
    parent = tmp_path / "shared"
    parent.mkdir()
    parent.chmod(0o777)  # not sticky: others can rename our home away
    result = run(env, parent / ".dt", "dtclient", "status")
    assert result.returncode == 5 and f"chmod go-w {parent}" in result.stderr


def test_a_home_another_user_owns_is_refused(env, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("making a directory another user's needs root")
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    os.chown(home, 65534, 65534)
    result = run(env, home, "dtclient", "status")
    assert result.returncode == 5 and "belongs to nobody" in result.stderr
    assert f"chown -R root {home}" in result.stderr


def test_a_new_home_and_its_missing_parents_are_made_private(env, tmp_path):
    name, token = add_user(env)
    home = tmp_path / "a" / "b" / ".dt"
    secret = signup(env, home, token)
    assert login(env, home, name, secret).returncode == 0
    keys = home / "clusters" / "host-test" / "keys"
    for made in (tmp_path / "a", tmp_path / "a" / "b", home, home / "clusters", keys):
        assert stat.S_IMODE(made.stat().st_mode) == 0o700, made


# -- 4. ssh-agent: this cluster's identities only, gone at logout ----------------------------


def ssh_add_list(sock: Path) -> list[str]:
    out = subprocess.run(
        ["ssh-add", "-l"],
        capture_output=True,
        text=True,
        env={**os.environ, "SSH_AUTH_SOCK": str(sock)},
        timeout=30,
    ).stdout
    return [line for line in out.splitlines() if line.startswith(("256 ", "2048 ", "3072 "))]


@pytest.fixture
def ssh_agent(tmp_path):
    sock = tmp_path / "agent.sock"
    out = subprocess.run(
        ["ssh-agent", "-s", "-a", str(sock)], capture_output=True, text=True, check=True
    ).stdout
    pid = int(out.split("SSH_AGENT_PID=")[1].split(";")[0])
    try:
        yield sock
    finally:
        os.kill(pid, 15)


def test_login_replaces_and_logout_removes_this_clusters_agent_identities(env, tmp_path, ssh_agent):
    own = tmp_path / "own_key"  # the person's own key: dtclient must not touch it
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(own)], check=True)
    agent_env = {**os.environ, "SSH_AUTH_SOCK": str(ssh_agent)}
    subprocess.run(["ssh-add", "-q", str(own)], env=agent_env, check=True, capture_output=True)
    own_line = ssh_add_list(ssh_agent)
    assert len(own_line) == 1
    name, token = add_user(env)
    home = tmp_path / "home"
    secret = signup(env, home, token)

    first = login(env, home, name, secret, SSH_AUTH_SOCK=str(ssh_agent))
    assert first.returncode == 0, first.stderr
    after_first = ssh_add_list(ssh_agent)
    assert len(after_first) == 3 and own_line[0] in after_first  # own key + key + cert

    renewed = run(
        env, home, "dtclient", "login", "--proxy", env.proxy, "--user", name,
        SSH_AUTH_SOCK=str(ssh_agent),
    )  # fmt: skip
    assert renewed.returncode == 0 and "Renewing" in renewed.stderr, renewed.stderr
    after_second = ssh_add_list(ssh_agent)
    assert len(after_second) == 3 and own_line[0] in after_second
    assert not (set(after_second) - set(own_line)) & set(after_first)  # the old pair is gone
    assert sum("CERT" in line for line in after_second) == 1

    out = run(env, home, "dtclient", "logout", SSH_AUTH_SOCK=str(ssh_agent))
    assert out.returncode == 0 and "Logged out of host-test." in out.stdout
    assert ssh_add_list(ssh_agent) == own_line
