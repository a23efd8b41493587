# Shared by catchup.sh and sink-sweep.sh (sourced).

# Fails if something already answers on the gRPC address: a leftover engine from an earlier run
# would answer the status polls, and the run would report its numbers (a "catch-up" of 0.03 s).
require_free_grpc() {
  local addr=$1
  if "$grpcurl" -plaintext -max-time 1 "$addr" list >/dev/null 2>&1; then
    echo "something already serves gRPC on $addr (a spendflow left from an earlier run?); stop it first" >&2
    exit 1
  fi
}

# True once Admin/GetStatus at $1 says caught up with at least $2 records read.
caught_up() {
  local addr=$1 records=$2 status read
  status=$("$grpcurl" -plaintext -d '{}' "$addr" spendflow.v1.Admin/GetStatus 2>/dev/null || true)
  read=$(grep -o '"recordsRead": "[0-9]*"' <<<"$status" | head -1 | grep -o '[0-9]*' || true)
  [[ -n $read && $read -ge $records ]] && grep -q '"caughtUp": true' <<<"$status"
}
