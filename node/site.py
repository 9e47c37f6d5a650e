"""Build a node's working parts from its settings: engine config, vault, index.

Every failure here is a ``NodeError`` naming the file or setting to fix, so the
CLI and ``radfed node serve`` report the same thing the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from node.deid import keys
from node.deid.runner import EngineConfig
from node.deid.vault import Vault
from node.errors import NodeError
from node.settings import NodeSettings
from protocols.deid.options import DeidOptions
from protocols.deid.safe_private import (
    DEFAULT_SAFE_PRIVATE,
    SafePrivateError,
    SafePrivateKey,
    load_allowlist,
)
from protocols.storage import private_dir

if TYPE_CHECKING:  # the index (SQLAlchemy, Alembic) loads only for commands that use it
    from node.index.store import NodeIndex


def engine_config(
    settings: NodeSettings, options: DeidOptions | None = None, secret_file: Path | None = None
) -> EngineConfig:
    """The de-identification engine this site runs (its options unless overridden)."""
    try:
        secret = keys.site_secret(settings.keys_dir, secret_file)
    except keys.KeyFileError as exc:
        raise NodeError("key_file", str(exc)) from exc
    return EngineConfig(
        options=options or settings.deid,
        secret=secret,
        site_prefix=settings.site_id,
        shift_min_days=settings.date_shift_min_days,
        shift_max_days=settings.date_shift_max_days,
        safe_private=safe_private(settings),
    )


def safe_private(settings: NodeSettings) -> frozenset[SafePrivateKey]:
    """The private attributes this site keeps under Retain Safe Private."""
    if settings.safe_private_allowlist is None:
        return DEFAULT_SAFE_PRIVATE
    try:
        return load_allowlist(settings.safe_private_allowlist)
    except SafePrivateError as exc:
        raise NodeError("allowlist", str(exc)) from exc


def open_vault(settings: NodeSettings) -> Vault:
    try:
        return Vault(settings.vault_path, keys.vault_key(settings.keys_dir))
    except keys.KeyFileError as exc:
        raise NodeError("key_file", str(exc)) from exc


def open_index(settings: NodeSettings, vault: Vault | None = None) -> NodeIndex:
    """The node index, migrated to the newest schema."""
    from node.index.db import Database
    from node.index.store import NodeIndex

    private_dir(settings.home)
    return NodeIndex(Database.open(settings.index_path), vault or open_vault(settings))
