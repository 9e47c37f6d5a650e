"""The site's training policy: which apps it runs, who decides, which exams they may read.

Read from ``<home>/training.toml`` (or the file the settings name). The defaults
run nothing: a site lists the app bundles it accepts by SHA-256 (``radfed train
apps`` on the coordinator prints them; so does ``GET /api/v1/apps``).

    # Flower app bundles (FAB SHA-256) this site runs.
    apps = ["3f1c…"]
    # Every run waits for an operator's approval (radfed node training approve RUN).
    manual_approval = false
    # Exams a run may read: "approved" (approved by policy or a reviewer, queued or
    # shared) or "shared" (only those the coordinator has received).
    eligible = "approved"
"""

from __future__ import annotations

import os
import secrets
import tomllib
from pathlib import Path

from pydantic import ValidationError

from node.errors import NodeError
from protocols.api.node import TrainingPolicyBody
from protocols.storage import private_dir

#: Study statuses each ``eligible`` setting admits (never held, rejected, withdrawn).
ELIGIBLE_STATUSES: dict[str, tuple[str, ...]] = {
    "approved": ("approved", "queued", "shared"),
    "shared": ("shared",),
}


class TrainingPolicy(TrainingPolicyBody):
    """What federated training may do on this site (the API body, plus file handling)."""

    @property
    def statuses(self) -> tuple[str, ...]:
        return ELIGIBLE_STATUSES[self.eligible]

    @classmethod
    def load(cls, path: Path) -> TrainingPolicy:
        """The policy in ``path``, or the defaults (run nothing) when there is no such file."""
        if not path.exists():
            return cls()
        try:
            return cls.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
        except (OSError, tomllib.TOMLDecodeError, ValidationError) as exc:
            raise NodeError(
                "bad_training_policy", f"training policy {path} is not valid: {exc}"
            ) from exc

    def to_toml(self) -> str:
        apps = ", ".join(f'"{a}"' for a in self.apps)
        return (
            "# RadFed training policy: the Flower app bundles (SHA-256) this site runs.\n"
            f"apps = [{apps}]\n"
            f"manual_approval = {'true' if self.manual_approval else 'false'}\n"
            f'eligible = "{self.eligible}"\n'
        )

    def save(self, path: Path) -> None:
        """Write the policy atomically (a reader sees the old or the new file)."""
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
