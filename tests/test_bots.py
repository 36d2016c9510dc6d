"""Bots and `required-for-humans`: the one rule in the decision core, as the CA, the
bastion's checks, the accounts layer and `dt-node-principals` (its CLI, as sshd runs
it) each get it. The deployed tier (tests/deployed/test_bots.py) drives the same
through `dtadmin`, `dtclient`, `dt-bastion serve` and stock `ssh -J`."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from bastion import accounts
from bastion.authz import decide, rbac
from bastion.authz.facts import Facts
from bastion.authz.records import Role, User
from bastion.ca.authority import UserCertRequest
from bastion.ca.certs import parse_cert
from bastion.cluster import init_cluster
from bastion.node_principals import decide as node_decide
from bastion.protocol.certs import EXT_BOT
from bastion.protocol.errors import AccessDenied, AuthenticationFailed, TokenInvalid, UsageError

HUMANS = "required-for-humans"


@pytest.mark.parametrize(
    ("mode", "bot", "expected"),
    [
        (HUMANS, False, "required"),
        (HUMANS, True, "optional"),
        ("required", True, "required"),
        ("optional", False, "optional"),
        ("off", True, "off"),
        ("required-for-robots", True, "required"),  # unknown: a deny, as everywhere
        (None, True, "required"),
    ],
)
def test_mode_for_one_user(mode, bot, expected):
    assert rbac.mode_for(mode, bot=bot) == expected


@pytest.mark.parametrize(
    ("cluster", "role_mode", "human", "bot"),
    [
        (HUMANS, None, "required", "optional"),
        ("optional", HUMANS, "required", "optional"),  # a role can carry the mode
        (HUMANS, "required", "required", "required"),  # the stricter wins
        ("off", "bogus", "required", "required"),
        ("optional", "optional", "optional", "optional"),
    ],
)
def test_trust_mode_cluster_and_role(cluster, role_mode, human, bot):
    role = Role("r", device_trust_mode=role_mode)
    facts = Facts(cluster_mode=cluster, user=User("alice", ("r",)), roles=(role,))
    assert decide.trust_mode(facts) == human
    bot_facts = replace(facts, user=User("ci", ("r",), bot=True))
    assert decide.trust_mode(bot_facts) == bot
    assert decide.permissions(bot_facts).trust_mode == bot


def test_the_mode_is_a_valid_setting_and_role_option():
    assert rbac.check_trust_mode(HUMANS) == HUMANS
    with pytest.raises(UsageError):
        rbac.check_trust_mode("humans")


@pytest.fixture
def cluster(tmp_path):
    c = init_cluster(tmp_path / "state", "test")
    c.store.set_setting("device_trust_mode", HUMANS)
    c.store.add_user(User("alice", ("access",), ("root",)))
    c.store.add_user(User("ci", ("access",), ("deploy",), bot=True))
    yield c
    c.close()


def key():
    return ed25519.Ed25519PrivateKey.generate().public_key()


def test_bot_certificates_are_marked_short_lived_and_for_bots_only(cluster):
    issued = cluster.ca.sign(UserCertRequest("ci", key(), bot_only=True, now=1_800_000_000))
    cert = parse_cert(issued.openssh.encode())
    assert cert.is_bot and cert.extensions[EXT_BOT] == "ci"
    assert cert.key_id.startswith("bot-ci-") and cert.key_id == issued.record.key_id
    assert cert.valid_before - 1_800_000_000 == rbac.BOT_DEFAULT_TTL
    long = cluster.ca.sign(UserCertRequest("ci", key(), ttl=7 * 86400, bot_only=True))
    assert long.record.valid_before - long.record.valid_after <= rbac.BOT_MAX_TTL + 60
    with pytest.raises(AccessDenied, match="is a person, not a bot"):
        cluster.ca.sign(UserCertRequest("alice", key(), bot_only=True))
    refused = cluster.store.list_audit(type="cert.create")[-1]
    assert not refused.success and refused.user == "alice"
    human = parse_cert(cluster.ca.sign_user("alice", key()).openssh.encode())
    assert not human.is_bot and EXT_BOT not in human.extensions


def test_the_bastion_holds_a_certificate_to_its_kind(cluster):
    """A bot-marked certificate never stands for a person of that name (and back)."""
    store = cluster.store
    cert = parse_cert(cluster.ca.sign(UserCertRequest("ci", key(), bot_only=True)).openssh.encode())
    now = cert.valid_after + 120
    facts = store.facts(user="ci", serial=cert.serial, now=now)
    claims = decide.check_certificate(cert, facts, now)
    assert claims.bot and decide.check_device(claims, facts, now) == "optional"
    as_person = replace(facts, user=replace(facts.user, bot=False))
    with pytest.raises(AccessDenied, match="issued to a bot"):
        decide.check_certificate(cert, as_person, now)
    with pytest.raises(AccessDenied, match="trusted device is required"):
        human = parse_cert(cluster.ca.sign_user("alice", key()).openssh.encode())
        hf = store.facts(user="alice", serial=human.serial, now=now)
        decide.check_device(decide.check_certificate(human, hf, now), hf, now)


def test_bot_tokens_expire_are_revoked_and_never_serve_a_person(cluster):
    store = cluster.store
    secret, token = accounts.issue_bot_token(store, "ci", ttl=60, now=1_000.0)
    assert accounts.bot_token_user(store, secret, now=1_030.0) == ("ci", token.token_hash)
    with pytest.raises(TokenInvalid, match="expired"):
        accounts.bot_token_user(store, secret, now=1_061.0)
    with pytest.raises(AccessDenied, match="is a person"):
        accounts.issue_bot_token(store, "alice")
    uses = store.list_audit(type="token.use")
    assert [e.success for e in uses] == [True, False]

    secret, token = accounts.issue_bot_token(store, "ci")
    request = UserCertRequest("ci", key(), bot_token_hash=token.token_hash)
    assert cluster.ca.sign(request).record.user == "ci"
    store.remove_tokens("bot", "ci", token.token_hash)
    with pytest.raises(AccessDenied, match="not valid"):
        cluster.ca.sign(request)  # decided again inside the signing transaction
    with pytest.raises(AccessDenied, match="not valid"):
        accounts.recheck_bot_token(store, "ci", token.token_hash, 2e9)
    # A token whose hash is a person's name's never gets them a certificate.
    with pytest.raises(AccessDenied):
        cluster.ca.sign(UserCertRequest("alice", key(), bot_token_hash=token.token_hash))


def test_a_bot_never_signs_up_logs_in_with_a_password_or_enrolls(cluster):
    store = cluster.store
    with pytest.raises(UsageError, match="bots never sign up"):
        accounts.issue_signup_token(store, "ci")
    with pytest.raises(AuthenticationFailed):
        accounts.check_password_login(store, "ci", "x" * 16, "123456")
    assert "a bot cannot log in with a password" in store.list_audit(type="auth.failed")[-1].message
    with pytest.raises(AccessDenied, match="cannot enroll a device"):
        decide.check_may_enroll(store.facts(user="ci", now=0))

    # A person's unused signup token outlives the person; it never signs up a bot of
    # the same name (dtadmin bots add also removes it).
    token = accounts.issue_signup_token(store, "alice")
    store.remove_user("alice")
    store.add_user(User("alice", ("access",), bot=True))
    with pytest.raises(TokenInvalid, match="a bot cannot sign up"):
        accounts.signup_token_user(store, token)


def test_node_helper_required_for_humans(cluster):
    """The helper, without state and with the state a cluster publishes for nodes."""
    import json
    import time

    from bastion.admin.nodes import node_state
    from bastion.authz import published

    bot = parse_cert(cluster.ca.sign(UserCertRequest("ci", key(), bot_only=True)).openssh.encode())
    person = parse_cert(cluster.ca.sign_user("alice", key()).openssh.encode())
    fps = {cluster.ca.user_ca_fingerprint}
    doc = node_state(cluster, now=time.time(), valid_for=3600.0)
    assert doc["users"]["ci"]["bot"] is True and "bot" not in doc["users"]["alice"]
    trusted = {cluster.ca.user_ca_fingerprint: cluster.ca.user_ca.public_key()}
    state = published.parse(json.dumps(doc).encode(), trusted)
    assert state.users["ci"].bot and not state.users["alice"].bot

    # Without state: the node's own --device-trust-mode decides.
    kw = dict(ca_fingerprints=fps, require_device=True)
    assert node_decide("deploy", bot, device_trust_mode=HUMANS, **kw).principals == ("deploy",)
    refused = node_decide("root", person, device_trust_mode=HUMANS, **kw)
    assert refused.principals == () and "device" in refused.reason
    assert node_decide("deploy", bot, **kw).principals == ()  # plain required: no bot
    assert node_decide("deploy", bot, device_trust_mode="bogus", **kw).principals == ()
    # With the published state of a required-for-humans cluster: the cluster decides.
    kw = dict(ca_fingerprints=fps, require_device=False, state=state)
    assert node_decide("deploy", bot, **kw).principals == ("deploy",)
    assert "trusted device is required" in node_decide("root", person, **kw).reason
    # --require-device on the node is stricter than the cluster: bots too need a device.
    assert node_decide("deploy", bot, **{**kw, "require_device": True}).principals == ()
    # A state past its expiry: everyone needs a device, whatever the node's mode.
    late = node_decide("deploy", bot, device_trust_mode=HUMANS, now=time.time() + 7200, **kw)
    assert late.principals == () and "expired" in late.note
    # A published user claiming to be a bot must be exactly that (true/false).
    doc["users"]["alice"]["bot"] = "yes"
    with pytest.raises(Exception, match="malformed|signature"):
        published.parse(json.dumps(doc).encode(), trusted)

    ca_pub = cluster.state_dir / "ca" / "user_ca.pub"
    for cert, login, expected in ((bot, "deploy", "deploy\n"), (person, "root", "")):
        blob = cert.certificate.public_bytes().split()
        proc = subprocess.run(
            [sys.executable, "-m", "bastion.node_principals", "--ca", str(ca_pub),
             "--device-trust-mode", HUMANS, login, blob[0].decode(), blob[1].decode()],
            capture_output=True, text=True,
        )  # fmt: skip
        assert proc.returncode == 0 and proc.stdout == expected, proc.stderr


# -- a live bot-token connection, through a real bastion ---------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize(
    "action, reason",
    [
        (("bots", "token-rm", "ci"), "bot token is not valid"),
        (("bots", "rm", "ci"), "no longer exists"),
        (("lock", "--user", "ci", "--message", "runner compromised"), "runner compromised"),
    ],
    ids=["token-rm", "bots-rm", "lock"],
)
def test_a_bot_token_connection_gets_nothing_once_the_token_goes(recheck_env, action, reason):
    """dtclient's own session code as a CI job uses it: a certificate on a bot-token
    connection, the admin's action, then a second request on the same connection."""
    import asyncio

    from client.api import BOT_USER, Credentials
    from tests.sshd import LOGIN, keygen
    from tests.test_dtapi_recheck import renew_after, terminated

    env = recheck_env
    env.cluster.store.add_user(User("ci", ("access",), (LOGIN,), bot=True))
    secret, _ = accounts.issue_bot_token(env.cluster.store, "ci")
    keygen(env.tmp / "ci")
    pub = (env.tmp / "ci.pub").read_text()
    refusal = asyncio.run(renew_after(env, Credentials(BOT_USER, bot_token=secret), pub, *action))
    assert reason in refusal.message, refusal.message
    [event] = terminated(env, "ci")
    assert reason in event.message and event.fields["auth"] == "bot-token"
    issued = [e for e in env.cluster.store.list_audit(type="cert.create") if e.user == "ci"]
    assert [e.success for e in issued] == [True]  # the first request's, nothing after
    assert issued[0].fields["via"] == "bot token" and issued[0].fields["bot"] is True


