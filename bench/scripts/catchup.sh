#!/usr/bin/env bash
# One catch-up of a spendflow binary on a keyed topic loaded beforehand, for quick A/B runs of
# two builds (bench/README.md, "Second pass"): time from process start until Admin/GetStatus says
# caught_up with every record read, and the peak RSS (VmHWM) then.
#
#   spendflow generate --mysql "$SPENDFLOW_MYSQL" --brokers 127.0.0.1:9092 --layout keyed \
#       --topic probe.keyed --partitions 4 --users 10000 --events 2000000 --bad-rate 0   # once
#   (the generator keeps its run in MariaDB: another topic or user count needs a database of its
#   own, e.g. .../spendflow_u1m for --users 1000000 --topic probe.users1m)
#   bench/scripts/catchup.sh target/release/spendflow [more `spendflow run` flags]
#
# Env: TOPIC (probe.keyed), RECORDS (2000000), BROKERS (127.0.0.1:9092), GRPCURL
# (target/tools/bin/grpcurl, from `make tools`).
set -euo pipefail
binary=$1
shift
topic=${TOPIC:-probe.keyed}
records=${RECORDS:-2000000}
brokers=${BROKERS:-127.0.0.1:9092}
grpcurl=${GRPCURL:-$(dirname "$0")/../../target/tools/bin/grpcurl}
addr=127.0.0.1:50999
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
require_free_grpc "$addr"
log=$(mktemp)
start=$(date +%s.%N)
"$binary" run --input "kafka:$brokers" --topic "$topic" -w 2 --grpc "$addr" "$@" >"$log" 2>&1 &
pid=$!
# Wait for it to exit, so a run started right after finds the port free.
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -f "$log"' EXIT
while kill -0 "$pid" 2>/dev/null; do
  if caught_up "$addr" "$records"; then
    end=$(date +%s.%N)
    hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
    awk -v s="$start" -v e="$end" -v n="$records" -v h="$hwm" \
      'BEGIN {printf "%.2f s, %.0f K records/s, peak RSS %.0f MiB\n", e - s, n / (e - s) / 1000, h / 1024}'
    exit 0
  fi
  sleep 0.05
done
echo "spendflow exited before catching up:" >&2
cat "$log" >&2
exit 1
