"""Federated training: sites' SuperNodes, runs as Flower runs them, rounds, model provenance.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from protocols.sqltypes import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sites", schema=None) as batch_op:
        batch_op.add_column(sa.Column("flower_node_id", sa.String(length=24), nullable=True))
        batch_op.add_column(sa.Column("flower_key_sha256", sa.String(length=64), nullable=True))
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("app_hash", sa.String(length=64), nullable=False, server_default="")
        )
        batch_op.add_column(sa.Column("rounds", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(
            sa.Column("current_round", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("flower_run_id", sa.String(length=24), nullable=True))
        batch_op.add_column(sa.Column("attempts", sa.Text(), nullable=False, server_default="[]"))
        batch_op.add_column(sa.Column("run_dir", sa.Text(), nullable=False, server_default=""))
        batch_op.add_column(
            sa.Column("degraded", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("error", sa.Text(), nullable=True))
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("provenance", sa.Text(), nullable=False, server_default="{}"))
    op.create_table(
        "training_rounds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("participation", sa.Text(), nullable=False),
        sa.Column("metrics", sa.Text(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["training_runs.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_id", "round", name="uq_training_round"),
    )
    with op.batch_alter_table("training_rounds", schema=None) as batch_op:
        batch_op.create_index("ix_training_rounds_run_id", ["run_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("training_rounds", schema=None) as batch_op:
        batch_op.drop_index("ix_training_rounds_run_id")
    op.drop_table("training_rounds")
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("provenance")
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        for column in (
            "error",
            "degraded",
            "run_dir",
            "attempts",
            "flower_run_id",
            "current_round",
            "rounds",
            "app_hash",
        ):
            batch_op.drop_column(column)
    with op.batch_alter_table("sites", schema=None) as batch_op:
        batch_op.drop_column("flower_key_sha256")
        batch_op.drop_column("flower_node_id")
