"""The federated-training contract between a node, a Flower app and the coordinator.

A node hands a training app the samples its policy makes eligible for one run as
a ``TrainingManifest`` (a JSON file whose path reaches the ClientApp in its node
config under ``NODE_CONFIG_MANIFEST``). A node that does not take part in a run
answers the app's messages with an error whose reason starts with
``DECLINED_PREFIX``; the ServerApp records those sites as declined, not dropped.

The ServerApp writes into the run directory the coordinator gives it (run config
``run-dir``): ``status.json`` (``RunState``), one ``RoundRecord`` per line in
``rounds.jsonl``, a checkpoint per round under ``checkpoints/`` and the final
``model.safetensors``; the coordinator reads them into its registry. Flower node
ids are written as decimal strings (they are unsigned 64-bit integers).
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Final

from pydantic import BaseModel, ConfigDict, Field

#: Node-config key: the path of the run's ``TrainingManifest`` on the node.
NODE_CONFIG_MANIFEST: Final = "radfed-manifest"
#: Node-config key: the node's site name (for the app's logs only).
NODE_CONFIG_SITE: Final = "radfed-site"
#: An error reply whose reason starts with this is a site declining the run.
DECLINED_PREFIX: Final = "radfed-declined:"
#: Error code of such a reply (outside Flower's own codes).
DECLINED_CODE: Final = 4030

#: Files in a run directory.
RUN_STATUS_FILE: Final = "status.json"
RUN_ROUNDS_FILE: Final = "rounds.jsonl"
RUN_CHECKPOINTS_DIR: Final = "checkpoints"
RUN_MODEL_FILE: Final = "model.safetensors"


class TrainingSample(BaseModel):
    """One de-identified instance a node offers a run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="absolute path of the de-identified DICOM file on the node")
    study: str = Field(description="the de-identified Study Instance UID")
    modality: str = ""
    #: The study's labels as ``"scheme:name" -> value`` (e.g. ``"ricord:appearance"``).
    labels: dict[str, str] = Field(default_factory=dict)


class TrainingManifest(BaseModel):
    """Everything a ClientApp may read on a node, for one run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str = Field(description="the RadFed run id")
    site: str
    app_hash: str = Field(description="SHA-256 of the Flower app bundle the node accepted")
    samples: list[TrainingSample]


class RunPhase(StrEnum):
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


class RunState(BaseModel):
    """``status.json``: where the ServerApp is."""

    model_config = ConfigDict(extra="forbid")

    phase: RunPhase
    round: int = Field(0, ge=0, description="the last round completed")
    rounds: int = Field(ge=0, description="rounds asked for")
    error: str | None = None
    updated_at: dt.datetime


class RoundRecord(BaseModel):
    """One line of ``rounds.jsonl``: who took part in a round and what it measured."""

    model_config = ConfigDict(extra="forbid")

    round: int = Field(ge=1)
    #: Flower node ids the round asked.
    sampled: list[str] = Field(default_factory=list)
    #: node id -> training examples used, for nodes that trained.
    trained: dict[str, int] = Field(default_factory=dict)
    #: Nodes that answered that they do not take part.
    declined: list[str] = Field(default_factory=list)
    #: Nodes asked that did not answer (gone, timed out, or failed).
    dropped: list[str] = Field(default_factory=list)
    train_metrics: dict[str, float] = Field(default_factory=dict)
    #: Federated evaluation, aggregated over the nodes that evaluated.
    evaluate_metrics: dict[str, float] = Field(default_factory=dict)
    #: node id -> evaluation examples, for nodes that evaluated.
    evaluated: dict[str, int] = Field(default_factory=dict)
    #: Centralised evaluation on the coordinator's held-out set (when one is given).
    central_metrics: dict[str, float] = Field(default_factory=dict)
    checkpoint: str | None = None
    finished_at: dt.datetime
