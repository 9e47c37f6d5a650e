#!/bin/sh
# The coordinator container's entrypoint: first start, then `radfed coordinator serve`.
#
# `serve` runs the API (TLS, port 8443) and supervises the federation's Flower
# SuperLink (port 9093) in the same process tree, so one container is the whole
# coordinator. On the first start (no federation CA in the home volume yet) it runs
# `radfed coordinator init`; with BOOTSTRAP_SITES it then adds those sites and writes
# each one's one-time enrollment token to BOOTSTRAP_TOKENS_DIR/<site> (the demo).
#
# Environment read here (besides the RADFED_COORDINATOR_* settings):
#   POSTGRES_PASSWORD_FILE  the registry's database password (a Docker secret); libpq
#                           reads it from PGPASSWORD, so the URL in the environment
#                           and the image hold no password.
#   BOOTSTRAP_SITES         site names to add on the first start (space-separated).
#   BOOTSTRAP_TOKENS_DIR    where their tokens go (default /var/lib/radfed/enrollment).
#
# Any other command is run as given, with the password in place.
set -eu

if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
    if [ ! -r "$POSTGRES_PASSWORD_FILE" ]; then
        echo "radfed: cannot read the database password file $POSTGRES_PASSWORD_FILE" >&2
        exit 2
    fi
    PGPASSWORD="$(cat "$POSTGRES_PASSWORD_FILE")"
    export PGPASSWORD
fi

# Operator commands go through here too, for the password:
#   docker-compose exec coordinator radfed-coordinator-entrypoint radfed coordinator site list
if [ "$#" -gt 0 ] && [ "$1" != "serve" ]; then
    exec "$@"
fi

home="${RADFED_COORDINATOR_HOME:?RADFED_COORDINATOR_HOME must name the coordinator home}"

if [ ! -f "$home/pki/ca.crt" ]; then
    echo "radfed: first start, creating the federation in $home" >&2
    radfed coordinator init --home "$home"
    if [ -n "${BOOTSTRAP_SITES:-}" ]; then
        tokens="${BOOTSTRAP_TOKENS_DIR:-/var/lib/radfed/enrollment}"
        umask 077
        mkdir -p "$tokens"
        for site in $BOOTSTRAP_SITES; do
            radfed coordinator site add "$site" --home "$home" > "$tokens/$site.tmp"
            mv "$tokens/$site.tmp" "$tokens/$site"
        done
    fi
fi

exec radfed coordinator serve --home "$home"
