"""``dt-node-principals``: sshd's AuthorizedPrincipalsCommand for device trust on nodes.

A node reachable without the bastion must decide device trust as the bastion does.
sshd runs us as (``dtadmin nodes sshd-config NAME`` prints these lines)::

    AuthorizedPrincipalsCommand /usr/local/bin/dt-node-principals \
        --ca /etc/ssh/dt_user_ca.pub --state /etc/ssh/dt_node_state.json %u %t %k
    AuthorizedPrincipalsCommandUser nobody

and accepts the certificate only if we print a principal it carries. We print the
login (``%u``) when, and only when, every check passes; on any doubt we print nothing
and exit 0, which sshd takes as "no principals": access denied. The reason goes to
stderr, which sshd logs.

``--state`` is the document ``dtadmin nodes publish`` writes (:mod:`bastion.authz.published`):
with it the cluster's and the user's roles' device-trust modes decide (a certificate
without device extensions logs in where the effective mode is ``optional`` or ``off``),
the user must exist and be unlocked, and a certificate naming a device stands only while
that device is enrolled to the user, with that credential, unlocked, and its published
posture stands (the verdict on its boot; a verdict in the certificate where a posture
policy checks the boot; its continuous attestation, where asked). The rules are the
bastion's own (:func:`bastion.authz.decide.node_principals`); nothing is copied here.
Without ``--state`` only the certificate can be checked and a trusted device is
required (``--allow-untrusted-device`` lifts that where there is no state at all); once
the document has expired a trusted device is required and its locks and devices still
deny.

Light by design: this module imports only the contract (``bastion.protocol``: certificate
parsing, errors) and the decision core (``bastion.authz``), so a node needs Python and
``cryptography`` and nothing else of the bastion (``dtadmin nodes helper`` writes it as
one file; tests/test_node_install.py checks what it imports).

``--device-trust-mode required-for-humans`` admits a bot user's certificate (which
the CA marks, and signs only for bots) without device extensions and holds everyone
else to a device, as the bastion does in a cluster of that mode; with ``--state`` the
stricter of it and the published modes decides.
"""

from __future__ import annotations

import argparse
import base64
import os
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bastion.authz import decide as authz_decide
from bastion.authz import published
from bastion.protocol.certs import (
    EXT_ASSET_TAG,
    ParsedCert,
    PublicKey,
    fingerprint,
    load_public_key,
    parse_cert,
)
from bastion.protocol.errors import AccessDenied, CertificateError, DTError, StateError

CERT_TYPES = (
    "ssh-ed25519-cert-v01@openssh.com",
    "ecdsa-sha2-nistp256-cert-v01@openssh.com",
    "ecdsa-sha2-nistp384-cert-v01@openssh.com",
    "ecdsa-sha2-nistp521-cert-v01@openssh.com",
    "rsa-sha2-256-cert-v01@openssh.com",
    "rsa-sha2-512-cert-v01@openssh.com",
    "ssh-rsa-cert-v01@openssh.com",
)


@dataclass(frozen=True, slots=True)
class Decision:
    principals: tuple[str, ...]
    reason: str
    note: str = ""  # worth logging even when the login is accepted


def decide(
    login: str,
    cert: ParsedCert,
    *,
    ca_fingerprints: set[str],
    require_device: bool,
    state: published.NodeState | None = None,
    now: float | None = None,
    device_trust_mode: str | None = None,
) -> Decision:
    """Which principals to print for this login and certificate.

    With a (current) published ``state``, the cluster's and roles' modes decide and
    ``require_device`` only makes the node stricter; without one, ``require_device``
    is the whole policy on devices."""
    now = time.time() if now is None else now
    facts, note = None, ""
    if state is not None and state.expired(now):
        note = (
            f"published state of cluster {state.cluster!r} expired at "
            f"{published._rfc3339(state.expires)} (run dtadmin nodes publish); "
            "deciding as if a trusted device were required"
        )
        # Its modes are not believed any more, but what it denies (a lock, a device
        # unenrolled or no longer this user's) still stands: stale facts can only
        # refuse, never admit, once a trusted device is required.
        require_device, device_trust_mode = True, None
    if state is not None:
        tag = (cert.device_extensions or {}).get(EXT_ASSET_TAG)
        facts = state.facts(user=cert.user, asset_tag=tag, now=now)
    try:
        principals = authz_decide.node_principals(
            login,
            cert,
            ca_fingerprints=ca_fingerprints,
            require_device=require_device,
            facts=facts,
            now=now,
            issued_known=False,
            device_trust_mode=device_trust_mode,
        )
    except AccessDenied as exc:
        return Decision((), exc.message, note)
    return Decision(principals, "ok", note)


