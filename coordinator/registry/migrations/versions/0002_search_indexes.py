"""Registry search: indexes that answer its queries without reading exam rows.

Exams are sorted by registration time, a modality is searched with either
sort key, and the few withdrawn exams are found by ``withdrawn_at``: on SQLite
an exam row stores its manifest inline, so every row read is a page (or, for
the columns after the manifest, a walk through its overflow pages). The label and clinical indexes
gain ``exam_id``, so a condition on a label or a clinical value, and label
statistics, are read from the index alone; the narrower indexes they replace
are dropped.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 07:30:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("exams", schema=None) as batch_op:
        batch_op.create_index("ix_exams_registered_at", ["registered_at"], unique=False)
        batch_op.create_index(
            "ix_exams_modality_study_date", ["modality", "study_date"], unique=False
        )
        batch_op.create_index(
            "ix_exams_modality_registered_at", ["modality", "registered_at"], unique=False
        )
        batch_op.create_index("ix_exams_withdrawn_at", ["withdrawn_at"], unique=False)
    with op.batch_alter_table("labels", schema=None) as batch_op:
        batch_op.create_index(
            "ix_labels_value_exam", ["scheme", "name", "value", "exam_id"], unique=False
        )
        batch_op.drop_index("ix_labels_value")
    with op.batch_alter_table("clinical_values", schema=None) as batch_op:
        batch_op.create_index(
            "ix_clinical_value_exam", ["variable", "value", "exam_id"], unique=False
        )
        batch_op.drop_index("ix_clinical_value")


def downgrade() -> None:
    with op.batch_alter_table("clinical_values", schema=None) as batch_op:
        batch_op.create_index("ix_clinical_value", ["variable", "value"], unique=False)
        batch_op.drop_index("ix_clinical_value_exam")
    with op.batch_alter_table("labels", schema=None) as batch_op:
        batch_op.create_index("ix_labels_value", ["scheme", "name", "value"], unique=False)
        batch_op.drop_index("ix_labels_value_exam")
    with op.batch_alter_table("exams", schema=None) as batch_op:
        batch_op.drop_index("ix_exams_withdrawn_at")
        batch_op.drop_index("ix_exams_modality_registered_at")
        batch_op.drop_index("ix_exams_modality_study_date")
        batch_op.drop_index("ix_exams_registered_at")
