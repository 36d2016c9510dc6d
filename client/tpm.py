"""The client's TPM 2.0 layer, over tpm2-pytss ESAPI. The only module that opens a TPM.

* EK: read its certificate from the TCG NV index (RSA 2048 first, then the ECC
  profiles) and re-create the EK from the matching template; without a certificate,
  the RSA 2048 EK's public key alone.
* AK: an ECC P-256 restricted signing key created under the EK, kept as a
  TPM-wrapped blob (public + encrypted private) under ``~/.dt/tpm`` so the next
  login loads the same key. Using the EK as a parent needs a policy session with
  PolicySecret(ENDORSEMENT): the EK's default policy. Once loaded, the AK's saved
  context (TPM2_ContextSave, sealed by the TPM to this boot) is kept beside it, so a
  login's quote loads it directly instead of re-deriving the EK (an RSA primary, the
  slowest step of a login); after a reboot, or if it is not the enrolled AK, the
  full path runs again.
* ActivateCredential and Quote (sha256 bank, the PCRs the bastion names; by default
  bastion.protocol.quote.POSTURE_PCRS, 0-9 and 14).

TCTI: ``--tpm`` / ``DT_TPM_TCTI`` / ``device:/dev/tpmrm0``; ``swtpm:host=...,port=N``
for a software TPM. The TSS logs errors while probing absent NV indexes; TSS2_LOG is
set so none of that reaches the user's terminal.
"""

from __future__ import annotations

import os

os.environ.setdefault("TSS2_LOG", "all+NONE")  # before the TSS logs anything

import contextlib  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

from cryptography.hazmat.primitives import serialization  # noqa: E402
from tpm2_pytss import ESAPI, TSS2_Exception  # noqa: E402
from tpm2_pytss.constants import (  # noqa: E402
    ESYS_TR,
    TPM2_ALG,
    TPM2_RC,
    TPM2_SE,
    TPMA_OBJECT,
)
from tpm2_pytss.types import (  # noqa: E402
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_PCR_SELECTION,
    TPMS_CONTEXT,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
)
from tpm2_pytss.utils import NVReadEK, create_ek_template  # noqa: E402

from bastion.protocol.errors import (  # noqa: E402
    TPMError,
    TPMLockout,
    TPMNotFound,
    TPMPermissionDenied,
)
from bastion.protocol.files import atomic_write, private_dir  # noqa: E402
from bastion.protocol.quote import POSTURE_PCRS  # noqa: E402

DEFAULT_TCTI = "device:/dev/tpmrm0"
EK_TEMPLATES = ("EK-RSA2048", "EK-ECC256", "EK-HIGH-RSA2048", "EK-HIGH-ECC256", "EK-HIGH-ECC384")
AK_ATTRIBUTES = (
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
)
AK_PUB, AK_PRIV, AK_CONTEXT = "ak.pub", "ak.priv", "ak.ctx"


@dataclass(frozen=True, slots=True)
class EndorsementInfo:
    public: bytes  # marshalled TPM2B_PUBLIC
    public_der: bytes  # SubjectPublicKeyInfo
    cert_der: bytes | None
    template: str


@dataclass(frozen=True, slots=True)
class QuoteResult:
    attest: bytes  # marshalled TPMS_ATTEST (the signed bytes)
    signature: bytes  # marshalled TPMT_SIGNATURE
    pcr_select: tuple[int, ...]
    pcr_values: tuple[bytes, ...]


def resolve_tcti(tcti: str | None) -> str:
    """The TCTI to open: ``--tpm``, else ``DT_TPM_TCTI``, else /dev/tpmrm0. A bare device
    path (``/dev/tpmrm0``) means the device TCTI, as tpm2-tools read it."""
    name = (tcti or os.environ.get("DT_TPM_TCTI") or DEFAULT_TCTI).strip()
    if name.startswith("/"):
        return f"device:{name}"
    return name


def _open_error(tcti: str, exc: BaseException) -> TPMError:
    device = tcti.split(":", 1)[1] if tcti.startswith("device:") else None
    if device and not os.path.exists(device):
        return TPMNotFound(
            f"no TPM found at {device} (is there a TPM 2.0 and is its driver loaded? "
            "for a software TPM use --tpm swtpm:host=127.0.0.1,port=2321)"
        )
    if device and not os.access(device, os.R_OK | os.W_OK):
        return TPMPermissionDenied(
            f"permission denied on {device}: add your user to the tss group "
            "(sudo usermod -aG tss $USER, then log in again) or install tpm2-tss's udev rule"
        )
    return TPMNotFound(f"cannot open the TPM at {tcti}: {exc}")


