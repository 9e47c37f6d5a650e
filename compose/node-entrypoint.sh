#!/bin/sh
# The node container's entrypoint: first start, then `radfed node serve`.
#
# `serve` runs the API and web UI (port 8080), the DICOM listener (port 11112) and,
# once the node is enrolled, supervises its Flower SuperNode in the same process
# tree, so one container is the whole site. On the first start (not enrolled yet) it
# runs `radfed node enroll COORDINATOR_URL TOKEN` with the one-time token from the
# ENROLLMENT_TOKEN_FILE secret; a failed enrollment stops the container (and the
# restart policy tries again) rather than leaving a site that silently shares nothing.
#
# Environment read here (besides the RADFED_NODE_* settings):
#   COORDINATOR_URL        the coordinator's API, e.g. https://coordinator.example.org:8443
#   ENROLLMENT_TOKEN_FILE  the token `radfed coordinator site add` printed
#                          (default /run/secrets/enrollment_token).
# Without COORDINATOR_URL the node runs on its own (intake, de-identification, vetting).
#
# Any other command is run as given: `docker compose run node radfed node ...`.
set -eu

if [ "$#" -gt 0 ] && [ "$1" != "serve" ]; then
    exec "$@"
fi

home="${RADFED_NODE_HOME:?RADFED_NODE_HOME must name the node home}"

# The same file `radfed node enroll` writes last (node.federation.enrolled checks it too).
if [ ! -f "$home/keys/federation/coordinator.json" ]; then
    token_file="${ENROLLMENT_TOKEN_FILE:-/run/secrets/enrollment_token}"
    if [ -z "${COORDINATOR_URL:-}" ]; then
        echo "radfed: COORDINATOR_URL is not set, the node runs without a federation" >&2
    elif [ ! -s "$token_file" ]; then
        echo "radfed: not enrolled and no enrollment token in $token_file" >&2
        exit 2
    else
        echo "radfed: first start, enrolling at $COORDINATOR_URL" >&2
        radfed node enroll --home "$home" "$COORDINATOR_URL" "$(cat "$token_file")"
    fi
fi

exec radfed node serve --home "$home"
