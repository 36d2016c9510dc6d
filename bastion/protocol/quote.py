"""What a login quote signs: the TPM's answer bound to the exact key being certified,
and which PCRs it covers."""

from __future__ import annotations

import hashlib

# The SHA-256 PCRs a device quotes by default: firmware (0-3), boot loader and its
# configuration (4, 5), platform (6), Secure Boot (7), grub's command lines and files
# (8, 9) and shim's MOK list (14). Never 16 (debug) or 23 (application): software
# resets those, so they prove nothing about the boot. Here, in the contract, because
# the client quotes them when a bastion names no selection (an older bastion) and the
# bastion's posture core (bastion.authz.records) asks for them: one definition.
POSTURE_PCRS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14)
RESETTABLE_PCRS = (16, 23)
NUM_PCRS = 24


def login_quote_data(nonce: bytes, user_public_key_blob: bytes) -> bytes:
    """extraData of a login quote: ``sha256(nonce || user public key blob)``."""
    return hashlib.sha256(nonce + user_public_key_blob).digest()


def attest_quote_data(nonce: bytes) -> bytes:
    """extraData of a continuous-attestation quote: ``sha256("dt-bastion attest\\0" ||
    nonce)``. Its own prefix, so that no such quote can pass for a login quote (whose
    extraData binds a user key) or the other way round."""
    return hashlib.sha256(b"dt-bastion attest\0" + nonce).digest()
