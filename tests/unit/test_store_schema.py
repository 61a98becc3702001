"""The migrations build exactly the tables the ORM models describe: a column or table added to one and not the
other fails here, not in production's first insert."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from service.store.log import make_engine, upgrade_schema
from service.store.models import Base


async def test_the_migrations_build_what_the_models_describe(tmp_path):
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'z.db'}")
    await upgrade_schema(engine)

    def differences(connection) -> list:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)

    async with engine.connect() as connection:
        found = await connection.run_sync(differences)
    await engine.dispose()
    assert found == []
