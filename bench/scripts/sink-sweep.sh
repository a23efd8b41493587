#!/usr/bin/env bash
# One catch-up into Cassandra with given sink settings, for a sweep of `concurrency` and
# `batch_statements` (bench/README.md, "What did not move"): the time until the served state is
# caught up, and until the sink has written everything (no group in flight and
# spendflow_sink_rows_written_total unchanged for 0.6 s; the end is the first of those polls).
#
#   bench/scripts/sink-sweep.sh target/release/spendflow CONCURRENCY BATCH_STATEMENTS
#
# Input as for catchup.sh (a keyed topic loaded beforehand); a fresh keyspace per run.
# Env: TOPIC (probe.keyed), RECORDS (2000000), GRPCURL (target/tools/bin/grpcurl).
set -euo pipefail
binary=$1 concurrency=$2 batch=$3
topic=${TOPIC:-probe.keyed}
records=${RECORDS:-2000000}
grpcurl=${GRPCURL:-$(dirname "$0")/../../target/tools/bin/grpcurl}
keyspace=sweep_c${concurrency}_b${batch}_$(date +%s)
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
require_free_grpc 127.0.0.1:50999
work=$(mktemp -d)
cat >"$work/sweep.toml" <<EOT
[sink]
kind = "cassandra"
contact_points = "127.0.0.1:9042"
keyspace = "$keyspace"
concurrency = $concurrency
batch_statements = $batch
EOT
start=$(date +%s.%N)
"$binary" run --config "$work/sweep.toml" --input kafka:127.0.0.1:9092 --topic "$topic" -w 2 \
  --grpc 127.0.0.1:50999 --metrics 127.0.0.1:9899 --checkpoint-dir "$work/checkpoints" \
  >"$work/log" 2>&1 &
pid=$!
trap 'kill -INT "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
served="" last=-1 stable=0 done_at=""
while kill -0 "$pid" 2>/dev/null; do
  if [[ -z $served ]]; then
    if caught_up 127.0.0.1:50999 "$records"; then
      served=$(date +%s.%N)
    fi
  else
    metrics=$(curl -s 127.0.0.1:9899/metrics)
    rows=$(awk '/^spendflow_sink_rows_written_total/ {s += $2} END {print s + 0}' <<<"$metrics")
    inflight=$(awk '/^spendflow_sink_inflight_groups/ {print $2}' <<<"$metrics")
    if [[ $rows == "$last" && $inflight == 0 ]]; then
      stable=$((stable + 1))
      [[ $stable -eq 1 ]] && done_at=$(date +%s.%N)
    else
      stable=0
    fi
    last=$rows
    if [[ $stable -ge 6 ]]; then
      awk -v s="$start" -v v="$served" -v d="$done_at" -v n="$records" -v r="$rows" \
        -v c="$concurrency" -v b="$batch" 'BEGIN {
          printf "concurrency %d, batch %d: served %.2f s, Cassandra %.2f s (%.0f K/s), %d rows (%.2f per record)\n",
            c, b, v - s, d - s, n / (d - s) / 1000, r, r / n }'
      exit 0
    fi
  fi
  sleep 0.1
done
echo "spendflow exited before the sink was done:" >&2
cat "$work/log" >&2
exit 1