def _tpm_error(what: str, exc: TSS2_Exception) -> TPMError:
    if exc.rc in (TPM2_RC.LOCKOUT,) or getattr(exc, "error", None) == TPM2_RC.LOCKOUT:
        return TPMLockout(
            "the TPM is in dictionary-attack lockout; wait for it to recover or clear it "
            "(tpm2_dictionarylockout --clear-lockout)"
        )
    return TPMError(f"TPM error while {what}: {exc}")


class TPM:
    """An open TPM; use ``with TPM.open(tcti) as tpm:``."""

    def __init__(self, esapi: ESAPI, tcti: str) -> None:
        self._esapi = esapi
        self.tcti = tcti
        self._ek: tuple[ESYS_TR, EndorsementInfo] | None = None

    @classmethod
    @contextlib.contextmanager
    def open(cls, tcti: str | None = None) -> Iterator[TPM]:
        name = resolve_tcti(tcti)
        try:
            esapi = ESAPI(name)
        except (TSS2_Exception, OSError, RuntimeError) as exc:
            raise _open_error(name, exc) from None
        tpm = cls(esapi, name)
        try:
            yield tpm
        finally:
            tpm.close()

    def close(self) -> None:
        if self._ek is not None:
            with contextlib.suppress(TSS2_Exception):
                self._esapi.flush_context(self._ek[0])
            self._ek = None
        self._esapi.close()

    # -- the endorsement key ---------------------------------------------------------------

    def endorsement(self) -> EndorsementInfo:
        return self._endorsement()[1]

    def _endorsement(self) -> tuple[ESYS_TR, EndorsementInfo]:
        if self._ek is not None:
            return self._ek
        cert, template_name, template = None, EK_TEMPLATES[0], None
        reader = NVReadEK(self._esapi)
        for name in EK_TEMPLATES:
            try:
                found, tmpl = create_ek_template(name, reader)
            except (TSS2_Exception, ValueError):
                continue
            if template is None:
                template_name, template = name, tmpl
            if found:
                cert, template_name, template = bytes(found), name, tmpl
                break
        if template is None:
            raise TPMError("this TPM offers no EK template dt-bastion knows")
        try:
            handle, public, _, _, _ = self._esapi.create_primary(
                TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT
            )
        except TSS2_Exception as exc:
            raise _tpm_error("creating the endorsement key", exc) from None
        der = serialization.load_pem_public_key(public.to_pem()).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._ek = (handle, EndorsementInfo(bytes(public.marshal()), der, cert, template_name))
        return self._ek

    @contextlib.contextmanager
    def _ek_session(self) -> Iterator[ESYS_TR]:
        """A policy session satisfying the EK's default policy, PolicySecret(ENDORSEMENT)."""
        session = self._esapi.start_auth_session(
            ESYS_TR.NONE,
            ESYS_TR.NONE,
            TPM2_SE.POLICY,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            TPM2_ALG.SHA256,
        )
        try:
            self._esapi.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
            yield session
        finally:
            with contextlib.suppress(TSS2_Exception):
                self._esapi.flush_context(session)

    # -- the attestation key ----------------------------------------------------------------

    def load_or_create_ak(self, directory: Path, attributes: TPMA_OBJECT = AK_ATTRIBUTES) -> bytes:
        """The AK's marshalled public; created once, then loaded from its blob."""
        pub_path, priv_path = directory / AK_PUB, directory / AK_PRIV
        if pub_path.exists() and priv_path.exists():
            return pub_path.read_bytes()
        ek, _ = self._endorsement()
        template = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=attributes)
        try:
            with self._ek_session() as session:
                private, public, _, _, _ = self._esapi.create(
                    ek, TPM2B_SENSITIVE_CREATE(), template, session1=session
                )
        except TSS2_Exception as exc:
            raise _tpm_error("creating the attestation key", exc) from None
        private_dir(directory, "the attestation key's folder")
        atomic_write(priv_path, bytes(private.marshal()), 0o600)
        atomic_write(pub_path, bytes(public.marshal()), 0o600)
        return bytes(public.marshal())

    @contextlib.contextmanager
    def _ak(self, directory: Path, *, saved: bool = True) -> Iterator[ESYS_TR]:
        try:
            public, _ = TPM2B_PUBLIC.unmarshal((directory / AK_PUB).read_bytes())
            private, _ = TPM2B_PRIVATE.unmarshal((directory / AK_PRIV).read_bytes())
        except FileNotFoundError:
            raise TPMError(
                "this device has no attestation key yet (run: dtclient device enroll)"
            ) from None
        handle = self._saved_ak(directory, public) if saved else None
        if handle is None:
            ek, _ = self._endorsement()
            try:
                with self._ek_session() as session:
                    handle = self._esapi.load(ek, private, public, session1=session)
            except TSS2_Exception as exc:
                raise _tpm_error(
                    "loading the attestation key (was the TPM cleared? enroll again)", exc
                ) from None
            self._save_ak(directory, handle)
        try:
            yield handle
        finally:
            with contextlib.suppress(TSS2_Exception):
                self._esapi.flush_context(handle)

    def _saved_ak(self, directory: Path, public: TPM2B_PUBLIC) -> ESYS_TR | None:
        """The AK from its saved context, if the TPM still takes it and it is this AK."""
        try:
            blob = (directory / AK_CONTEXT).read_bytes()
        except OSError:
            return None  # none yet: load it the long way
        try:
            context, _ = TPMS_CONTEXT.unmarshal(blob)
            handle = self._esapi.context_load(context)
        except (ValueError, TSS2_Exception):
            # From before a reboot, or not a context at all. ESYS is left unusable when
            # its own parsing of the blob fails, so start a fresh ESAPI for the long way.
            if self._ek is not None:
                with contextlib.suppress(TSS2_Exception):
                    self._esapi.flush_context(self._ek[0])
                self._ek = None
            self._esapi.close()
            try:
                self._esapi = ESAPI(self.tcti)
            except (TSS2_Exception, OSError, RuntimeError) as exc:
                raise _open_error(self.tcti, exc) from None
            return None
        try:
            loaded, _, _ = self._esapi.read_public(handle)
            if bytes(loaded.marshal()) == bytes(public.marshal()):
                return handle
        except TSS2_Exception:
            pass
        with contextlib.suppress(TSS2_Exception):
            self._esapi.flush_context(handle)
        return None

    def _save_ak(self, directory: Path, handle: ESYS_TR) -> None:
        try:
            context = self._esapi.context_save(handle)
            atomic_write(directory / AK_CONTEXT, bytes(context.marshal()), 0o600)
        except (OSError, TSS2_Exception):
            pass  # only a shortcut for the next login

    # -- ceremonies ----------------------------------------------------------------------------

    def activate_credential(
        self, directory: Path, credential_blob: bytes, encrypted_secret: bytes
    ) -> bytes:
        try:
            blob, _ = TPM2B_ID_OBJECT.unmarshal(credential_blob)
            secret, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
        except Exception:
            raise TPMError("the bastion sent a malformed credential challenge") from None
        ek, _ = self._endorsement()
        with self._ak(directory, saved=False) as ak:  # the EK is loaded anyway
            try:
                with self._ek_session() as session:
                    cert_info = self._esapi.activate_credential(
                        ak, ek, blob, secret, session1=ESYS_TR.PASSWORD, session2=session
                    )
            except TSS2_Exception as exc:
                raise _tpm_error("activating the credential", exc) from None
        return bytes(cert_info)

    def quote(
        self, directory: Path, nonce: bytes, pcrs: Sequence[int] = POSTURE_PCRS
    ) -> QuoteResult:
        pcrs = sorted(set(pcrs))
        if not pcrs:
            raise TPMError("a quote needs at least one PCR")
        selection = TPML_PCR_SELECTION.parse("sha256:" + ",".join(str(p) for p in pcrs))
        with self._ak(directory) as ak:
            try:
                quoted, signature = self._esapi.quote(
                    ak, selection, nonce, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
                )
                values = self._pcr_values(pcrs)
            except TSS2_Exception as exc:
                raise _tpm_error("quoting", exc) from None
        attest = bytes(quoted.marshal())[2:]  # TPM2B_ATTEST: drop the size prefix
        return QuoteResult(attest, bytes(signature.marshal()), tuple(sorted(pcrs)), values)

    def _pcr_values(self, pcrs: Sequence[int]) -> tuple[bytes, ...]:
        values: list[bytes] = []
        for pcr in sorted(pcrs):  # one at a time: pcr_read returns at most 8 digests
            _, _, digests = self._esapi.pcr_read(TPML_PCR_SELECTION.parse(f"sha256:{pcr}"))
            values.append(bytes(digests.digests[0]))
        return tuple(values)
