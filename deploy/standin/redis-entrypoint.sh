#!/bin/sh
# As the official image's entrypoint: a bare `redis-server ...` listens for the other
# containers (protected mode off, every interface), and runs as the redis user.
set -eu
if [ "${1:-}" = redis-server ]; then
  shift
  set -- redis-server --protected-mode no --bind '* -::*' --dir /data "$@"
fi
chown -R redis:redis /data
exec setpriv --reuid=redis --regid=redis --init-groups "$@"
