"""which weights wrote each generation: its model's registry revision

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.add_column(sa.Column("model_revision", sa.String(80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("generations") as batch:  # SQLite drops a column by rebuilding the table
        batch.drop_column("model_revision")
