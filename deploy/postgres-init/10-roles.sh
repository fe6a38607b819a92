#!/bin/sh
# Run once by PostgreSQL's entrypoint, as the superuser, when the data directory is new
# (/docker-entrypoint-initdb.d). Two roles, so that no process of the application connects as
# the superuser:
#   trader_owner  owns the database and its schema: the migrations run as it (`migrate`).
#   trader_app    everything else: reads and writes rows of the tables trader_owner creates,
#                 owns nothing, and can create nothing (no table, no function, no database).
# (TRADER_OWNER_ROLE / TRADER_APP_ROLE rename them; tests/integration/test_database_roles.py
# runs this script against a database of its own.)
set -eu
psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
  -v dbname="${POSTGRES_DB:-postgres}" \
  -v owner="${TRADER_OWNER_ROLE:-trader_owner}" \
  -v app="${TRADER_APP_ROLE:-trader_app}" \
  -v owner_password="${TRADER_OWNER_PASSWORD:?TRADER_OWNER_PASSWORD must be set}" \
  -v app_password="${TRADER_APP_PASSWORD:?TRADER_APP_PASSWORD must be set}" <<'SQL'
CREATE ROLE :"owner" LOGIN PASSWORD :'owner_password';
CREATE ROLE :"app" LOGIN PASSWORD :'app_password';
ALTER DATABASE :"dbname" OWNER TO :"owner";
REVOKE ALL ON DATABASE :"dbname" FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE :"dbname" TO :"app";
ALTER SCHEMA public OWNER TO :"owner";
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO :"app";
-- Whatever the migrations create from now on: rows only, for the application.
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"app";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
  GRANT USAGE, SELECT ON SEQUENCES TO :"app";
SQL
