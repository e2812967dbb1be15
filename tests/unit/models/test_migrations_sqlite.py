from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from models import Base
from models import migrate as migrations
from models.session import make_engine


def test_sqlite_migrations_match_models_and_rerun_is_a_no_op(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/db.sqlite3")
    migrations.upgrade(engine)
    migrations.upgrade(engine)
    assert migrations.current_revision(engine) == migrations.head_revision(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                Base.metadata)
    assert diff == []
