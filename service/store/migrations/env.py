"""Alembic environment: runs on the async engine the server hands in, or on sqlalchemy.url from the CLI."""

import asyncio

from alembic import context
from sqlalchemy.ext.asyncio import create_async_engine

from service.store.models import Base

target_metadata = Base.metadata


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def _run_held(connection) -> None:
    from service.store.log import hold_for_migrations

    hold_for_migrations(connection)
    _run(connection)


async def _run_async(url: str) -> None:
    engine = create_async_engine(url, hide_parameters=True)  # a failed data migration's error quotes no row
    async with engine.begin() as connection:
        await connection.run_sync(_run_held)
    await engine.dispose()


connection = context.config.attributes.get("connection")
if context.is_offline_mode():
    context.configure(url=context.config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
elif connection is not None:
    _run(connection)
else:
    asyncio.run(_run_async(context.config.get_main_option("sqlalchemy.url")))
