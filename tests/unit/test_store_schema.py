"""The migrations build exactly the tables the ORM models describe: a column or table added to one and not the
other fails here, not in production's first insert."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from service.store.log import alembic_config, make_engine, upgrade_schema
from service.store.models import Base
from tests.review_data import fresh_db_url  # noqa: F401 (fixture)


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


async def test_a_migration_stopped_half_way_leaves_nothing_behind(tmp_path):
    """SQLite's driver committed each ALTER and CREATE INDEX alone: a migration stopped after its columns were added
    left them in place, and every later start failed on "duplicate column name" (found by a review)."""
    from sqlalchemy import event, inspect, text

    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'z.db'}")
    await upgrade_schema(engine, "0001")

    def stop_at_the_review_table(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("CREATE TABLE REVIEW_ASSIGNMENTS"):
            raise OSError("the pod was killed")  # after 0002 rebuilt `generations` with its new columns

    event.listen(engine.sync_engine, "before_cursor_execute", stop_at_the_review_table)
    try:
        await upgrade_schema(engine)
    except Exception as exc:  # noqa: BLE001 - whatever the driver makes of it
        assert "killed" in str(exc)
    else:
        raise AssertionError("the migration was not stopped")
    event.remove(engine.sync_engine, "before_cursor_execute", stop_at_the_review_table)

    async with engine.connect() as connection:
        columns = await connection.run_sync(lambda c: [col["name"] for col in inspect(c).get_columns("generations")])
        assert (await connection.execute(text("SELECT version_num FROM alembic_version"))).scalar() == "0001"
    assert "purpose" not in columns
    await upgrade_schema(engine)  # and the next start migrates
    head = ScriptDirectory.from_config(alembic_config(str(engine.url))).get_current_head()
    async with engine.connect() as connection:
        assert (await connection.execute(text("SELECT version_num FROM alembic_version"))).scalar() == head
    await engine.dispose()


async def test_replicas_starting_together_migrate_in_turn(fresh_db_url):  # noqa: F811
    """Both migrated at once on PostgreSQL; the loser failed ("already exists") and spilled until its next probe."""
    import asyncio

    from sqlalchemy import text

    engines = [make_engine(fresh_db_url) for _ in range(3)]
    try:
        # bounded: unlocked, they could also wait on each other's DDL locks for good
        await asyncio.wait_for(asyncio.gather(*(upgrade_schema(engine) for engine in engines)), 120)
        head = ScriptDirectory.from_config(alembic_config(fresh_db_url)).get_current_head()
        async with engines[0].connect() as connection:
            assert (await connection.execute(text("SELECT version_num FROM alembic_version"))).scalar() == head
    finally:
        for engine in engines:
            await engine.dispose()
