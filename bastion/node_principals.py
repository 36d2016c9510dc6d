"""``dt-node-principals``: sshd's AuthorizedPrincipalsCommand for device trust on nodes.

A node reachable without the bastion must not accept a certificate lacking device
extensions when device trust is required. sshd runs us as::

    AuthorizedPrincipalsCommand /usr/local/bin/dt-node-principals \
        --ca /etc/ssh/dt_user_ca.pub %u %t %k
    AuthorizedPrincipalsCommandUser nobody

and accepts the certificate only if we print a principal it carries. We print the
login (``%u``) when, and only when, every check passes; on any doubt we print nothing
and exit 0, which sshd takes as "no principals": access denied. The reason goes to
stderr, which sshd logs.

With ``--state DIR`` (the node can read the cluster state, e.g. on the bastion host)
the device must also be enrolled *now*, owned by the certificate's user and unlocked.
"""

from __future__ import annotations

import argparse
import base64
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bastion.authz import decide as authz_decide
from bastion.ca.keys import fingerprint
from bastion.protocol.certs import EXT_ASSET_TAG, ParsedCert, parse_cert
from bastion.protocol.errors import AccessDenied, CertificateError, DTError
from bastion.storage import Store

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


def decide(
    login: str,
    cert: ParsedCert,
    *,
    ca_fingerprints: set[str],
    require_device: bool,
    store: Store | None = None,
    now: float | None = None,
) -> Decision:
    """Which principals to print for this login and certificate.

    The rules are the bastion's own (:func:`bastion.authz.decide.node_principals`);
    this only reads the state, when the node has it."""
    now = time.time() if now is None else now
    facts = None
    if store is not None:
        tag = (cert.device_extensions or {}).get(EXT_ASSET_TAG)
        facts = store.facts(user=cert.user, serial=cert.serial, asset_tag=tag, now=now)
    try:
        principals = authz_decide.node_principals(
            login,
            cert,
            ca_fingerprints=ca_fingerprints,
            require_device=require_device,
            facts=facts,
            now=now,
        )
    except AccessDenied as exc:
        return Decision((), exc.message)
    return Decision(principals, "ok")


def _ca_fingerprints(path: Path) -> set[str]:
    from bastion.ca.certs import load_public_key

    out = set()
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.add(fingerprint(load_public_key(line.encode())))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dt-node-principals",
        description="sshd AuthorizedPrincipalsCommand: print the login only for a "
        "certificate that satisfies dt-bastion's device trust.",
    )
    parser.add_argument("--ca", required=True, type=Path, help="the cluster's user CA public key")
    parser.add_argument(
        "--allow-untrusted-device",
        action="store_true",
        help="accept certificates without device extensions (device trust optional)",
    )
    parser.add_argument("--state", type=Path, help="cluster state dir, to check the device now")
    parser.add_argument("login", help="%%u: the account being logged into")
    parser.add_argument("key_type", help="%%t: the certificate's key type")
    parser.add_argument("key", help="%%k: the base64 certificate blob")
    args = parser.parse_args(argv)
    try:
        if args.key_type not in CERT_TYPES:
            raise CertificateError(f"{args.key_type} is not a certificate type")
        base64.b64decode(args.key, validate=True)
        cert = parse_cert(f"{args.key_type} {args.key}".encode())
        store = Store.open(args.state) if args.state else None
        decision = decide(
            args.login,
            cert,
            ca_fingerprints=_ca_fingerprints(args.ca),
            require_device=not args.allow_untrusted_device,
            store=store,
        )
    except (DTError, OSError, ValueError) as exc:
        print(f"dt-node-principals: denied: {exc}", file=sys.stderr)
        return 0
    for principal in decision.principals:
        print(principal)
    if not decision.principals:
        print(f"dt-node-principals: denied: {decision.reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
