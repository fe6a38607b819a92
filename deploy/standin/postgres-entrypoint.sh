#!/bin/sh
# As the official image's entrypoint: prepare the data directory as root, initialise it once
# (password, database), then run the server as the postgres user (setpriv execs: no root
# process stays behind).
set -eu
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
mkdir -p "$PGDATA" /run/postgresql
chown -R postgres:postgres "$PGDATA" /run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  password_file=$(mktemp)
  printf '%s\n' "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set}" > "$password_file"
  chown postgres "$password_file"
  as_postgres initdb -D "$PGDATA" -U postgres --pwfile="$password_file" \
    --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8
  rm -f "$password_file"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  as_postgres pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start
  if [ -n "${POSTGRES_DB:-}" ] && [ "$POSTGRES_DB" != postgres ]; then
    as_postgres psql -v ON_ERROR_STOP=1 -U postgres -d postgres \
      -c "CREATE DATABASE \"$POSTGRES_DB\""
  fi
  # As the official image: the init scripts mounted there, once, on the new data directory.
  for script in /docker-entrypoint-initdb.d/*.sh; do
    [ -e "$script" ] || continue
    PGHOST=/run/postgresql as_postgres sh "$script"
  done
  as_postgres pg_ctl -D "$PGDATA" -m fast -w stop
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups \
  postgres -D "$PGDATA" -c listen_addresses='*'
