"""Device posture: does a device's measured boot satisfy the policies that apply now?

Pure, like the rest of the core: the shells measure (``bastion.enroll.measured``), read
the facts and pass ``now``; this module only decides. (Stub: the lead fills it in.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bastion.authz.facts import Facts
from bastion.authz.records import Measurement, PosturePolicy


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a measurement means under the policies that apply: ``status`` is ``pass``,
    ``warn``, ``withhold``, ``deny`` or ``unchecked`` (no policy looks at the boot), with
    the reasons a person reads."""

    status: str
    reasons: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        return self.status in ("withhold", "deny")

    @property
    def extension(self) -> str | None:
        """The certificate's posture extension value; None: no device extensions."""
        return None if self.failed else self.status


def policy_from_doc(doc: object, where: str = "posture") -> PosturePolicy:
    raise NotImplementedError


def policy_doc(policy: PosturePolicy) -> dict[str, Any]:
    raise NotImplementedError


def applicable(facts: Facts) -> list[tuple[str, PosturePolicy]]:
    raise NotImplementedError


def pcr_selection(facts: Facts) -> tuple[int, ...]:
    raise NotImplementedError


def needs_log(facts: Facts) -> bool:
    raise NotImplementedError


def evaluate(facts: Facts, measured: Measurement, baseline: Measurement | None) -> Verdict:
    raise NotImplementedError


def drift(baseline: Measurement, measured: Measurement, pcrs: tuple[int, ...]) -> list[str]:
    raise NotImplementedError


def continuous(facts: Facts) -> tuple[int, int] | None:
    raise NotImplementedError


def attestation_deadline(facts: Facts) -> float | None:
    raise NotImplementedError


def check_device_posture(claims_posture: str | None, facts: Facts, now: float) -> None:
    raise NotImplementedError
