#!/usr/bin/env bash
# Installs (Debian) and starts a throwaway PostgreSQL on 127.0.0.1:55432 for the store tests, then prints
# the export line for ZEPHYR_TEST_POSTGRES_URL. Idempotent: a running server is reused.
# `postgres-for-tests.sh stop` stops it (the database-outage drill does, with its own port and data dir).
set -euo pipefail
PORT=${ZEPHYR_TEST_POSTGRES_PORT:-55432}
DATA=${ZEPHYR_TEST_POSTGRES_DATA:-/tmp/zephyr-pg}
DATA=${DATA%/}  # its lock and socket folder sit beside it, not inside
URL="postgresql+asyncpg://zephyr:zephyr@127.0.0.1:${PORT}/zephyr"

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"  # a runner that is not root installs through sudo, as chromium-for-tests.sh does
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  ($SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) >&2
fi
BIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -n 1)")
id postgres >/dev/null 2>&1 || $SUDO useradd --system --create-home postgres
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi; }

if [ "${1:-start}" = stop ]; then
  as_pg "$BIN/pg_ctl -D $DATA -m fast -w stop" >&2
  exit 0
fi

# One start at a time (CI beside a drill, two shells): both would find no server, and race on initdb and start.
exec 9>"$DATA.lock"
flock 9
# The superuser connects only through a socket in its own folder that no other user may open; over TCP, only with
# a password (the test role's). Trust on 127.0.0.1 let any local user in as superuser, and COPY ... TO PROGRAM run
# commands as the server's user.
SOCKET="$DATA.socket"
if ! as_pg "$BIN/pg_isready -q -h 127.0.0.1 -p $PORT"; then
  if [ ! -f "$DATA/PG_VERSION" ]; then
    if [ -d "$DATA" ] && [ -n "$(ls -A "$DATA")" ]; then
      echo "$DATA holds files but no PostgreSQL cluster (an initdb stopped part way?): delete it and run again" >&2
      exit 1
    fi
    mkdir -p "$DATA" && chown postgres "$DATA" 2>/dev/null || true
    as_pg "$BIN/initdb -D $DATA -U postgres --auth-local=trust --auth-host=scram-sha-256" >/dev/null
  fi
  mkdir -p "$SOCKET" && chown postgres "$SOCKET" 2>/dev/null || true
  as_pg "chmod 700 $SOCKET"
  # A folder made by an older version of this script trusted every TCP connection: a password from now on.
  as_pg "sed -i -E 's/^(host[a-z]*[[:space:]].*[[:space:]])trust[[:space:]]*\$/\\1scram-sha-256/' $DATA/pg_hba.conf"
  # 9>&-: the server must not inherit the lock, or it would hold it for as long as it runs
  as_pg "$BIN/pg_ctl -D $DATA -l $DATA/server.log -o '-c listen_addresses=127.0.0.1 -p $PORT -k $SOCKET' -w start" \
    >&2 9>&-
fi
if [ ! -S "$SOCKET/.s.PGSQL.$PORT" ]; then
  echo "a server on port $PORT answers without its socket in $SOCKET (started by an older version of this script):" \
    "stop it with \`bash $0 stop\` and run again" >&2
  exit 1
fi
sql() { as_pg "$BIN/psql -q -h $SOCKET -p $PORT -U postgres $*"; }
sql "-tc \"select 1 from pg_roles where rolname='zephyr'\"" | grep -q 1 \
  || sql "-c \"create role zephyr login password 'zephyr'\"" >&2
# The review-store tests make a fresh database each, so that no test sees another's queue.
sql "-c 'alter role zephyr createdb'" >&2
sql "-tc \"select 1 from pg_database where datname='zephyr'\"" | grep -q 1 \
  || sql "-c 'create database zephyr owner zephyr'" >&2
echo "export ZEPHYR_TEST_POSTGRES_URL='$URL'"
