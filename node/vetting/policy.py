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

import json
import os
import re
import secrets
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from node.errors import NodeError
from protocols.phi.findings import Severity
from protocols.storage import private_dir

#: A modality is a DICOM CS value: upper-case letters, digits, space or underscore, 16 at most.
_MODALITY = re.compile(r"^[A-Z0-9_ ]{1,16}$")


def _modalities(values: list[str]) -> list[str]:
    cleaned: list[str] = []
    for value in values:
        code = value.strip().upper()
        if not _MODALITY.match(code):
            raise ValueError(f"{value!r} is not a DICOM modality code (e.g. CT, CR, US)")
        if code not in cleaned:
            cleaned.append(code)
    return cleaned


class AutoApprove(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    modalities: list[str] = Field(default_factory=lambda: ["CT", "CR", "DX", "MR"])

    @field_validator("modalities")
    @classmethod
    def _codes(cls, value: list[str]) -> list[str]:
        return _modalities(value)


class Hold(BaseModel):
    model_config = ConfigDict(extra="forbid")

    modalities: list[str] = Field(default_factory=lambda: ["US", "SC", "OT", "XC", "ES", "SM"])
    findings_at_or_above: str = "low"

    @field_validator("modalities")
    @classmethod
    def _codes(cls, value: list[str]) -> list[str]:
        return _modalities(value)

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

    def to_toml(self) -> str:
        """The policy as the TOML file ``load`` reads."""

        def codes(values: list[str]) -> str:
            return "[" + ", ".join(json.dumps(v) for v in values) + "]"

        def flag(value: bool) -> str:
            return "true" if value else "false"

        return (
            "# RadFed vetting policy. Holding wins whenever anything is uncertain.\n\n"
            "[auto_approve]\n"
            f"enabled = {flag(self.auto_approve.enabled)}\n"
            f"modalities = {codes(self.auto_approve.modalities)}\n\n"
            "[hold]\n"
            f"modalities = {codes(self.hold.modalities)}\n"
            f"findings_at_or_above = {json.dumps(self.hold.findings_at_or_above)}\n\n"
            "[review]\n"
            f"two_person = {flag(self.review.two_person)}\n"
        )

    def save(self, path: Path) -> None:
        """Write the policy to ``path`` atomically (a reader sees the old or the new file)."""
        from node.deid.runner import fsync_dir

        private_dir(path.parent)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            # 0600: what is approved without a reviewer is the operator's to change alone
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(self.to_toml())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise NodeError("policy_not_saved", f"could not write {path}: {exc}") from exc
        fsync_dir(path.parent)


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
