"""The coordinator's settings: environment (``RADFED_COORDINATOR_…``), then
``<home>/config.toml``, then defaults that work on one machine.

The home (``~/.radfed/coordinator`` or ``RADFED_COORDINATOR_HOME``) holds the
federation CA, the server certificate, the registry (SQLite by default) and the
object store. ``database_url`` may name PostgreSQL instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from protocols.authsettings import AuthSettings

if TYPE_CHECKING:
    from coordinator.objects import ObjectStore


def default_home() -> Path:
    """``RADFED_COORDINATOR_HOME`` or ``~/.radfed/coordinator``."""
    env = os.environ.get("RADFED_COORDINATOR_HOME")
    return Path(env).expanduser() if env else Path.home() / ".radfed" / "coordinator"


class CoordinatorSettings(AuthSettings, BaseSettings):
    """The coordinator's configuration."""

    model_config = SettingsConfigDict(
        env_prefix="RADFED_COORDINATOR_", env_nested_delimiter="__", extra="forbid"
    )
    _config_home: ClassVar[Path | None] = None

    home: Path = Field(default_factory=default_home)
    environment: Literal["development", "production"] = "development"
    #: Name of the federation (the CA's common name).
    federation: str = "RadFed federation"
    #: The API (TLS). Loopback unless the operator opens it.
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8443, ge=0, le=65535)
    #: Names the server certificate is valid for (DNS names and IP addresses).
    server_names: list[str] = Field(default_factory=lambda: ["localhost", "127.0.0.1"])
    #: Set when a TLS-terminating proxy sits in front: nodes are then identified by
    #: their signed request tokens alone (DESIGN: identity does not depend on TLS).
    behind_proxy: bool = False
    #: SQLAlchemy URL of the registry; default SQLite in the home.
    database_url: str | None = None
    #: Where exam files are kept: "fs" (``<home>/objects``) or "s3".
    object_store: Literal["fs", "s3"] = "fs"
    s3_bucket: str = "radfed"
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_prefix: str = ""
    #: Enrollment tokens expire after this many hours.
    enrollment_ttl_hours: float = Field(default=24.0, gt=0)
    #: Node certificates are valid this long.
    node_cert_days: int = Field(default=397, ge=1)
    #: How old a node's signed request token may be (clock skew included).
    node_token_max_age_s: int = Field(default=300, ge=10)
    #: A request body may carry this many MiB at most (an upload's file chunk: 64 MiB);
    #: a larger one is refused (413) before it is read. The API holds at most this
    #: much per request in memory.
    max_request_body_mib: float = Field(default=16.0, gt=0)
    #: A request body that stops arriving for this long is cut off (408): a slow
    #: sender cannot hold a connection open forever.
    request_body_timeout_s: float = Field(default=60.0, gt=0)
    #: A connection must send a request's complete headers within this long of being
    #: ready for one, or it is closed (no slow-loris holding connections open).
    request_header_timeout_s: float = Field(default=20.0, gt=0)
    #: Connections and requests served at once; beyond it a request gets 503.
    max_connections: int = Field(default=1024, ge=16)
    #: Uploads one site may hold open at once (an upload closes when its exam is
    #: registered, refused or expires) ...
    max_open_uploads_per_site: int = Field(default=64, ge=1)
    #: ... and the GiB their manifests may declare together: what a site can make the
    #: coordinator keep for exams that are not registered yet.
    max_open_upload_gib_per_site: float = Field(default=64.0, gt=0)
    #: A site not heard from in this long is "stale".
    stale_after_s: int = Field(default=900, ge=10)
    #: An uploaded exam with a PHI finding at or above this severity is quarantined.
    quarantine_at_or_above: Literal["info", "low", "medium", "high", "critical"] = "low"
    #: Processes scanning uploaded instances (0: one per core; 1: in the server process).
    scan_workers: int = Field(default=0, ge=0)
    #: Researcher statistics show a count under k as "<k".
    small_count_k: int = Field(default=5, ge=1)
    #: Registry search, exam and statistics answers kept in memory (MiB; 0: none),
    #: valid until the next registry write (``coordinator.registry.cache``).
    registry_cache_mib: float = Field(default=64, ge=0)
    #: The C heap (glibc; ``protocols.heap``): malloc arenas the request threads share
    #: (0: the C library's default, eight per core), and how often the free pages inside
    #: them are given back to the system (seconds; 0: never). Without both the
    #: resident memory rose with uploads while live allocations stayed flat.
    malloc_arena_max: int = Field(default=2, ge=0)
    malloc_trim_s: float = Field(default=60, ge=0)
    #: Federated training: ``serve`` supervises a Flower SuperLink (TLS with the
    #: federation's server certificate, SuperNode authentication on). Loopback by
    #: default: only its ``/v1/fleet/`` paths are for nodes, so expose those alone.
    flower_enabled: bool = True
    superlink_host: str = "127.0.0.1"
    superlink_port: int = Field(default=9093, ge=0, le=65535)
    #: host:port nodes' SuperNodes dial (default: the first server name, the port above).
    superlink_public: str | None = None
    #: Where the Flower apps researchers may run live (``<apps_dir>/<name>/``).
    apps_dir: Path = Field(default_factory=lambda: Path(__file__).resolve().parents[1] / "apps")
    #: A ``TrainingManifest`` JSON of held-out data for centralised evaluation.
    central_eval_manifest: Path | None = None
    #: How often runs, SuperNode registrations and the SuperLink are checked (seconds).
    training_poll_s: float = Field(default=2.0, gt=0)

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

    @property
    def pki_dir(self) -> Path:
        """The CA and server keys and certificates (keys 0600)."""
        return self.home / "pki"

    @property
    def objects_dir(self) -> Path:
        return self.home / "objects"

    @property
    def uploads_dir(self) -> Path:
        """Partial uploads, until their exam is registered."""
        return self.home / "uploads"

    @property
    def releases_dir(self) -> Path:
        return self.home / "releases"

    @property
    def flower_dir(self) -> Path:
        """The SuperLink's state and the ``flwr`` CLI's home (``FLWR_HOME``)."""
        return self.home / "flower"

    @property
    def superlink_address(self) -> str:
        """What enrolled nodes are told to connect their SuperNode to."""
        if self.superlink_public:
            return self.superlink_public
        loopback = self.superlink_host in ("127.0.0.1", "localhost", "::1")
        host = "127.0.0.1" if loopback else self.server_names[0]
        return f"{host}:{self.superlink_port}"

    @property
    def runs_dir(self) -> Path:
        """One directory per training run: the ServerApp's outputs."""
        return self.home / "runs"

    def store(self, durable_puts: bool = True) -> ObjectStore:
        """The object store these settings name (filesystem under the home, or S3).

        ``durable_puts=False``: filesystem puts do not wait for the disk; the caller
        makes objects durable with ``store.sync`` when it needs them (intake does,
        before it registers an exam).
        """
        from coordinator.objects import FilesystemStore, open_store

        store = open_store(
            object_store=self.object_store,
            root=self.objects_dir,
            s3_bucket=self.s3_bucket,
            s3_endpoint_url=self.s3_endpoint_url,
            s3_region=self.s3_region,
            s3_prefix=self.s3_prefix,
            spool_dir=self.uploads_dir,
        )
        if isinstance(store, FilesystemStore):
            store.durable_puts = durable_puts
        return store

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'registry.sqlite'}"


def load_settings(home: Path | None = None, **overrides: Any) -> CoordinatorSettings:
    """Settings for a coordinator home (the CLI's ``--home``), reading its config file."""
    CoordinatorSettings._config_home = home
    try:
        if home is not None:
            overrides["home"] = home
        return CoordinatorSettings(**overrides)
    finally:
        CoordinatorSettings._config_home = None
