#!/bin/sh
# Container entry point: bring the database schema up to date, then run `cxr-triage "$@"` as PID 1's child
# replacement (exec), so that SIGTERM from `docker stop` reaches the server and it shuts down cleanly.
set -eu
config=/etc/cxr-triage/cxr-triage.toml
case "${1:-}" in
    serve | worker) cxr-triage db upgrade --config "$config" ;;
esac
exec cxr-triage "$@"
