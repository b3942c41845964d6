#!/bin/sh
# Initialises PGDATA on first start (superuser POSTGRES_USER with POSTGRES_PASSWORD, database
# POSTGRES_DB) on a private socket, so pg_isready stays false until it is done; then runs postgres.
set -eu
user=${POSTGRES_USER:-postgres} db=${POSTGRES_DB:-${POSTGRES_USER:-postgres}}
mkdir -p "$PGDATA" /run/postgresql
chown -R postgres:postgres "$PGDATA" /run/postgresql
chmod 700 "$PGDATA"
as_pg() { setpriv --reuid postgres --regid postgres --init-groups "$@"; }
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required}"
  init=$(mktemp -d) && chown postgres "$init"
  printf '%s\n' "$POSTGRES_PASSWORD" > "$init/pw"
  as_pg initdb -D "$PGDATA" -U "$user" --pwfile="$init/pw" -A scram-sha-256 >/dev/null
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  as_pg pg_ctl -D "$PGDATA" -w -o "-c listen_addresses='' -k $init" start >/dev/null
  if [ "$db" != postgres ]; then PGPASSWORD=$POSTGRES_PASSWORD as_pg createdb -h "$init" -U "$user" "$db"; fi
  as_pg pg_ctl -D "$PGDATA" -w -m fast stop >/dev/null
  rm -rf "$init"
fi
exec setpriv --reuid postgres --regid postgres --init-groups "$@" -D "$PGDATA" -c listen_addresses='*'