@pytest.fixture
def recheck_env(tmp_path):
    """A real bastion (tests/test_dtapi_recheck.py's shape): it polls the revision only
    every 30 s, so what refuses is each request's own re-check."""
    from tests.sshd import bastion_server

    c = init_cluster(tmp_path / "state", "bots")
    host_ca = (c.state_dir / "ca" / "host_ca.pub").read_text().strip()
    with bastion_server(c.state_dir, extra_args=("--set", "revision_poll_interval=30")) as b:
        yield type("Env", (), {"tmp": tmp_path, "cluster": c, "bastion": b, "ca": host_ca})
    c.close()


@pytest.mark.integration
def test_a_real_sshd_node_admits_the_bot_and_not_a_person_without_a_device(
    cluster, tmp_path, sshd_runnable
):
    """A node reached without the bastion, its sshd running dt-node-principals with
    --device-trust-mode required-for-humans and no cluster state (the light helper)."""
    from bastion.ca.certs import load_public_key
    from tests.sshd import LOGIN, keygen, sshd_node
    from tests.test_node_side import BIN, direct_ssh

    store = cluster.store
    store.add_user(User("ci-node", ("access",), (LOGIN,), bot=True))
    store.add_user(User("pat", ("access",), (LOGIN,)))
    keys = {}
    for name, request in (
        ("ci-node", lambda k: UserCertRequest("ci-node", k, bot_only=True)),
        ("pat", lambda k: UserCertRequest("pat", k)),
    ):
        keys[name] = keygen(tmp_path / name)
        public = load_public_key((tmp_path / f"{name}.pub").read_bytes())
        (tmp_path / f"{name}-cert.pub").write_text(cluster.ca.sign(request(public)).openssh + "\n")
    command = sshd_runnable(BIN / "dt-node-principals")
    ca = cluster.state_dir / "ca" / "user_ca.pub"
    extra = (
        f"AuthorizedPrincipalsCommand {command} --ca {ca} --device-trust-mode {HUMANS} "
        "%u %t %k\nAuthorizedPrincipalsCommandUser root\n"
    )
    with sshd_node(tmp_path / "node", cluster, extra=extra) as node:
        bot = direct_ssh(node, keys["ci-node"], tmp_path, cluster)
        assert bot.returncode == 0 and bot.stdout.strip() == "direct", bot.stderr
        person = direct_ssh(node, keys["pat"], tmp_path, cluster)
        assert person.returncode == 255 and "Permission denied" in person.stderr
        assert "does not contain an authorized principal" in node.log()


