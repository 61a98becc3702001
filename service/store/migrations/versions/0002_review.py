"""human review: candidate answers and review assignments

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.add_column(sa.Column("purpose", sa.String(16), nullable=False, server_default="served"))
        batch.add_column(sa.Column("parent_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("review_kind", sa.String(8), nullable=True))
        batch.create_index("ix_generations_parent_id", ["parent_id"])
        batch.create_index("ix_generations_review_kind", ["review_kind"])
    op.create_table(
        "review_assignments",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("item_id", sa.String(64), sa.ForeignKey("generations.id"), nullable=False),
        sa.Column("reviewer", sa.String(64), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("shown_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("left_id", sa.String(64), nullable=False),
        sa.Column("right_id", sa.String(64), nullable=True),
        sa.Column("verdict", sa.String(8), nullable=True),
        sa.Column("chosen_id", sa.String(64), nullable=True),
        sa.Column("strength", sa.Integer(), nullable=True),
        sa.Column("flags", sa.JSON(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("judged_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("item_id", "reviewer", name="uq_review_assignments_item_reviewer"),
    )
    for column in ("item_id", "reviewer", "status", "judged_at"):
        op.create_index(f"ix_review_assignments_{column}", "review_assignments", [column])


def downgrade() -> None:
    op.drop_table("review_assignments")
    with op.batch_alter_table("generations") as batch:
        batch.drop_index("ix_generations_review_kind")
        batch.drop_index("ix_generations_parent_id")
        batch.drop_column("review_kind")
        batch.drop_column("parent_id")
        batch.drop_column("purpose")
