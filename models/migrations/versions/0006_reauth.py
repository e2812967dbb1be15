"""reauth: what each re-authorisation link (one per mail) was for and how its mail went

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 09:00:00.000000

`reauth_links` gains `kind` (broken | reminder | operator), `requested_by` (the operator who
asked for it), `delivery` (smtp | log | undeliverable | rejected | skipped, once decided) and an
index on (user_id, created_at) for the per-user daily cap.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('reauth_links') as batch:
        batch.add_column(sa.Column('kind', sa.String(length=20), server_default='broken',
                                   nullable=False))
        batch.add_column(sa.Column('requested_by', sa.String(length=200), nullable=True))
        batch.add_column(sa.Column('delivery', sa.String(length=20), nullable=True))
    op.create_index('ix_reauth_links_user_created', 'reauth_links', ['user_id', 'created_at'],
                    unique=False)


def downgrade() -> None:
    op.drop_index('ix_reauth_links_user_created', table_name='reauth_links')
    with op.batch_alter_table('reauth_links') as batch:
        batch.drop_column('delivery')
        batch.drop_column('requested_by')
        batch.drop_column('kind')
