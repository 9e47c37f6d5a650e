"""The site's vetting policy: what may be approved by machine, what a person must see.

Read from ``<home>/policy.toml`` (or the file the settings name); the defaults are
the cautious ones of DESIGN.md — auto-approve only exams whose scan is clean and
whose instances are all CT, CR, DX or MR without burned-in risk; always hold
ultrasound, secondary captures, anything flagged and anything with a finding.

    [auto_approve]
    enabled = true
    modalities = ["CT", "CR", "DX", "MR"]

    [hold]
    modalities = ["US", "SC", "OT", "XC", "ES", "SM"]
    findings_at_or_above = "low"

    [review]
    two_person = false
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from node.errors import NodeError
from protocols.phi.findings import Severity


class AutoApprove(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    modalities: list[str] = Field(default_factory=lambda: ["CT", "CR", "DX", "MR"])


class Hold(BaseModel):
    model_config = ConfigDict(extra="forbid")

    modalities: list[str] = Field(default_factory=lambda: ["US", "SC", "OT", "XC", "ES", "SM"])
    findings_at_or_above: str = "low"

    @field_validator("findings_at_or_above")
    @classmethod
    def _severity(cls, value: str) -> str:
        Severity.parse(value)
        return value.lower()


class ReviewRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    two_person: bool = False


class VettingPolicy(BaseModel):
    """A site's vetting policy."""

    model_config = ConfigDict(extra="forbid")

    auto_approve: AutoApprove = Field(default_factory=AutoApprove)
    hold: Hold = Field(default_factory=Hold)
    review: ReviewRule = Field(default_factory=ReviewRule)

    @classmethod
    def load(cls, path: Path) -> VettingPolicy:
        """The policy in ``path``, or the defaults when there is no such file."""
        if not path.exists():
            return cls()
        try:
            return cls.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
        except (OSError, tomllib.TOMLDecodeError, ValidationError) as exc:
            raise NodeError("bad_policy", f"vetting policy {path} is not valid: {exc}") from exc


@dataclass(frozen=True)
class InstanceFacts:
    """What the policy looks at for one instance."""

    modality: str
    burned_in_risk: bool


@dataclass(frozen=True)
class Decision:
    approve: bool
    reason: str


def decide(
    policy: VettingPolicy, instances: Iterable[InstanceFacts], findings: Iterable[Severity]
) -> Decision:
    """Approve or hold a study: holding wins whenever anything is uncertain."""
    facts = list(instances)
    if not facts:
        return Decision(False, "no instances")
    threshold = Severity.parse(policy.hold.findings_at_or_above)
    serious = [s for s in findings if s >= threshold]
    if serious:
        worst = max(serious)
        return Decision(False, f"{len(serious)} finding(s), worst {worst.name.lower()}")
    flagged = sum(1 for f in facts if f.burned_in_risk)
    if flagged:
        return Decision(False, f"{flagged} instance(s) at risk of burned-in text")
    held = sorted({f.modality for f in facts if f.modality in policy.hold.modalities})
    if held:
        return Decision(False, f"modality {', '.join(held)} is always reviewed")
    if not policy.auto_approve.enabled:
        return Decision(False, "auto-approval is off: a reviewer decides")
    others = sorted({f.modality or "?" for f in facts} - set(policy.auto_approve.modalities))
    if others:
        return Decision(False, f"modality {', '.join(others)} is not on the auto-approve list")
    return Decision(True, "scan clean, low-risk modalities, nothing flagged")
