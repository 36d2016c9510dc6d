"""Every error dt-bastion raises on purpose.

Each class is one outcome a caller must handle, in the manner of cryptography's
``exceptions.py``. Every instance carries a message meant for people (shown as is by
``dtadmin``/``dtclient`` and sent in dt-api error answers), a stable ``code`` that
scripts and the wire protocol rely on, and the process exit code a CLI ends with.
Anything that escapes as another exception type is a bug, not a user error.
"""

from __future__ import annotations


class DTError(Exception):
    """Root of all dt-bastion errors; never raised bare."""

    code = "internal"
    exit_code = 1
    # Whether the SSH layer may tell an unauthenticated client this message: only when
    # it reveals nothing the client has not proved (a secret token, password and code).
    disclose = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# -- input and lookups -------------------------------------------------------------


class UsageError(DTError):
    """The caller asked for something malformed (bad YAML, bad flag value, bad name)."""

    code = "bad_request"
    exit_code = 2


class NotFound(DTError):
    code = "not_found"
    exit_code = 3


class AlreadyExists(DTError):
    code = "already_exists"
    exit_code = 4


class Conflict(DTError):
    """The record changed under us or is in a state that forbids the operation."""

    code = "conflict"
    exit_code = 4


# -- state ---------------------------------------------------------------------------


class StateError(DTError):
    """The cluster state (database, CA keys) is missing, corrupt or unwritable.

    A bastion that meets this stops serving rather than letting anyone in.
    """

    code = "state_error"
    exit_code = 5


class StorageUnavailable(StateError):
    """The database cannot be written right now (disk full, read-only, locked)."""

    code = "storage_unavailable"


# -- authentication and authorization -----------------------------------------------


class AuthenticationFailed(DTError):
    code = "auth_failed"
    exit_code = 6


class AccountLocked(AuthenticationFailed):
    """The account is locked. ``disclose`` when the caller proved password and code:
    then the lock's message and end may be shown to them."""

    code = "account_locked"

    def __init__(self, message: str, *, disclose: bool = False) -> None:
        super().__init__(message)
        self.disclose = disclose


class AccessDenied(DTError):
    code = "access_denied"
    exit_code = 7


class DeviceNotTrusted(AccessDenied):
    """Device trust is required and the certificate or device does not satisfy it."""

    code = "device_not_trusted"


class PostureDenied(AccessDenied):
    """The device's measured boot fails a posture policy whose ``on_failure`` is
    ``deny``: no certificate at all (``withhold`` is DeviceNotTrusted: one without the
    device extensions)."""

    code = "posture_denied"
    exit_code = 17


class TokenInvalid(DTError):
    """An enrollment or signup token is unknown, expired, used, or bound elsewhere."""

    code = "token_invalid"
    exit_code = 8
    disclose = True  # said only to whoever holds the token, an unguessable secret


class RateLimited(DTError):
    code = "rate_limited"
    exit_code = 9


# -- certificates ---------------------------------------------------------------------


class CertificateError(DTError):
    """A certificate or key could not be built, parsed or accepted."""

    code = "certificate_invalid"
    exit_code = 10


# -- attestation (server side, pure) --------------------------------------------------


class AttestationError(DTError):
    """A TPM attestation did not prove what it must; the ceremony fails closed."""

    code = "attestation_failed"
    exit_code = 11


class MalformedTPMData(AttestationError):
    code = "tpm_data_malformed"


class EventLogMalformed(MalformedTPMData):
    """A TCG boot event log is truncated, oversized or not in the TCG PC Client format."""

    code = "eventlog_malformed"


class EKUntrusted(AttestationError):
    """The EK certificate does not chain to a trust root, or the EK is not the one registered."""

    code = "ek_untrusted"


class AKInvalid(AttestationError):
    """The attestation key lacks restricted/sign/fixedTPM/fixedParent, or its name is wrong."""

    code = "ak_invalid"


class CredentialMismatch(AttestationError):
    """The ActivateCredential answer is not the secret we sealed."""

    code = "credential_mismatch"


class NonceMismatch(AttestationError):
    code = "nonce_mismatch"


class NonceExpired(AttestationError):
    """The challenge is unknown, already used, or past its deadline."""

    code = "nonce_expired"


class QuoteSignatureInvalid(AttestationError):
    code = "quote_signature_invalid"


# -- wire protocol --------------------------------------------------------------------


class ProtocolError(DTError):
    """A dt-api message is malformed, oversized, out of order or of an unknown type."""

    code = "protocol_error"
    exit_code = 12


# -- client side ---------------------------------------------------------------------


class TPMError(DTError):
    code = "tpm_error"
    exit_code = 13


class DeviceUnavailable(TPMError):
    """The client's TPM could not answer a login challenge: a plain certificate, and the
    device stays enrolled."""

    code = "device_unavailable"


class TPMNotFound(TPMError):
    code = "tpm_not_found"


class TPMPermissionDenied(TPMError):
    code = "tpm_permission_denied"


class TPMLockout(TPMError):
    code = "tpm_lockout"


class ConnectionFailed(DTError):
    """The client could not reach or keep talking to the bastion."""

    code = "connection_failed"
    exit_code = 14


class AuditTampered(DTError):
    """``dtadmin audit verify`` found a row changed, removed or reordered, or a forged
    checkpoint."""

    code = "audit_tampered"
    exit_code = 16


class NotLoggedIn(DTError):
    code = "not_logged_in"
    exit_code = 15


# Looked up by dt-api clients to turn an error answer back into the right class.
BY_CODE: dict[str, type[DTError]] = {}


def _index(cls: type[DTError]) -> None:
    BY_CODE.setdefault(cls.code, cls)
    for sub in cls.__subclasses__():
        _index(sub)


_index(DTError)


def from_code(code: str, message: str) -> DTError:
    """Rebuild an error received over the wire; unknown codes become a plain DTError."""
    cls = BY_CODE.get(code, DTError)
    err = cls(message)
    if cls is DTError:
        err.code = code if isinstance(code, str) and len(code) <= 64 else "internal"
    return err
