"""Where a node keeps what enrolling gave it, and what those files say (no network).

``keys/federation/`` under the node home: the node key and certificate, the
federation CA, the key in OpenSSH form for the Flower SuperNode, and
``coordinator.json`` (the coordinator's URL, the site name, the SuperLink
address). Kept apart from ``node.federation`` (the HTTPS client), so what only
needs to know the site — the training gate, started for every Flower message —
does not load an HTTP stack.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from node.settings import NodeSettings


@dataclass(frozen=True)
class FederationFiles:
    root: Path

    @property
    def key(self) -> Path:
        return self.root / "node.key"

    @property
    def cert(self) -> Path:
        return self.root / "node.crt"

    @property
    def ca(self) -> Path:
        return self.root / "ca.crt"

    @property
    def config(self) -> Path:
        return self.root / "coordinator.json"

    @property
    def supernode_key(self) -> Path:
        """The node key in OpenSSH form, for Flower SuperNode authentication."""
        return self.root / "supernode.key"


def files(settings: NodeSettings) -> FederationFiles:
    return FederationFiles(settings.keys_dir / "federation")


def site_name(settings: NodeSettings) -> str | None:
    where = files(settings)
    if not where.config.exists():
        return None
    return str(json.loads(where.config.read_text(encoding="utf-8")).get("site") or "") or None


def enrolled(settings: NodeSettings) -> bool:
    where = files(settings)
    return all(p.exists() for p in (where.key, where.cert, where.ca, where.config))
