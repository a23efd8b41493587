#!/usr/bin/env bash
# Regression test of the kit's `spawn`: on a busy machine the forked shell may exec the daemon
# well after `spawn` returns. Until it does, its command line is the kit's own, so `live_pid`
# took the service for dead, `wait_ready` said "the process exited during startup", and the kit
# stopped a Kafka that was starting fine (seen on a fresh machine while cargo compiled).
#
#   bash docker/native/tests/spawn.sh     (exit 0: pass; run by engine/tests/it/services_kit.rs)
set -euo pipefail
# shellcheck source=../services
source "$(dirname "${BASH_SOURCE[0]}")/../services"
SERVICES_DIR=$(mktemp -d)
cleanup() {
  if [[ -s $SERVICES_DIR/fake/pid ]]; then kill "$(<"$SERVICES_DIR/fake/pid")" 2>/dev/null || true; fi
  rm -rf "$SERVICES_DIR"
}
trap cleanup EXIT
mkdir -p "$SERVICES_DIR/fake"
# A late exec, made certain: the fork sleeps before it runs setsid, as a descheduled fork would.
setsid() { sleep 2; exec setsid "$@"; }
# The "daemon": a shell that stays (`; :`), whose command line names the service's directory.
spawn fake bash -c 'sleep 60; :' "$SERVICES_DIR/fake"
if ! live_pid fake >/dev/null; then
  echo "FAIL: spawn returned before the daemon ran; live_pid takes a starting service for dead" >&2
  exit 1
fi
echo "ok: spawn returns once the daemon runs"
