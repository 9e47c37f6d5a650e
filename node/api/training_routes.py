"""The node's training controls over HTTP: the training policy and each run's decision.

Reviewers and operators read; only operators change the policy or approve and
decline runs. A policy change is validated whole before anything is written and
goes into the audit log with the old and new values.
"""

from __future__ import annotations

from fastapi import FastAPI

from node.api.app import Operator, ReviewerToken, errors
from node.index import audit
from node.index.store import NodeIndex
from node.settings import NodeSettings
from node.training import runs
from node.training.policy import TrainingPolicy
from protocols.api.node import TrainingDecision, TrainingPolicyBody, TrainingRunPublic


def _public(view: runs.RunView) -> TrainingRunPublic:
    return TrainingRunPublic(**view.__dict__)


def mount_training(app: FastAPI, index: NodeIndex, settings: NodeSettings) -> None:
    """Add the training routes to the node's app."""

    @app.get("/api/v1/training/policy", response_model=TrainingPolicyBody, responses=errors())
    def get_policy(_: ReviewerToken) -> TrainingPolicyBody:
        return TrainingPolicy.load(settings.training_policy_path)

    @app.put(
        "/api/v1/training/policy", response_model=TrainingPolicyBody, responses=errors(422, 503)
    )
    def put_policy(body: TrainingPolicyBody, who: Operator) -> TrainingPolicyBody:
        """Replace the training policy (applies to the next message of every run)."""
        before = TrainingPolicy.load(settings.training_policy_path)
        after = TrainingPolicy.model_validate(body.model_dump())
        after.save(settings.training_policy_path)
        with index.db.write() as session:
            audit.append(
                session,
                who,
                "training.policy",
                str(settings.training_policy_path),
                before=before.model_dump(),
                after=after.model_dump(),
            )
        return after

    @app.get("/api/v1/training/runs", response_model=list[TrainingRunPublic], responses=errors())
    def list_runs(_: ReviewerToken) -> list[TrainingRunPublic]:
        return [_public(v) for v in runs.list_runs(index.db)]

    @app.post(
        "/api/v1/training/runs/{run}/approve",
        response_model=TrainingRunPublic,
        responses=errors(422),
    )
    def approve(run: str, body: TrainingDecision, who: Operator) -> TrainingRunPublic:
        """Let a run train here (from its next message on); it may not have arrived yet."""
        return _public(runs.decide(index.db, run, True, who, body.reason))

    @app.post(
        "/api/v1/training/runs/{run}/decline",
        response_model=TrainingRunPublic,
        responses=errors(422),
    )
    def decline(run: str, body: TrainingDecision, who: Operator) -> TrainingRunPublic:
        return _public(runs.decide(index.db, run, False, who, body.reason))
