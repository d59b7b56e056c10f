#!/bin/sh
# Entrypoint of the parallm container image (Dockerfile.macos-runner).
#
#   (no arguments) or `serve [args]`: runs `parallm serve` bound to 0.0.0.0, but only inside the
#     container (PARALLM_IN_CONTAINER=1, set by the image) and only with PARALLM_API_KEY set:
#     a server reachable from the network must not answer strangers. The key reaches the server
#     through the environment (parallm reads PARALLM_API_KEY), never through argv, so it does not
#     show in `ps`.
#   anything else (`info`, `bench`, `--help`): runs `parallm <args>` as given.
#
# PARALLM_ENTRYPOINT_DRY_RUN=1 prints the command (one argument per line) instead of running it;
# the tests use it. PARALLM_APP_DIR (default /opt/parallm) is where the project and .venv live.
set -eu

app_dir=${PARALLM_APP_DIR:-/opt/parallm}
parallm="$app_dir/.venv/bin/parallm"

[ "$#" -gt 0 ] || set -- serve

if [ "$1" = "serve" ]; then
    key_without_spaces=$(printf '%s' "${PARALLM_API_KEY:-}" | tr -d '[:space:]')
    if [ -z "$key_without_spaces" ]; then
        echo "container-entrypoint: refusing to start 'parallm serve': PARALLM_API_KEY is not set." >&2
        echo "  The server listens on all interfaces inside the container; give it a key:" >&2
        echo "  docker run -e PARALLM_API_KEY=\$(openssl rand -hex 24) -p 127.0.0.1:8000:8000 IMAGE" >&2
        exit 78  # EX_CONFIG
    fi
    shift
    if [ "${PARALLM_IN_CONTAINER:-}" = "1" ]; then
        host=0.0.0.0  # the container's own network namespace: reachable only through -p
    else
        host=127.0.0.1  # run outside the image (a developer trying the script): stay on loopback
    fi
    set -- serve --host "$host" "$@"
fi

if [ -n "${PARALLM_ENTRYPOINT_DRY_RUN:-}" ]; then
    printf '%s\n' "$parallm" "$@"
    exit 0
fi
exec "$parallm" "$@"
