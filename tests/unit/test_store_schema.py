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


async def test_a_database_a_newer_version_migrated_is_written_as_it_is(tmp_path, caplog):
    """After a rollback past a migration, upgrading failed at every start and retry, and every row spilled."""
    from sqlalchemy import text

    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'z.db'}")
    await upgrade_schema(engine)
    async with engine.begin() as connection:
        await connection.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    await upgrade_schema(engine)  # raised "Can't locate revision identified by '0099'"
    async with engine.connect() as connection:
        assert (await connection.execute(text("SELECT version_num FROM alembic_version"))).scalar() == "0099"
    await engine.dispose()
    assert "at migration 0099, which this version does not know" in caplog.text
