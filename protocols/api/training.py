"""The coordinator API's wire models for federated training runs (``/api/v1/runs``).

A researcher submits a ``RunCreate``; the coordinator answers with ``RunPublic``
(status, per-round participation by site, metrics, the model once there is one)
and serves the model with its ``Provenance``. Node operators see the apps a
coordinator offers (``AppPublic``) with the hash their policy allows.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocols.api.coordinator import ReleaseName, Sha256

#: A Flower app's name under the coordinator's apps directory.
AppName = Annotated[
    str, Field(pattern=r"^[a-z][a-z0-9_-]{0,63}$", description="a Flower app of the coordinator")
]
#: A run's public id.
RunId = Annotated[str, Field(pattern=r"^run-[0-9]{4,}$")]
#: One cohort condition: ``modality=CR``, ``body_part=CHEST`` or
#: ``label=scheme:name=value`` (nodes apply these to their own index).
CohortCondition = Annotated[
    str,
    Field(
        pattern=r'^(modality|body_part|label)=[^";\n\\]{1,200}$',
        description='"modality=CR", "body_part=CHEST" or "label=scheme:name=value"',
    ),
]


class RunCreate(BaseModel):
    """What a researcher asks for."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    app: AppName = "cxr"
    rounds: int = Field(3, ge=1, le=1000)
    min_nodes: int = Field(2, ge=1, le=1000)
    release: ReleaseName | None = Field(None, description="train on this release's exams")
    filter: list[CohortCondition] = Field(
        default_factory=list, description="or on the exams matching every condition"
    )
    strategy: Literal["fedavg", "fedprox"] = "fedavg"
    proximal_mu: float = Field(0.01, ge=0, le=100)
    secagg: bool = False
    dp_clip: float | None = Field(None, gt=0, description="client-side fixed clipping norm")
    dp_noise: float = Field(0.0, ge=0, le=100, description="noise multiplier (with dp_clip)")
    local_epochs: int = Field(1, ge=1, le=100)
    batch_size: int = Field(16, ge=1, le=4096)
    learning_rate: float = Field(0.002, gt=0, le=10)
    image_size: int = Field(64, ge=16, le=1024)
    task: Literal["binary", "ricord4"] = "binary"
    round_timeout: float = Field(600.0, ge=5, le=86400)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> RunCreate:
        if self.release is not None and self.filter:
            raise ValueError("give a release or a filter, not both")
        if self.dp_noise > 0 and self.dp_clip is None:
            raise ValueError("dp_noise needs dp_clip (client-side fixed clipping)")
        return self


class RunStatus(StrEnum):
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"


class RunRound(BaseModel):
    """One completed round: sites that trained (samples), declined or dropped; metrics."""

    model_config = ConfigDict(frozen=True)

    round: int
    trained: dict[str, int] = Field(default_factory=dict, description="site -> samples")
    declined: list[str] = Field(default_factory=list)
    dropped: list[str] = Field(default_factory=list)
    evaluated: dict[str, int] = Field(default_factory=dict, description="site -> samples")
    train_metrics: dict[str, float] = Field(default_factory=dict)
    evaluate_metrics: dict[str, float] = Field(default_factory=dict)
    central_metrics: dict[str, float] = Field(default_factory=dict)
    finished_at: dt.datetime


class ModelPublic(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    sha256: Sha256
    size: int = Field(ge=0)
    created_at: dt.datetime


class RunPublic(BaseModel):
    """A run as researchers and operators see it."""

    model_config = ConfigDict(frozen=True)

    id: RunId
    app: AppName
    app_hash: Sha256
    status: RunStatus
    degraded: bool = Field(description="a site dropped out of a round; the rounds went on")
    rounds: int
    current_round: int = Field(description="the last round completed")
    request: RunCreate
    created_by: str
    started_at: dt.datetime
    finished_at: dt.datetime | None
    error: str | None
    #: Flower run ids that carried this run (one per start or resume).
    attempts: list[str]
    #: site -> what it did in the latest round it was asked: trained, declined or dropped.
    participation: dict[str, str]
    history: list[RunRound]
    model: ModelPublic | None


class Provenance(BaseModel):
    """What a model came from: written beside the model by ``radfed train fetch``."""

    model_config = ConfigDict(frozen=True)

    run: RunId
    app: AppName
    app_hash: Sha256
    model_sha256: Sha256
    strategy: str
    privacy: dict[str, float | bool | None]
    cohort: dict[str, str | list[str] | None]
    sites: list[str] = Field(description="sites that trained in at least one round")
    rounds: list[RunRound]
    metrics_history: dict[str, list[float]] = Field(
        description='metric -> value per round ("train-loss", "central-accuracy", ...)'
    )
    attempts: list[str]
    created_by: str
    started_at: dt.datetime
    finished_at: dt.datetime | None
    federation: str


class AppPublic(BaseModel):
    """A Flower app researchers may run; node policies allow it by ``hash``."""

    model_config = ConfigDict(frozen=True)

    name: AppName
    version: str
    hash: Sha256 = Field(description="SHA-256 of the app bundle (FAB) Flower sends the nodes")
