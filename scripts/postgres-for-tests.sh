#!/usr/bin/env bash
# Installs (Debian) and starts a throwaway PostgreSQL on 127.0.0.1:55432 for the store tests, then prints
# the export line for ZEPHYR_TEST_POSTGRES_URL. Idempotent: a running server is reused.
# `postgres-for-tests.sh stop` stops it (the database-outage drill does, with its own port and data dir).
set -euo pipefail
PORT=${ZEPHYR_TEST_POSTGRES_PORT:-55432}
DATA=${ZEPHYR_TEST_POSTGRES_DATA:-/tmp/zephyr-pg}
URL="postgresql+asyncpg://zephyr:zephyr@127.0.0.1:${PORT}/zephyr"

if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) >&2
fi
BIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -n 1)")
id postgres >/dev/null 2>&1 || useradd --system --create-home postgres
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi; }

if [ "${1:-start}" = stop ]; then
  as_pg "$BIN/pg_ctl -D $DATA -m fast -w stop" >&2
  exit 0
fi

if ! as_pg "$BIN/pg_isready -q -h 127.0.0.1 -p $PORT"; then
  if [ ! -f "$DATA/PG_VERSION" ]; then
    mkdir -p "$DATA" && chown postgres "$DATA" 2>/dev/null || true
    as_pg "$BIN/initdb -D $DATA -U postgres --auth=trust" >/dev/null
  fi
  as_pg "$BIN/pg_ctl -D $DATA -l $DATA/server.log -o '-c listen_addresses=127.0.0.1 -p $PORT -k /tmp' -w start" >&2
fi
as_pg "$BIN/psql -q -h 127.0.0.1 -p $PORT -U postgres -tc \"select 1 from pg_roles where rolname='zephyr'\"" \
  | grep -q 1 || as_pg "$BIN/psql -q -h 127.0.0.1 -p $PORT -U postgres -c \"create role zephyr login password 'zephyr'\"" >&2
# The review-store tests make a fresh database each, so that no test sees another's queue.
as_pg "$BIN/psql -q -h 127.0.0.1 -p $PORT -U postgres -c 'alter role zephyr createdb'" >&2
as_pg "$BIN/psql -q -h 127.0.0.1 -p $PORT -U postgres -tc \"select 1 from pg_database where datname='zephyr'\"" \
  | grep -q 1 || as_pg "$BIN/psql -q -h 127.0.0.1 -p $PORT -U postgres -c 'create database zephyr owner zephyr'" >&2
echo "export ZEPHYR_TEST_POSTGRES_URL='$URL'"
