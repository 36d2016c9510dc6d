"""What a login quote signs: the TPM's answer bound to the exact key being certified."""

from __future__ import annotations

import hashlib


def login_quote_data(nonce: bytes, user_public_key_blob: bytes) -> bytes:
    """extraData of a login quote: ``sha256(nonce || user public key blob)``."""
    return hashlib.sha256(nonce + user_public_key_blob).digest()
