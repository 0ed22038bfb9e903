#!/usr/bin/env bash
# Start a throwaway local PostgreSQL server for the tests and export its URL.
#
# Source it (`. .ci/start-postgres.sh`): on a fresh Debian machine it installs
# Debian's `postgresql` package when the server binaries are missing, creates a
# cluster in a temp dir (owned by the `postgres` user, since CI runs as root), starts
# it on 127.0.0.1 on a free port, creates a database and exports
# KVCACHE_TEST_PG_URL. The server is stopped when the sourcing shell exits.
# Run as a script, it prints `export KVCACHE_TEST_PG_URL=...` instead (and leaves
# the server running; stop it with `pg_ctl -D <dir> stop`, the dir is printed too).

_kv_pg_bindir() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
            echo "$d"
        fi
    done | sort -V | tail -n 1
}

_kv_pg_start() {
    local bindir
    bindir="$(_kv_pg_bindir)"
    if [ -z "$bindir" ]; then
        echo "start-postgres: installing Debian's postgresql package" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2 && apt-get install -y -qq postgresql >&2 || return 1
        bindir="$(_kv_pg_bindir)"
        [ -n "$bindir" ] || { echo "start-postgres: no PostgreSQL binaries after install" >&2; return 1; }
    fi
    local run=()
    local owner
    owner="$(id -un)"
    if [ "$(id -u)" = "0" ]; then
        id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres || return 1
        run=(runuser -u postgres --)
        owner=postgres
    fi
    local dir port
    dir="$(mktemp -d /tmp/kvcache-pg.XXXXXX)"
    chown "$owner" "$dir"
    chmod 700 "$dir"
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    "${run[@]}" "$bindir/initdb" -D "$dir/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
        || "${run[@]}" "$bindir/initdb" -D "$dir/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; return 1; }
    "${run[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-h 127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
        start >/dev/null || { cat "$dir/server.log" >&2; return 1; }
    "${run[@]}" "$bindir/psql" -q -h "$dir" -p "$port" -U postgres -d postgres \
        -c "ALTER USER postgres PASSWORD 'kvcache-test'" -c "CREATE DATABASE kvcache_test" >/dev/null \
        || return 1
    KVCACHE_PG_DIR="$dir"
    KVCACHE_PG_CTL="$bindir/pg_ctl"
    KVCACHE_TEST_PG_URL="postgresql://postgres:kvcache-test@127.0.0.1:$port/kvcache_test"
    export KVCACHE_PG_DIR KVCACHE_PG_CTL KVCACHE_TEST_PG_URL
    echo "start-postgres: PostgreSQL running in $dir on 127.0.0.1:$port" >&2
}

_kv_pg_stop() {
    if [ -n "${KVCACHE_PG_DIR:-}" ] && [ -d "$KVCACHE_PG_DIR/data" ]; then
        if [ "$(id -u)" = "0" ]; then
            runuser -u postgres -- "$KVCACHE_PG_CTL" -D "$KVCACHE_PG_DIR/data" -m fast stop >/dev/null 2>&1 || true
        else
            "$KVCACHE_PG_CTL" -D "$KVCACHE_PG_DIR/data" -m fast stop >/dev/null 2>&1 || true
        fi
        rm -rf "$KVCACHE_PG_DIR"
    fi
}

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
    # sourced: start, export, stop on exit
    _kv_pg_start || { echo "start-postgres: could not start PostgreSQL" >&2; return 1; }
    trap _kv_pg_stop EXIT
else
    set -euo pipefail
    _kv_pg_start
    echo "export KVCACHE_TEST_PG_URL='$KVCACHE_TEST_PG_URL'"
    echo "# stop with: runuser -u postgres -- $KVCACHE_PG_CTL -D $KVCACHE_PG_DIR/data stop" >&2
fi