def read_state(path: Path, keys: dict[str, PublicKey]) -> published.NodeState:
    """The published state file, which decides who gets in: it must be a regular file
    owned by root (or by us) and writable by nobody else, as sshd asks of its own."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY)
    except OSError as exc:
        raise StateError(f"cannot read the published state {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise StateError(f"published state {path} is not a regular file")
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            raise StateError(
                f"published state {path} must be owned by root and writable only by its owner"
            )
        return published.parse(f.read(published.MAX_BYTES + 1), keys)


def _ca_keys(path: Path) -> dict[str, PublicKey]:
    """The trusted user CA keys, by fingerprint (the TrustedUserCAKeys file)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key = load_public_key(line.encode())
            out[fingerprint(key)] = key
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dt-node-principals",
        description="sshd AuthorizedPrincipalsCommand: print the login only for a "
        "certificate that satisfies dt-bastion's device trust, as the bastion decides it.",
    )
    parser.add_argument("--ca", required=True, type=Path, help="the cluster's user CA public key")
    parser.add_argument(
        "--state",
        type=Path,
        help="the cluster's published state (dtadmin nodes publish): its device-trust "
        "modes, users, roles, devices and locks decide",
    )
    parser.add_argument(
        "--require-device",
        action="store_true",
        help="require a trusted device on this node whatever the cluster's modes say",
    )
    parser.add_argument(
        "--allow-untrusted-device",
        action="store_true",
        help="without --state: accept certificates without device extensions",
    )
    parser.add_argument(
        "--device-trust-mode",
        metavar="MODE",
        help="this node's device-trust mode: off, optional, required-for-humans or required "
        "(supersedes --allow-untrusted-device, not --require-device; with --state the stricter of it and the "
        "cluster's modes decides; an unknown mode is required)",
    )
    parser.add_argument("login", help="%%u: the account being logged into")
    parser.add_argument("key_type", help="%%t: the certificate's key type")
    parser.add_argument("key", help="%%k: the base64 certificate blob")
    args = parser.parse_args(argv)
    try:
        if args.key_type not in CERT_TYPES:
            raise CertificateError(f"{args.key_type} is not a certificate type")
        base64.b64decode(args.key, validate=True)
        cert = parse_cert(f"{args.key_type} {args.key}".encode())
        keys = _ca_keys(args.ca)
        state = read_state(args.state, keys) if args.state else None
        if state is None:
            require = not args.allow_untrusted_device or args.require_device
        else:
            require = args.require_device
        # --device-trust-mode stands in for --allow-untrusted-device, never for
        # --require-device: a node told to require a device stays that strict.
        mode = "required" if args.require_device else args.device_trust_mode
        decision = decide(
            args.login,
            cert,
            ca_fingerprints=set(keys),
            require_device=require,
            state=state,
            device_trust_mode=mode,
        )
    except (DTError, OSError, ValueError) as exc:
        print(f"dt-node-principals: denied: {exc}", file=sys.stderr)
        return 0
    if decision.note:
        print(f"dt-node-principals: {decision.note}", file=sys.stderr)
    for principal in decision.principals:
        print(principal)
    if not decision.principals:
        print(f"dt-node-principals: denied: {decision.reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
