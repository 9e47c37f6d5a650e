"""The node's settings: environment (``RADFED_NODE_…``), then ``<home>/config.toml``, then defaults.

Everything has a default that works on one machine with no configuration; the
node home (``~/.radfed/node`` or ``RADFED_NODE_HOME``) is created on first use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from protocols.authsettings import AuthSettings
from protocols.deid.options import DeidOptions


def default_home() -> Path:
    """``RADFED_NODE_HOME`` or ``~/.radfed/node``."""
    env = os.environ.get("RADFED_NODE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".radfed" / "node"


class NodeSettings(AuthSettings, BaseSettings):
    """One node's configuration."""

    model_config = SettingsConfigDict(
        env_prefix="RADFED_NODE_", env_nested_delimiter="__", extra="forbid"
    )
    _config_home: ClassVar[Path | None] = None

    home: Path = Field(default_factory=default_home)
    environment: Literal["development", "production"] = "development"
    #: Prefix of every pseudonym this site issues (``SITE-7K2M…``).
    site_id: str = "SITE"
    #: The profile options this site applies (DESIGN.md defaults).
    deid: DeidOptions = Field(default_factory=DeidOptions)
    #: JSON allowlist extending the safe private attributes (Retain Safe Private).
    safe_private_allowlist: Path | None = None
    #: Every date of a patient moves back by a keyed number of days in this range.
    date_shift_min_days: int = Field(default=365, ge=1)
    date_shift_max_days: int = Field(default=3652, ge=1)

    #: The node API and web UI (``radfed node serve``); loopback unless the site opens it.
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0, le=65535)
    #: The DICOM listener: where the PACS pushes (C-STORE) and checks (C-ECHO).
    dicom_host: str = "127.0.0.1"
    dicom_port: int = Field(default=11112, ge=0, le=65535)
    ae_title: str = "RADFED"
    #: Calling AE titles allowed to associate; empty means any.
    ae_allowlist: list[str] = Field(default_factory=list)
    #: Keep the original (identified) files in ``<home>/originals``; off by default.
    keep_originals: bool = False
    #: Ingest worker processes (0: all cores).
    ingest_jobs: int = Field(default=0, ge=0)
    #: The vetting policy (default ``<home>/policy.toml``; built-in defaults if absent).
    policy_file: Path | None = None
    #: ``serve`` vets a study once it has received no instance for this long: a PACS
    #: sends a study series by series, and DICOM has no end-of-study signal.
    study_stable_seconds: float = Field(default=30.0, ge=0)
    #: How often ``serve``'s outbox looks for approved studies and retries that are due.
    outbox_seconds: float = Field(default=10.0, gt=0)
    #: HTTP(S) proxy for the coordinator (``http://proxy.hospital:3128``); without it the
    #: usual HTTPS_PROXY / NO_PROXY environment variables apply.
    proxy_url: str | None = None
    #: Upload bandwidth cap in megabits per second (all uploads together); none by default.
    upload_limit_mbps: float | None = Field(default=None, gt=0)
    #: Exams uploaded at the same time.
    upload_concurrency: int = Field(default=2, ge=1, le=16)
    #: How often ``serve`` reports to the coordinator once the node is enrolled.
    heartbeat_seconds: float = Field(default=60.0, ge=1)
    #: Federated training: ``serve`` supervises a Flower SuperNode when enrolled.
    flower_enabled: bool = True
    #: The SuperNode's local runtime API port (each node on a host needs its own).
    supernode_port: int = Field(default=9094, ge=0, le=65535)
    #: The SuperLink to dial (host:port); default: what enrollment said.
    superlink_address: str | None = None
    #: The training policy file (default ``<home>/training.toml``).
    training_policy_file: Path | None = None
    #: Extra device masking rules (JSON) on top of the ones RadFed ships.
    mask_rules: Path | None = None

    @field_validator("site_id")
    @classmethod
    def _site_id(cls, value: str) -> str:
        value = value.strip().upper()
        if not value or len(value) > 16 or not all(c.isalnum() or c == "-" for c in value):
            raise ValueError('site_id must be 1-16 characters of A-Z, 0-9 and "-"')
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        home = cls._config_home or default_home()
        toml = TomlConfigSettingsSource(settings_cls, toml_file=home / "config.toml")
        return (init_settings, env_settings, toml)

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        value = value.strip()
        if not value or len(value) > 16 or "\\" in value or not value.isprintable():
            raise ValueError("ae_title must be 1-16 printable characters without a backslash")
        return value

    @property
    def store_dir(self) -> Path:
        """The de-identified copies the node keeps (``<pseudonym>/<study>/<series>/…``)."""
        return self.home / "store"

    @property
    def policy_path(self) -> Path:
        return self.policy_file or self.home / "policy.toml"

    @property
    def spool_dir(self) -> Path:
        """Instances received over DICOM and acknowledged, until taken in."""
        return self.home / "spool"

    @property
    def quarantine_dir(self) -> Path:
        return self.home / "quarantine"

    @property
    def originals_dir(self) -> Path:
        return self.home / "originals"

    @property
    def index_path(self) -> Path:
        return self.home / "index.sqlite"

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def training_policy_path(self) -> Path:
        return self.training_policy_file or self.home / "training.toml"

    @property
    def training_dir(self) -> Path:
        """Per-run sample manifests, the SuperNode's Flower home and its log."""
        return self.home / "training"

    @property
    def vault_path(self) -> Path:
        return self.home / "vault" / "originals.vault"


def load_settings(home: Path | None = None, **overrides: Any) -> NodeSettings:
    """Settings for a node home (the CLI's ``--home``), reading its config file."""
    NodeSettings._config_home = home
    try:
        if home is not None:
            overrides["home"] = home
        return NodeSettings(**overrides)
    finally:
        NodeSettings._config_home = None
