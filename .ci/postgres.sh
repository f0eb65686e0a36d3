#!/usr/bin/env bash
# CI: make a PostgreSQL server available to tests/assets/test_postgres.py, which starts its
# own throwaway server from these binaries (initdb + postgres on 127.0.0.1, a free port, a
# temporary data folder, run as the `postgres` user under root) and stops it by PID.
#
# Idempotent: when initdb and pg_ctl exist under /usr/lib/postgresql/<version>/bin it changes
# nothing; otherwise it installs Debian's `postgresql` with apt-get (needs root). No systemd
# needed: no service is started, and the package's own default cluster is kept from starting
# during the installation (a temporary policy-rc.d, Debian's switch for that), so nothing is
# left running.
#
# Usage: bash .ci/postgres.sh
set -Eeuo pipefail

PG_ROOT=/usr/lib/postgresql
START=$SECONDS

log() { printf '[postgres.sh %3ds] %s\n' "$((SECONDS - START))" "$*"; }

find_bin() {  # the newest version's bin folder holding initdb, pg_ctl and postgres, or nothing
    local dir
    for dir in $(find "$PG_ROOT" -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null \
                 | sort -V -r); do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ]; then
            echo "$dir"
            return 0
        fi
    done
    return 0
}

POLICY=/usr/sbin/policy-rc.d
OWN_POLICY=0
cleanup() {
    # Only a policy file this script wrote is removed.
    if [ "$OWN_POLICY" = 1 ]; then rm -f "$POLICY"; fi
}
trap cleanup EXIT

BIN=$(find_bin)
if [ -z "$BIN" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "postgres.sh: no PostgreSQL server under $PG_ROOT and not root:" \
             "install the Debian package 'postgresql' (apt-get install postgresql)" >&2
        exit 1
    fi
    log "installing postgresql with apt-get"
    if [ ! -e "$POLICY" ]; then
        # invoke-rc.d asks this file before starting a service: 101 = not now. Without it the
        # package's postinst starts its cluster on port 5432 through the init script.
        printf '#!/bin/sh\nexit 101\n' > "$POLICY"
        chmod 755 "$POLICY"
        OWN_POLICY=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends postgresql
    cleanup
    OWN_POLICY=0
    BIN=$(find_bin)
    if [ -z "$BIN" ]; then
        echo "postgres.sh: postgresql installed, but no initdb/pg_ctl/postgres under" \
             "$PG_ROOT/*/bin" >&2
        exit 1
    fi
else
    log "found $BIN: nothing to install"
fi

"$BIN/postgres" --version
"$BIN/initdb" --version >/dev/null
"$BIN/pg_ctl" --version >/dev/null
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    # PostgreSQL refuses to run as root; the test runs the server as this account.
    echo "postgres.sh: running as root but there is no 'postgres' user to run the server as" >&2
    exit 1
fi
log "ready: PostgreSQL server binaries in $BIN (the test finds them there)"