def test_dtadmin_bots_commands_and_their_bad_input(tmp_path):
    """The real console script: exit codes, messages, JSON contract, no traceback."""
    import json
    import os
    from pathlib import Path

    dtadmin = str(Path(sys.executable).parent / "dtadmin")
    env = {**os.environ, "DT_STATE": str(tmp_path / "state"), "COLUMNS": "200"}

    def run(*args):
        proc = subprocess.run([dtadmin, *args], capture_output=True, text=True, env=env)
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    assert run("init", "--cluster", "bots").returncode == 0
    assert run("users", "add", "alice", "--roles", "access").returncode == 0
    assert run("bots", "add", "ci", "--roles", "access", "--logins", "deploy").returncode == 0
    [bot] = json.loads(run("bots", "ls", "--format", "json").stdout)
    assert bot["name"] == "ci" and bot["tokens"] == 0 and bot["created"].endswith("Z")
    existing = tmp_path / "taken"
    existing.write_text("")
    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    for args, code, message in [
        (("bots", "add", "ci2", "--roles", "ghost"), 3, 'role "ghost" not found'),
        (("bots", "add", "ci", "--roles", "access"), 4, "already exists"),
        (("bots", "add", "b b", "--roles", "access"), 2, "invalid bot name"),
        (("bots", "token", "alice"), 3, "it is a person"),
        (("bots", "token", "ci", "--out", str(existing)), 2, "already exists"),
        (("bots", "token", "ci", "--ttl", "soon"), 2, "soon"),
        (("bots", "token-rm", "ci", "abcdef012345"), 3, "has no token"),
        (("bots", "rm", "alice"), 3, "it is a person"),
        (("auth", "sign", "--user", "alice", "--key", f"{key}.pub"), 7, "is a person, not a bot"),
        (("auth", "sign", "--user", "ci", "--key", str(existing)), 10, "not an OpenSSH public key"),
    ]:
        proc = run(*args)
        assert proc.returncode == code and message in proc.stderr, (args, proc.stderr)
    assert existing.read_text() == ""  # never overwritten
    out = tmp_path / "ci.token"
    minted = run("bots", "token", "ci", "--ttl", "1h", "--out", str(out))
    assert minted.returncode == 0 and out.stat().st_mode & 0o777 == 0o600
    [token] = json.loads(run("bots", "tokens", "ci", "--format", "json").stdout)
    assert token["id"] in minted.stdout and token["expires"].endswith("Z")
    assert out.read_text().strip() not in run("bots", "tokens", "ci").stdout
    assert run("bots", "token-rm", "ci").returncode == 0
    assert json.loads(run("bots", "tokens", "ci", "--format", "json").stdout) == []
    assert run("bots", "rm", "ci").returncode == 0
    assert json.loads(run("bots", "ls", "--format", "json").stdout) == []


def test_a_bot_tokens_certificate_never_outlives_the_token(cluster):
    """A token minted for ten minutes gives ten minutes of access, not ten minutes plus
    a certificate's hour (found by the review of the bots change)."""
    _, token = accounts.issue_bot_token(cluster.store, "ci", ttl=600)
    issued = cluster.ca.sign(UserCertRequest("ci", key(), bot_token_hash=token.token_hash))
    assert issued.record.valid_before <= token.expires + 1
    asked = cluster.ca.sign(
        UserCertRequest("ci", key(), ttl=3 * 3600, bot_token_hash=token.token_hash)
    )
    assert asked.record.valid_before <= token.expires + 1
